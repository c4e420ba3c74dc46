"""Latents Parquet for harness tests (two caption classes whose clips share a fixed latent pattern), and the
one-rank process group of tests that build DeepSpeed engines in this process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from infra import storage
from model.presets import get_preset
from pipelines.latents import latent_rows, write_latent_shard
from tests.net import free_port

ROWS_PER_SHARD = 16
SHARDS = 2


@pytest.fixture(scope="session")
def latents_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A complete latents output (tiny preset shapes): each row is its class's pattern plus 0.1 noise."""
    root = tmp_path_factory.mktemp("latents")
    frames, channels, height, width = get_preset("tiny").latent_shape()
    rng = np.random.default_rng(0)
    patterns = rng.standard_normal((2, frames, channels, height, width)).astype(np.float32)
    texts = rng.standard_normal((2, 32, 384)).astype(np.float32)
    for shard in range(SHARDS):
        labels = rng.integers(0, 2, ROWS_PER_SHARD)
        latents = patterns[labels] + 0.1 * rng.standard_normal(patterns[labels].shape).astype(np.float32)
        mask = np.zeros((ROWS_PER_SHARD, 32), bool)
        mask[:, :8] = True
        rows = latent_rows(
            [f"{shard}-{i}" for i in range(ROWS_PER_SHARD)],
            [f"class {label}" for label in labels],
            ["{}"] * ROWS_PER_SHARD,
            latents,
            texts[labels] * mask[..., None],
            mask,
        )
        write_latent_shard(str(Path(root, f"latents-{shard}.parquet")), rows)
    storage.write_manifest(str(root), {"stage": "latents", "summary": {"vae": None}})
    return str(root)


@pytest.fixture(scope="session")
def single_process_group() -> Iterator[None]:
    """A one-rank gloo group, as a Ray Train worker of a one-worker run has; one per session, since DeepSpeed
    keeps its first group for the life of the process."""
    import deepspeed
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    dist.destroy_process_group()
