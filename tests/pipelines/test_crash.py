"""`kill -9` of a running clips stage, a changed input, and the re-run: nothing stale is read, nothing is left."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest

from infra import storage
from infra.config import EMBEDDED_DEFAULT, load_config
from pipelines import curation
from pipelines.workflow import plan

BIN = Path(sys.executable).parent


def _causvid(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "causvid"), *args], env=env, capture_output=True, text=True, timeout=600)


def test_a_killed_clips_stage_resumes_reading_exactly_its_manifest(
    footage: Path, accepted_names: tuple[str, ...], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    names = [*accepted_names, "shapes0.mp4", "shapes1.mp4"]
    for name in names:
        shutil.copy(footage / name, videos / name)
    (videos / "manifest.csv").write_text("uri,caption\n" + "".join(f"{n},footage {n}\n" for n in names))
    settings = [
        f"storage.root={tmp_path / 'root'}", f"clips.manifest={videos / 'manifest.csv'}", "clips.clip_frames=17",
        "clips.stride_frames=16", "clips.videos_per_task=1", "clips.rows_per_shard=1", "ray.num_cpus=2",
    ]
    args = ["stage", "clips", *(x for s in settings for x in ("--set", s))]
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path_factory.mktemp("ray"))}
    output = Path(plan(load_config(EMBEDDED_DEFAULT, settings)).output_uri("clips"))  # what the CLI reads

    first = subprocess.Popen(
        [str(BIN / "causvid"), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while len(list(output.glob("_groups/*.json"))) < 3 and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(2)
    markers = sorted(output.glob("_groups/*.json"))
    assert 3 <= len(markers) < len(names), "killed mid-stage"

    status = _causvid(["status", *(x for s in settings for x in ("--set", s))], env)
    [line] = [row for row in status.stdout.splitlines() if row.startswith("clips ")]
    assert line.split() == ["clips", "partial", str(output), "partial:", str(len(markers)), "of", str(len(names)), "groups"]

    # The state of a crash between a group's shards and its marker, and a 0-byte staging file of a killed write;
    # then the group's source video goes away.
    done = storage.read_json(str(markers[0]))
    markers[0].unlink()
    (output / ".tmp-0123-clips-g09999-000.parquet").write_bytes(b"")
    (videos / names[done["group"]]).unlink()

    second = _causvid(args, env)
    assert second.returncode == 0, second.stderr[-3000:]
    manifest = storage.read_manifest(str(output))
    files = storage.parquet_files(str(output))
    assert sum(pq.read_metadata(f).num_rows for f in files) == manifest["counts"]["clips_out"] == 2 * (len(names) - 1)
    assert sorted(p.name for p in output.glob("*.parquet")) == sorted(Path(f).name for f in files)
    assert not list(output.rglob(".tmp-*"))
    rejected = storage.read_parquet(str(output / "rejected" / "rejected.parquet")).to_pylist()
    assert [(Path(r["uri"]).name, r["reason"]) for r in rejected] == [(names[done["group"]], "missing")]
    assert manifest["counts"]["groups_run"] == len(names) - len(markers) + 1

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'root' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("causvid").experiment_id])
    by_status = sorted((run.info.status, run.info.run_name) for run in runs)
    assert by_status == [("FAILED", "clips"), ("FAILED", "clips"), ("FINISHED", "clips"), ("FINISHED", "clips")]
    assert curation.group_marker(str(output), done["group"]) == str(markers[0])
