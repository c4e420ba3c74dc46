import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from tests.net import free_port, wait_for_http

from infra import storage
from pipelines.workflow import STAGES, run_stages


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` process on 127.0.0.1 with a SQLite backend; stopped by the test."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_http(f"{url}/health", process, timeout=120)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_stage_logs_to_a_real_mlflow_server(mlflow_server: str, make_config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STAGES, "synthetic", dataclasses.replace(STAGES["synthetic"], entry="tests.pipelines.test_workflow:four_shards"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    config = make_config("tracking.experiment=server-test")
    uri = run_stages(config, ["synthetic"])["synthetic"]
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("server-test")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`causvid.kind` = 'stage'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["causvid.output"] == uri
    assert run.data.metrics["count.shards"] == 4
    local = client.download_artifacts(run.info.run_id, "manifest.json", dst_path=str(Path(uri).parent))
    assert storage.read_json(local)["fingerprint"] == Path(uri).name
    assert not Path(storage.normalize(config.storage.root), "mlflow.db").exists(), "no local store when a server is set"
