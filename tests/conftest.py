"""Session fixtures: one local Ray per session, a fresh storage root and MLflow store per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)

from infra.config import PipelineConfig, load_config  # noqa: E402


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the whole session (2 CPUs, no dashboard), as the embedded default starts it."""
    import ray

    from infra.cluster import ensure_ray

    ensure_ray(load_config(None, ["ray.num_cpus=2"]))
    yield
    ray.shutdown()


@pytest.fixture
def make_config(tmp_path: Path):
    """Config factory rooted in this test's temp folder (MLflow on SQLite there too)."""

    def make(*overrides: str) -> PipelineConfig:
        return load_config(None, [f"storage.root={tmp_path / 'root'}", "ray.num_cpus=2", *overrides])

    return make
