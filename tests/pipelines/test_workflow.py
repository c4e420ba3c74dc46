import dataclasses
import subprocess
from pathlib import Path

import mlflow
import pyarrow as pa
import pytest

from infra import storage, tracking
from infra.config import ConfigError
from model.weights import MODEL_FILE
from pipelines import workflow
from pipelines.workflow import STAGES, StageContext, plan, run_stages, select_stages, status

WRITTEN: list[int] = []
CRASH_AT: list[int] = []


def four_shards(ctx: StageContext) -> dict:
    """A small real stage: four Parquet shards, resumable shard by shard."""
    for index in range(4):
        name = f"part-{index:03d}.parquet"
        if ctx.done(name):
            continue
        if index in CRASH_AT:
            raise RuntimeError("worker lost")
        storage.write_parquet(ctx.output(name), pa.table({"row": [index * 10 + k for k in range(10)]}))
        WRITTEN.append(index)
    return {"counts": {"rows": 40, "shards": 4}, "summary": {"mean_row": 19.5}}


@pytest.fixture(autouse=True)
def use_four_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    stage = dataclasses.replace(STAGES["synthetic"], entry=f"{__name__}:four_shards")
    monkeypatch.setitem(STAGES, "synthetic", stage)
    WRITTEN.clear()
    CRASH_AT.clear()


def test_fingerprints_follow_the_dag(make_config) -> None:
    base = plan(make_config(), code="c").fingerprints
    assert plan(make_config(), code="c").fingerprints == base
    changed = plan(make_config("teacher.lr=1e-3"), code="c").fingerprints
    assert [s for s in STAGES if changed[s] != base[s]] == [
        "teacher", "causal_teacher", "trajectories", "ode_init", "dmd", "evaluate",
    ]
    assert plan(make_config(), code="other").fingerprints["synthetic"] != base["synthetic"]
    assert plan(make_config("ray.num_cpus=1"), code="c").fingerprints == base


def test_latents_batch_size_reruns_latents_and_what_follows_only(make_config) -> None:
    base = plan(make_config(), code="c").fingerprints
    changed = plan(make_config("latents.batch_size=3"), code="c").fingerprints
    assert [s for s in STAGES if changed[s] != base[s]] == [
        "latents", "teacher", "causal_teacher", "trajectories", "ode_init", "dmd", "evaluate",
    ]


def test_vae_of_follows_the_manifests(tmp_path: Path) -> None:
    root = tmp_path / "root"
    vae, latents, teacher, student, evaluate = (str(root / name) for name in ("vae", "latents", "teacher", "ode_init", "evaluate"))
    storage.write_manifest(vae, {"stage": "vae", "inputs": {"clips": str(root / "clips")}})
    storage.write_manifest(latents, {"stage": "latents", "inputs": {"vae": vae}, "summary": {"vae": f"{vae}/encoder.pt"}})
    storage.write_manifest(teacher, {"stage": "teacher", "inputs": {"latents": latents}})
    storage.write_manifest(student, {"stage": "ode_init", "inputs": {"trajectories": str(root / "t"), "teacher": teacher}})
    storage.write_manifest(evaluate, {"stage": "evaluate", "inputs": {"vae": vae, "teacher": teacher}})
    assert {workflow.vae_of(uri) for uri in (latents, teacher, student)} == {f"{vae}/encoder.pt"}
    assert workflow.vae_of(evaluate) == storage.join(vae, MODEL_FILE)
    assert workflow.vae_of(vae) is None


def test_complete_output_is_skipped_and_config_change_reruns(make_config) -> None:
    config = make_config()
    uri = run_stages(config, ["synthetic"])["synthetic"]
    assert WRITTEN == [0, 1, 2, 3]
    manifest = storage.read_manifest(uri)
    assert manifest["counts"] == {"rows": 40, "shards": 4}
    assert manifest["fingerprint"] == Path(uri).name
    assert run_stages(config, ["synthetic"])["synthetic"] == uri
    assert WRITTEN == [0, 1, 2, 3]
    rerun = run_stages(make_config("synthetic.seed=7"), ["synthetic"])["synthetic"]
    assert rerun != uri and WRITTEN == [0, 1, 2, 3] * 2
    assert storage.is_complete(uri), "the old output stays intact"
    run_stages(config, ["synthetic"], force=["synthetic"])
    assert WRITTEN == [0, 1, 2, 3] * 3


