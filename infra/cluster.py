"""Ray: a local Ray for the embedded default, a cluster by address, and job submission.

The cluster is an argument, not a code path: the same stage code runs in a local Ray started here or
inside a Ray job on a cluster (`causvid submit`), which connects to that cluster's Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import ray

from infra import console, storage
from infra.config import PipelineConfig
from infra.errors import UserError
from infra.redact import is_secret_name

log = logging.getLogger("causvid")

# Settings that are never secret; credentials come from the nodes themselves (instance roles, their environment).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "DS_ACCELERATOR",
)
OWN_PREFIX = "CAUSVID_"
EXTRA_ENV = "CAUSVID_FORWARD_ENV"
QUIET_RAY_ENV = {
    "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": "60",
    "RAY_DEDUP_LOGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def forwarded_env(extra: Sequence[str] = ()) -> dict[str, str]:
    """The settings workers and jobs must see as the driver does: the allowlist, our own non-secret
    `CAUSVID_*` knobs, and the names a user asks for (`extra`, or `$CAUSVID_FORWARD_ENV`, comma-separated).

    Ray writes a runtime env into its logs and shows a job's in the dashboard, so a secret-looking name is
    forwarded only when asked for by name, and then with a warning that names it (never its value).
    """
    asked = [*extra, *filter(None, (n.strip() for n in os.environ.get(EXTRA_ENV, "").split(",")))]
    names = [*FORWARDED_ENV, *(k for k in os.environ if k.startswith(OWN_PREFIX) and not is_secret_name(k)), *asked]
    env = {name: os.environ[name] for name in dict.fromkeys(names) if name in os.environ}
    for name in dict.fromkeys(asked):
        if is_secret_name(name) and name in env:
            log.warning("forwarding %s, which looks like a secret, into the Ray runtime env: Ray logs it", name)
    env.update({k: os.environ.get(k, v) for k, v in QUIET_RAY_ENV.items()})
    return env


def ensure_ray(config: PipelineConfig) -> None:
    """Connect to `ray.address`/$RAY_ADDRESS (or the job's cluster), else start a local Ray once.

    A job submitted with `causvid submit` already carries the forwarded environment in its runtime
    env; a local Ray gets it here, so its workers see the same storage and tracking settings.
    """
    storage.apply_settings(config.storage)
    if ray.is_initialized():
        return
    for key, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(key, value)
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    with console.ray_init_logs():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            with _loopback_only():
                _init_local(config)
    console.link_ray_logs(ray._private.worker._global_node.get_logs_dir_path())


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """A local Ray whose every server (GCS, raylet, workers, agents, dashboard) listens on 127.0.0.1 only.

    Ray puts a single-node instance on loopback when it is told that this node takes no part in a cluster, the
    switch it reads from `ray_constants.ENABLE_RAY_CLUSTER` while choosing the node's address; it is held off
    only while the local Ray starts, so a later `ray start` or cluster connection from this process is unaffected.
    """
    from ray._private import ray_constants

    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


def _init_local(config: PipelineConfig) -> None:
    ray.init(
        num_cpus=config.ray.num_cpus,
        include_dashboard=config.ray.dashboard,
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": forwarded_env()},
        configure_logging=console.verbose(),
        logging_level="WARNING",
        log_to_driver=console.verbose(),
    )


def submit(
    address: str, args: list[str], wait: bool = True, working_dir: str | Path = ".", env: Sequence[str] = ()
) -> int:
    """Run `causvid ARGS` as a Ray job on the cluster at `address`, stream its logs, return its exit status.

    The job runs `python -m infra.cli` in the uploaded working directory, with the `python` of the
    cluster's nodes, which has the project's dependencies installed (see ray_cluster.yaml). Only
    :func:`forwarded_env` (plus the names in `env`) reaches the job; credentials come from the nodes.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    entrypoint = "python -m infra.cli " + " ".join(shlex.quote(a) for a in args)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(working_dir), "env_vars": forwarded_env(env), "excludes": EXCLUDES},
    )
    print(f"submitted job {job_id} to {address}: causvid {' '.join(args)}", flush=True)
    if not wait:
        return 0
    _stream_logs(client, job_id)
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    status = client.get_job_status(job_id)
    while status not in terminal:
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    print(f"job {job_id} {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def list_jobs(address: str) -> list[dict[str, str]]:
    """Every job of the cluster, oldest first: id, status and the causvid command it runs."""
    from ray.job_submission import JobSubmissionClient

    jobs = sorted(JobSubmissionClient(address).list_jobs(), key=lambda job: job.start_time or 0)
    return [
        {
            "job_id": job.submission_id or job.job_id or "",
            "status": job.status.value,
            "command": job.entrypoint.replace("python -m infra.cli", "causvid", 1),
        }
        for job in jobs
    ]


def job_logs(address: str, job_id: str) -> str:
    """The logs a job has written so far."""
    return _client_for_job(address, job_id).get_job_logs(job_id)


def stop_job(address: str, job_id: str) -> bool:
    """Ask the cluster to stop a job; False when it had already ended."""
    return _client_for_job(address, job_id).stop_job(job_id)


def _client_for_job(address: str, job_id: str):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    if job_id not in {job["job_id"] for job in list_jobs(address)}:
        raise UserError(f"no job {job_id!r} on {address}: `causvid jobs list` shows the cluster's jobs")
    return client


EXCLUDES = [".venv", ".git", "causvid-data", "**/__pycache__", "*.egg-info", ".pytest_cache"]


def _stream_logs(client, job_id: str) -> None:
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
