"""A video another process is still writing, for the tests that read files as they grow."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from pipelines.video import Mp4Writer, mp4_boxes


class LiveMp4:
    """Writes ``frames`` to a fragmented MP4 from a thread: the first ``head`` at once, the rest once the reader calls
    :meth:`resume`. Entering waits for the first fragment on disk; ``log`` shows the order of events."""

    def __init__(self, path: Path, frames: np.ndarray, fps: int, head: int) -> None:
        self.path, self.frames, self.fps, self.head = path, frames, fps, head
        self.resumed = threading.Event()
        self.log: list[str] = []
        self.thread = threading.Thread(target=self._write)

    def _write(self) -> None:
        height, width = self.frames.shape[1:3]
        with Mp4Writer(self.path, self.fps, height, width) as writer:
            writer.write(self.frames[: self.head])
            self.log.append("waited" if self.resumed.wait(timeout=120) else "timed out")
            writer.write(self.frames[self.head :])
        self.log.append("closed")

    def resume(self) -> None:
        self.log.append("resumed")
        self.resumed.set()

    def __enter__(self) -> LiveMp4:
        self.thread.start()
        while not self.path.exists() or b"moof" not in [kind for kind, _ in mp4_boxes(self.path) or []]:
            assert self.thread.is_alive(), self.log
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join()
