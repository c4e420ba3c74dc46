"""No secret leaves the driver: not into Ray's session folder, the MLflow store, the manifests or the console; and
the console carries the product's lines, Ray's own logs going to a file under the root."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra import storage, tracking
from infra.cluster import forwarded_env
from infra.redact import redact, redact_text

BIN = Path(sys.executable).parent
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "SUPERSECRET123",
    "AWS_SESSION_TOKEN": "SESSIONTOKEN456",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOWPASSWORD789",
    "CAUSVID_HUB_TOKEN": "HUBTOKEN000",
}


def occurrences(folder: Path, value: bytes) -> dict[str, int]:
    found = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            count = path.read_bytes().count(value)
            if count:
                found[str(path.relative_to(folder))] = count
    return found


def test_a_local_run_leaves_no_secret_anywhere(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    ray_tmp = tmp_path_factory.mktemp("ray")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, **SECRETS, "RAY_TMPDIR": str(ray_tmp)}
    result = subprocess.run(
        [
            str(BIN / "causvid"), "stage", "synthetic", "--set", f"storage.root={tmp_path / 'root'}",
            "--set", "ray.num_cpus=1", "--set", "synthetic.num_videos=2", "--set", "synthetic.seconds=1",
        ],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(ray_tmp.rglob("runtime_env_agent.log")) and (tmp_path / "root" / "mlflow.db").is_file()
    console = result.stderr.decode().splitlines()
    assert [line.split()[2:4] for line in console if " I synthetic " in line] == [["synthetic", "running"], ["synthetic", "done"]]
    assert not [line for line in console if "streaming_executor" in line or "Execution plan" in line]
    [internal_log] = (tmp_path / "root" / "logs").glob("causvid-*.log")
    assert "Execution plan" in internal_log.read_text() or "streaming_executor" in internal_log.read_text()
    for value in SECRETS.values():
        assert occurrences(ray_tmp, value.encode()) == {} and occurrences(tmp_path, value.encode()) == {}, value
        assert value.encode() not in result.stdout + result.stderr


def test_only_the_allowlist_is_forwarded_and_an_asked_secret_is_named(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("CAUSVID_DEMO_KNOB", "1")
    monkeypatch.delenv("CAUSVID_FORWARD_ENV", raising=False)
    env = forwarded_env()
    assert not set(SECRETS) & set(env)
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and env["CAUSVID_DEMO_KNOB"] == "1"
    with caplog.at_level(logging.WARNING, logger="causvid"):
        asked = forwarded_env(["MLFLOW_TRACKING_PASSWORD"])
    assert asked["MLFLOW_TRACKING_PASSWORD"] == SECRETS["MLFLOW_TRACKING_PASSWORD"]
    assert [r.getMessage() for r in caplog.records] == [
        "forwarding MLFLOW_TRACKING_PASSWORD, which looks like a secret, into the Ray runtime env: Ray logs it"
    ]
    monkeypatch.setenv("SITE_PROXY", "http://proxy:3128")
    monkeypatch.setenv("CAUSVID_FORWARD_ENV", "AWS_SESSION_TOKEN, SITE_PROXY")
    listed = forwarded_env()
    assert listed["AWS_SESSION_TOKEN"] == SECRETS["AWS_SESSION_TOKEN"] and listed["SITE_PROXY"] == "http://proxy:3128"


def test_records_are_redacted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SUPERSECRET123")
    assert redact_text("key=SUPERSECRET123 at s3://u:pw12@host/x") == "key=*** at s3://u:***@host/x"
    manifest = {"config": {"api_key": "abc", "root": "/data/SUPERSECRET123"}, "counts": {"rows": 3}}
    assert redact(manifest) == {"config": {"api_key": "***", "root": "/data/***"}, "counts": {"rows": 3}}
    storage.write_manifest(str(tmp_path), manifest)
    assert storage.read_manifest(str(tmp_path)) == redact(manifest)
    assert tracking.flatten({"s": {"uri": "https://me:hunter22@h/", "n": 1}}) == {"s.uri": "https://me:***@h/", "s.n": "1"}
