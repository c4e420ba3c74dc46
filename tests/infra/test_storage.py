import dataclasses
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pyarrow as pa
import pytest

from infra import storage
from tests.net import free_port


def _roundtrip(root: str) -> None:
    out = storage.join(root, "stage", "abc")
    storage.write_bytes(storage.join(out, "a.bin"), b"hello")
    storage.write_parquet(storage.join(out, "part-000.parquet"), pa.table({"x": [1, 2, 3]}))
    storage.write_json(storage.join(out, "_notes.json"), {"k": 1})
    assert storage.read_bytes(storage.join(out, "a.bin")) == b"hello"
    assert storage.read_parquet(storage.join(out, "part-000.parquet")).column("x").to_pylist() == [1, 2, 3]
    assert [Path(f).name for f in storage.list_files(out)] == ["a.bin", "part-000.parquet"]
    with pytest.raises(storage.IncompleteOutputError, match="not a complete stage output"):
        storage.parquet_files(out)
    assert not storage.is_complete(out)
    storage.write_manifest(out, {"counts": {"rows": 3}})
    assert storage.read_manifest(out)["counts"] == {"rows": 3}
    assert [Path(f).name for f in storage.parquet_files(out)] == ["part-000.parquet"]
    assert [Path(d).name for d in storage.list_dirs(storage.join(root, "stage"))] == ["abc"]
    storage.delete_tree(out)
    assert not storage.exists(storage.join(out, "a.bin"))


def test_local_roundtrip(tmp_path: Path) -> None:
    _roundtrip(str(tmp_path / "root"))


def test_s3_roundtrip_on_a_real_local_server(s3_bucket: str, s3_server: str) -> None:
    _roundtrip(f"s3://{s3_bucket}/prefix")
    storage.write_bytes(f"s3://{s3_bucket}/prefix/x/y.txt", b"z")
    keys = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [k["Key"] for k in keys if not k["Key"].endswith("/")] == ["prefix/x/y.txt"]


def test_local_write_is_atomic_when_the_writer_dies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out" / "shard.bin"
    storage.write_bytes(str(target), b"old")

    def crash(*_args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        storage.write_bytes(str(target), b"new contents that never land")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["shard.bin"]


def test_normalize_makes_local_paths_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("data") == str(tmp_path / "data")
    assert storage.normalize("file://" + str(tmp_path / "d")) == str(tmp_path / "d")
    assert storage.normalize("s3://bucket/prefix/") == "s3://bucket/prefix"


def test_a_stage_runs_with_its_root_on_s3(ray_local: None, s3_bucket: str, s3_server: str, tmp_path: Path) -> None:
    from infra.config import load_config
    from pipelines.workflow import plan, run_stages

    root = f"s3://{s3_bucket}/causvid"
    config = load_config(
        None,
        [
            f"storage.root={root}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "synthetic.num_videos=3",
            "synthetic.seconds=1",
        ],
    )
    uri = run_stages(config, ["synthetic"])["synthetic"]
    assert uri == plan(config).output_uri("synthetic") and uri.startswith(root + "/synthetic/")
    assert storage.read_manifest(uri)["counts"]["videos"] == 3
    keys = {
        k["Key"] for k in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket)["Contents"]
    }
    prefix = uri[len(f"s3://{s3_bucket}/") :]
    assert {f"{prefix}/_SUCCESS.json", f"{prefix}/manifest.parquet"} <= keys
    assert len([k for k in keys if k.startswith(f"{prefix}/videos/") and k.endswith(".mp4")]) == 3
    assert run_stages(config, ["synthetic"])["synthetic"] == uri


def test_s3_root_without_a_tracking_server_is_a_clear_error() -> None:
    from infra.config import ConfigError, load_config
    from infra.tracking import tracking_uri

    with pytest.raises(ConfigError, match="storage.root is on S3 but no MLflow server is set"):
        tracking_uri(load_config(None, ["storage.root=s3://bucket/x"]))


