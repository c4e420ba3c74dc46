"""Training lines on the driver's console: rank 0 puts them on a Ray queue and a driver thread logs them, because
a quiet console does not forward the workers' output (`log_to_driver` is off) and a cluster's workers have none."""

from __future__ import annotations

import datetime
import logging
import threading
from typing import Any

import ray
from ray.util.queue import Empty, Queue

log = logging.getLogger("causvid")
POLL_S = 0.5


def step_line(step: int, total: int, samples_per_s: float, steps_per_s: float) -> str:
    """`step 40/200  12.5 samples/s  ETA 0:01:04`: how far, how fast, and how long the remaining steps take."""
    eta = datetime.timedelta(seconds=round((total - step) / max(steps_per_s, 1e-9)))
    return f"step {step}/{total}  {samples_per_s:.1f} samples/s  ETA {eta}"


class ConsoleRelay:
    """Driver side: ``with ConsoleRelay(stage) as queue`` hands the workers ``queue``; each line put on it is
    logged as ``<stage> <line>`` until the block ends (the lines already sent are logged first)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._drain, name=f"{stage}-console", daemon=True)

    def __enter__(self) -> Queue:
        self._thread.start()
        return self.queue

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join()
        self.queue.shutdown()

    def _drain(self) -> None:
        while True:
            try:
                text = self.queue.get(timeout=POLL_S)
            except Empty:
                if self._done.is_set():
                    return
                continue
            except ray.exceptions.RayError:
                return
            log.info("%-15s %s", self.stage, text)
