"""Session fixtures: one local Ray per session, a fresh storage root and MLflow store per test, one tiny student
trained by the real pipeline for the tests that need trained weights, and the tiny world of the distillation
stages (see :mod:`tests.world`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)

from infra.config import PipelineConfig, load_config  # noqa: E402
from pipelines.workflow import run_stages, select_stages  # noqa: E402
from tests.net import free_port, wait_for_http  # noqa: E402
from tests.world import FAST, TEACHER_RUN, write_world  # noqa: E402


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the whole session (2 CPUs), started as the embedded default starts it."""
    import ray

    from infra.cluster import ensure_ray

    ensure_ray(load_config(None, ["ray.num_cpus=2"]))
    yield
    ray.shutdown()


# The embedded default's stages on six 3-s videos and a few steps each: real engines, minutes of CI.
MICRO_PIPELINE = (
    "ray.num_cpus=2",
    "synthetic.num_videos=6",
    "synthetic.seconds=3",
    *(f"{stage}.{key}" for stage in ("vae", "teacher", "ode_init", "dmd") for key in (
        "steps=4", "batch_size=2", "warmup_steps=0", "log_every=2", "checkpoint_every=4", "shuffle_buffer=0",
    )),
    "vae.eval_clips=2",
    "vae.stats_clips=2",
    "teacher.eval_prompts=0",
    "teacher.eval_every=2",
    "teacher.curve_prompts=2",
    "teacher.curve_steps=2",
    "teacher.curriculum=[{latent_frames: 1, steps: 1}, {latent_frames: 3, steps: 1}]",
    "trajectories.num_prompts=4",
    "trajectories.ode_steps=4",
    "trajectories.rows_per_shard=2",
    "trajectories.batch_size=2",
    *(f"{stage}.{key}" for stage in ("ode_init", "dmd") for key in ("eval_prompts=0", "sample_prompts=0")),
    "dmd.critic_steps=2",
)


@pytest.fixture(scope="session")
def micro_config(tmp_path_factory: pytest.TempPathFactory) -> PipelineConfig:
    return load_config(None, [f"storage.root={tmp_path_factory.mktemp('pipeline')}", *MICRO_PIPELINE])


@pytest.fixture(scope="session")
def trained_pipeline(ray_local: None, micro_config: PipelineConfig) -> dict[str, str]:
    """Every stage from the synthetic videos to the DMD student, run by the workflow on a local Ray with DeepSpeed;
    returns each stage's output URI (``"dmd"`` holds the trained tiny student, its VAE is ``"vae"``'s)."""
    return run_stages(micro_config, select_stages(micro_config, until="dmd"), parent_run_name="micro")


@pytest.fixture(scope="session")
def world_settings() -> dict[str, object]:
    """The overrides every distillation test shares and the teacher's recorded MLflow run id."""
    return {"overrides": FAST, "teacher_run": TEACHER_RUN}


@pytest.fixture(scope="session")
def world_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distillation")


@pytest.fixture(scope="session")
def world(world_root: Path) -> Callable[..., PipelineConfig]:
    """Config factory on one shared storage root that holds the tiny world; stage outputs are shared by fingerprint."""

    def make(*overrides: str) -> PipelineConfig:
        config = load_config(None, [f"storage.root={world_root}", *FAST, *overrides])
        write_world(config)
        return config

    return make


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
    AWS_ACCESS_KEY_ID="causvid-test-key-id",
    AWS_SECRET_ACCESS_KEY="causvid-test-secret-key",
    AWS_REGION="us-east-1",
)


@pytest.fixture(scope="session")
def s3_process() -> Iterator[subprocess.Popen]:
    """A real S3-compatible server (moto) on 127.0.0.1, the process itself (chaos tests pause it)."""
    binary = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(S3_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_http(S3_ENDPOINT, process)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_server(s3_process: subprocess.Popen) -> str:
    """The local S3 server's endpoint URL."""
    return S3_ENDPOINT


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh bucket on the local S3 server, which the standard AWS variables point at."""
    import uuid

    import boto3

    bucket = f"causvid-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket
