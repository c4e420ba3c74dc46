"""Every user mistake is one line that names the thing and the fix, found before Ray or MLflow start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra.cli import main
from tests.net import free_port


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(["--quiet", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1, err
    return err.strip()


def test_storage_root_mistakes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "root.txt"
    afile.write_text("")
    assert one_line_error(capsys, ["run", "--until", "synthetic", "--set", f"storage.root={afile}"]) == (
        f"causvid: error: storage.root '{afile}' is a file: point storage.root at a folder, "
        "e.g. --set storage.root=causvid-data"
    )
    unwritable = "/sys/causvid-data"  # refused even to root
    message = one_line_error(capsys, ["stage", "synthetic", "--set", f"storage.root={unwritable}"])
    assert message.startswith(f"causvid: error: storage.root '{unwritable}' is not writable (")
    assert message.endswith("): choose a folder you can write, e.g. --set storage.root=$HOME/causvid-data")


def test_manifest_mistakes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    stage = ["stage", "clips", "--set", f"storage.root={root}", "--set"]
    missing = tmp_path / "nope.csv"
    assert one_line_error(capsys, [*stage, f"clips.manifest={missing}"]) == (
        f"causvid: error: clips.manifest '{missing}' does not exist: pass the path or s3:// URI of your "
        "`uri,caption` file"
    )
    no_caption = tmp_path / "videos.csv"
    no_caption.write_text("uri,text\na.mp4,a red circle\n")
    assert one_line_error(capsys, [*stage, f"clips.manifest={no_caption}"]) == (
        f"causvid: error: clips.manifest '{no_caption}' lacks the column(s) caption: it needs `uri` and `caption` columns"
    )
    text = tmp_path / "videos.txt"
    text.write_text("a.mp4\n")
    assert one_line_error(capsys, [*stage, f"clips.manifest={text}"]) == (
        f"causvid: error: clips.manifest '{text}': expected a .csv, .jsonl or .parquet file with `uri` and `caption` columns"
    )
    assert one_line_error(capsys, ["status", "--set", f"clips.manifest={missing}"]).startswith(
        f"causvid: error: clips.manifest '{missing}' does not exist"
    )
    assert not (root / "mlflow.db").exists(), "found before MLflow starts"


def test_clip_length_is_a_schema_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert one_line_error(capsys, ["run", "--set", "clips.clip_frames=32"]) == (
        "causvid: error: config key 'clips.clip_frames': must be 1 + 4n, e.g. 29 or 33, so the VAE maps it to "
        "1 + n latent frames (got 32)"
    )


def test_unreachable_s3_endpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.setenv(name, os.environ[name])  # restored afterwards: the settings become the process's
    dead = f"http://127.0.0.1:{free_port()}"
    argv = [
        "stage", "synthetic", "--set", "storage.root=s3://causvid-bucket/x", "--set", f"storage.s3_endpoint_url={dead}",
        "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    assert one_line_error(capsys, argv) == (
        f"causvid: error: storage.root 's3://causvid-bucket/x': cannot reach the S3 endpoint {dead} "
        "(EndpointConnectionError): check storage.s3_endpoint_url / $AWS_ENDPOINT_URL and the network"
    )
    assert not (tmp_path / "mlflow.db").exists()