def test_crash_leaves_no_manifest_and_rerun_resumes(make_config) -> None:
    config = make_config()
    CRASH_AT.append(2)
    with pytest.raises(RuntimeError, match="worker lost"):
        run_stages(config, ["synthetic"])
    uri = plan(config).output_uri("synthetic")
    assert not storage.is_complete(uri)
    with pytest.raises(storage.IncompleteOutputError):
        storage.parquet_files(uri)
    assert [row.state for row in status(config)][0] == "missing"
    CRASH_AT.clear()
    run_stages(config, ["synthetic"])
    assert WRITTEN == [0, 1, 2, 3], "finished shards are kept, only the missing ones run"
    rows = pa.concat_tables([storage.read_parquet(f) for f in storage.parquet_files(uri)]).column("row").to_pylist()
    assert sorted(rows) == list(range(40))


def test_status_done_missing_stale(make_config) -> None:
    config = make_config()
    assert {row.state for row in status(config)} == {"missing"}
    run_stages(config, ["synthetic"])
    states = {row.name: row.state for row in status(config)}
    assert states["synthetic"] == "done" and states["clips"] == "missing"
    assert {row.name: row.state for row in status(make_config("synthetic.seed=3"))}["synthetic"] == "stale"


def test_mlflow_parent_and_child_runs(make_config) -> None:
    config = make_config("synthetic.num_videos=5")
    uri = run_stages(config, ["synthetic"], parent_run_name="run")["synthetic"]
    tracking.configure(config)
    runs = mlflow.search_runs(experiment_names=["causvid"], output_format="list")
    parent = next(r for r in runs if r.data.tags["causvid.kind"] == "workflow")
    child = next(r for r in runs if r.data.tags["causvid.kind"] == "stage")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.params["synthetic.num_videos"] == "5"
    assert child.data.metrics["count.rows"] == 40
    assert child.data.tags["causvid.output"] == uri
    [dataset] = child.inputs.dataset_inputs
    assert dataset.dataset.name == "synthetic"
    assert dataset.dataset.digest == Path(uri).name
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "output"
    assert storage.read_manifest(uri)["mlflow_run_id"] == child.info.run_id
    revision = workflow.code_revision()
    assert storage.read_manifest(uri)["code"] == revision
    assert child.data.tags["causvid.code.source_sha256"] == revision["source_sha256"]
    assert child.data.tags["causvid.code.git_commit"] == subprocess.run(
        ["git", "-C", str(Path(workflow.__file__).parents[1]), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()


def test_selection_and_errors(make_config) -> None:
    config = make_config()
    assert select_stages(config, until="vae") == ["synthetic", "clips", "vae"]
    assert select_stages(config, until="teacher", start="vae") == ["vae", "latents", "teacher"]
    assert select_stages(make_config("clips.manifest=videos.csv"), until="clips") == ["clips"]
    assert "causal_teacher" not in select_stages(config, until="dmd")
    assert "causal_teacher" in select_stages(make_config("dmd.teacher=causal"), until="dmd")
    assert "causal_teacher" in select_stages(config, until="evaluate")
    with pytest.raises(ConfigError, match="unknown stage 'teachr' \\(stages: synthetic, clips"):
        select_stages(config, until="teachr")
    with pytest.raises(storage.IncompleteOutputError, match="stage 'clips' needs 'synthetic'"):
        run_stages(config, ["clips"])


def test_secrets_are_redacted() -> None:
    flat = tracking.flatten({"storage": {"root": "s3://b", "aws_secret_access_key": "abc", "token": None}})
    assert flat == {"storage.root": "s3://b", "storage.aws_secret_access_key": "***", "storage.token": "None"}


def test_code_version_follows_each_stage_s_imports() -> None:
    teacher = workflow.project_imports("training.teacher")
    assert {"training.teacher", "training.flow_matching", "training.harness", "model.dit", "model.schedule"} <= teacher
    assert {"training.sampling", "model.weights", "pipelines.oracle", "pipelines.video"} <= teacher
    assert not any(name.startswith("infra") for name in teacher) and "pipelines.workflow" not in teacher
    synthetic = workflow.project_imports("pipelines.synthetic")
    assert {"pipelines.shapes_world", "pipelines.video"} <= synthetic and "model.dit" not in synthetic
    assert len(workflow.code_version("training.teacher")) == 12
    assert workflow.code_version("training.teacher") != workflow.code_version("pipelines.synthetic")


def test_code_version_ignores_comments_docstrings_and_layout() -> None:
    source = 'def f(x):\n    return x + 1\n'
    reworded = '"""Module."""\n\n# a comment\ndef f(x):  # why\n    """Add one."""\n\n    return x + 1\n'
    assert workflow.code_of(source) == workflow.code_of(reworded)
    assert workflow.code_of(source) != workflow.code_of(source.replace("+ 1", "+ 2"))
    assert workflow.code_of('class A:\n    """Only a docstring."""\n') == workflow.code_of("class A:\n    pass\n")