def test_storage_s3_settings_are_honoured(s3_bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.config import load_config

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    storage.apply_settings(load_config(None, [f"storage.s3_endpoint_url={s3_server}", "storage.s3_region=us-east-1"]).storage)
    assert storage.s3_options()["endpoint_override"] == s3_server.removeprefix("http://")
    storage.write_bytes(f"s3://{s3_bucket}/k.bin", b"on the configured endpoint")
    body = boto3.client("s3", endpoint_url=s3_server).get_object(Bucket=s3_bucket, Key="k.bin")["Body"].read()
    assert body == b"on the configured endpoint" and storage.read_bytes(f"s3://{s3_bucket}/k.bin") == body


class FailingStream(io.RawIOBase):
    """A 12 MiB upload source whose read fails after the first 9 MiB: a writer dying mid-upload."""

    def __init__(self) -> None:
        self.sent = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.sent >= 9 << 20:
            raise ConnectionResetError("the source went away")
        size = min(len(buffer), (12 << 20) - self.sent)
        buffer[:size] = b"x" * size
        self.sent += size
        return size


def test_a_failed_multipart_upload_is_aborted(s3_bucket: str, s3_server: str) -> None:
    with pytest.raises(ConnectionResetError):
        storage.upload(FailingStream(), f"s3://{s3_bucket}/big.bin")
    client = boto3.client("s3", endpoint_url=s3_server)
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert not storage.exists(f"s3://{s3_bucket}/big.bin")


def test_a_failed_s3_read_is_an_error_that_is_retried_not_a_rejection(
    ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import numpy as np
    import ray

    from infra.config import load_config
    from model.presets import get_preset
    from pipelines import curation

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # the store is down
    monkeypatch.setenv(storage.S3_ATTEMPTS_ENV, "1")
    monkeypatch.setattr(curation, "READ_RETRY_PAUSE_S", 0.0)
    video = {"index": 0, "video_index": 0, "uri": "s3://bucket/v.mp4", "source_uri": "s3://bucket/v.mp4",
             "caption": "c", "meta": "{}", "reject": "", "reject_detail": ""}
    text = ray.put((["c"], np.zeros((1, 4, 2), np.float32), np.ones((1, 4), bool)))
    config = load_config(None)
    rules = dataclasses.asdict(curation.Rules.from_config(config.clips, get_preset(config.model.preset)))
    batch = {"group": np.asarray([0]), "videos": np.asarray([json.dumps([video])], dtype=object)}
    with pytest.raises(curation.ReadFailed, match="s3://bucket/v.mp4"):
        curation.curate_group(batch, output_uri=str(tmp_path / "out"), rules=rules, text=[text])
    assert not (tmp_path / "out" / curation.GROUPS_DIR).exists(), "no marker: the video is not counted as rejected"


PAUSE_S = 8.0
TIMEOUT_S = 2.0


def test_a_stage_outlives_a_paused_s3_server(
    s3_process: subprocess.Popen, s3_bucket: str, s3_server: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The store stops answering (SIGSTOP) mid-stage for four times as long as a request may wait: the requests that
    time out are retried with backoff, and once it answers again (SIGCONT) the stage completes, every row in place."""
    root, videos = f"s3://{s3_bucket}/causvid", 6
    env = {**os.environ, storage.S3_TIMEOUT_ENV: str(TIMEOUT_S), "RAY_TMPDIR": str(tmp_path_factory.mktemp("ray"))}
    stage = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("causvid")), "stage", "synthetic", "--set", f"storage.root={root}",
            "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "--set", "ray.num_cpus=2",
            "--set", f"synthetic.num_videos={videos}", "--set", "synthetic.seconds=1", "--set", "synthetic.videos_per_task=1",
        ],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    client = boto3.client("s3", endpoint_url=s3_server)

    def keys() -> dict[str, float]:
        listed = client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])
        return {item["Key"]: item["LastModified"].timestamp() for item in listed}

    try:
        deadline = time.time() + 120
        while not any(key.endswith(".mp4") for key in keys()):
            assert stage.poll() is None and time.time() < deadline, stage.stderr.read() if stage.poll() is not None else ""
            time.sleep(0.2)
        assert not any(key.endswith(storage.MANIFEST) for key in keys()), "paused after the stage ended"
        s3_process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(PAUSE_S)
        finally:
            s3_process.send_signal(signal.SIGCONT)
        resumed = time.time()
        out, err = stage.communicate(timeout=180)
    finally:
        if stage.poll() is None:
            os.killpg(stage.pid, signal.SIGKILL)
            stage.wait()
    assert stage.returncode == 0, err[-3000:]
    uri = out.strip().splitlines()[-1]
    manifest = storage.read_manifest(uri)
    assert manifest["counts"]["videos"] == videos
    assert storage.read_parquet(storage.join(uri, "manifest.parquet")).num_rows == videos
    written = {key: at for key, at in keys().items() if key.endswith(".mp4")}
    assert len(written) == videos and max(written.values()) >= int(resumed) - 1, "no write waited out the pause"
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
