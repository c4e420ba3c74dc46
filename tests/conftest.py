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
from tests.net import free_port, wait_for_http  # noqa: E402


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the whole session (2 CPUs), started as the embedded default starts it."""
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


S3_PORT = free_port()
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
# Set before any Ray worker starts, so that stage tasks see the local S3 server as the driver does.
os.environ.update(
    AWS_ENDPOINT_URL=S3_ENDPOINT,
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_REGION="us-east-1",
)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible server (moto) on 127.0.0.1; yields its endpoint URL."""
    import subprocess
    import sys

    port, endpoint = S3_PORT, S3_ENDPOINT
    binary = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_http(endpoint, process)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh bucket on the local S3 server, which the standard AWS variables point at."""
    import uuid

    import boto3

    bucket = f"causvid-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket
