"""A real two-node Ray cluster on loopback (`ray start --head` plus a worker node), and `causvid submit`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
from tests.net import free_port, wait_for_http
from tests.paths import REPO

from infra import storage

BIN = Path(sys.executable).parent


def _ray_start(args: list[str], temp_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    """`ray start --block` in its own process group, every port chosen free so nothing collides."""
    ports = [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]
    temp_dir.mkdir(parents=True, exist_ok=True)
    with open(temp_dir / "ray-start.log", "wb") as log:
        return subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", f"--temp-dir={temp_dir}", "--num-cpus=1", *ports, *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=40)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """Head on 127.0.0.2 (Jobs API on 127.0.0.1), one worker node on 127.0.0.3; yields the Jobs API URL."""
    temp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    gcs_port, dash_port = free_port(), free_port()
    head = _ray_start(
        [
            "--head", "--node-ip-address=127.0.0.2", f"--port={gcs_port}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", f"--ray-client-server-port={free_port()}",
        ],
        temp / "head",
        env,
    )
    worker = None
    try:
        url = f"http://127.0.0.1:{dash_port}"
        wait_for_http(f"{url}/api/version", head, timeout=120)
        worker = _ray_start([f"--address=127.0.0.2:{gcs_port}", "--node-ip-address=127.0.0.3"], temp / "worker", env)
        _wait_for_nodes(f"127.0.0.2:{gcs_port}", 2, env)
        yield url, env
    finally:
        for process in (worker, head):
            if process is not None:
                _stop(process)


def _wait_for_nodes(address: str, count: int, env: dict[str, str], timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run([str(BIN / "ray"), "status", f"--address={address}"], env=env, capture_output=True, text=True)
        if out.stdout.count(" node_") >= count:
            return
        time.sleep(2)
    raise TimeoutError(f"{count} Ray nodes did not join in {timeout} s")


def test_submit_runs_a_stage_as_a_ray_job(ray_cluster: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = ray_cluster
    root = tmp_path / "root"
    result = subprocess.run(
        [
            str(BIN / "causvid"), "submit", "--address", url, "--",
            "stage", "synthetic", "--set", f"storage.root={root}", "--set", "synthetic.num_videos=4",
            "--set", "synthetic.seconds=1", "--set", "synthetic.videos_per_task=2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SUCCEEDED" in result.stdout
    [output] = storage.list_dirs(str(root / "synthetic"))
    manifest = storage.read_manifest(output)
    assert manifest["counts"]["videos"] == 4
    assert pq.read_table(Path(output) / "manifest.parquet").num_rows == 4
    run = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(manifest["mlflow_run_id"])
    assert run.data.tags["causvid.stage"] == "synthetic"
    assert run.data.params["synthetic.num_videos"] == "4"
    [runtime_env] = _job_runtime_envs(url, env)
    assert runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"]
    assert env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(runtime_env), "credentials come from the nodes"


def _job_runtime_envs(url: str, env: dict[str, str]) -> list[dict]:
    """The runtime env of every job, as the Jobs API shows it (from a process with the cluster's token mode)."""
    script = (
        "import json, sys; from ray.job_submission import JobSubmissionClient; "
        "print(json.dumps([job.runtime_env for job in JobSubmissionClient(sys.argv[1]).list_jobs()]))"
    )
    out = subprocess.run([sys.executable, "-c", script, url], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_submit_reports_a_failed_job(ray_cluster: tuple[str, dict[str, str]]) -> None:
    url, env = ray_cluster
    result = subprocess.run(
        [str(BIN / "causvid"), "submit", "--address", url, "--", "stage", "synthetic", "--set", "dmd.lrr=1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    assert "unknown config key 'dmd.lrr'" in result.stdout
    assert "FAILED" in result.stdout


def test_submit_without_an_address_is_a_one_line_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([str(BIN / "causvid"), "submit", "--", "status"], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "causvid: error: submit needs a cluster: pass --address http://HOST:8265 or set RAY_ADDRESS"


def test_jobs_list_logs_and_stop(ray_cluster: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = ray_cluster

    def causvid(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "causvid"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    long_job = ["stage", "synthetic", "--set", f"storage.root={tmp_path / 'root'}", "--set", "synthetic.num_videos=500"]
    submitted = causvid("submit", "--address", url, "--no-wait", "--", *long_job)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.split()[2]
    listed = causvid("jobs", "list", "--address", url)
    [line] = [row for row in listed.stdout.splitlines() if row.startswith(job_id)]
    assert line.split()[1] in {"PENDING", "RUNNING"} and line.split()[2:] == ["causvid", *long_job]
    assert causvid("jobs", "logs", job_id, "--address", url).returncode == 0
    stopped = causvid("jobs", "stop", job_id, "--address", url)
    assert stopped.stdout.strip() == f"job {job_id} stopping"
    deadline = time.time() + 120
    status = ""
    while time.time() < deadline and status != "STOPPED":
        time.sleep(1)
        rows = causvid("jobs", "list", "--address", url).stdout.splitlines()
        status = next(row.split()[1] for row in rows if row.startswith(job_id))
    assert status == "STOPPED"
    unknown = causvid("jobs", "logs", "raysubmit_nope", "--address", url)
    assert unknown.returncode == 2 and unknown.stderr.strip() == (
        f"causvid: error: no job 'raysubmit_nope' on {url}: `causvid jobs list` shows the cluster's jobs"
    )
