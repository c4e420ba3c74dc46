"""Ray Datasets over a stage's Parquet shards: one block per shard, read by tasks that reserve no CPU.

Training workers may hold every CPU of a small cluster, so the reads reserve none and share their cores. One
read runs at a time (`SHARD_READERS`): Ray starts a Python worker for every task that runs at once, each costs
seconds of CPU and hundreds of MB to import the reader's module, and a shard's read takes milliseconds (the 16
latent shards of the embedded default started 16-20 workers before a training stage's first step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from infra import storage

SHARD_READERS = 1


def shard_dataset(
    uri: str, read: Callable[..., dict[str, np.ndarray]], what: str, **read_kwargs: Any
) -> ray.data.Dataset:
    """``read({"uri": [shard]}, **read_kwargs)`` of every Parquet shard under ``uri``, in shard order."""
    files = storage.parquet_files(uri)
    if not files:
        raise FileNotFoundError(f"{uri} holds no {what} shards")
    shards = ray.data.from_items([{"uri": f} for f in files], override_num_blocks=len(files))
    return shards.map_batches(
        read,
        batch_size=1,
        batch_format="numpy",
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=SHARD_READERS),
        fn_kwargs=read_kwargs or None,
    )
