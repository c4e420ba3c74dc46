"""The evaluate stage end to end on untrained tiny networks: rollouts, per-second metrics, files, MLflow."""

import json
from pathlib import Path

import mlflow
import pytest
import torch

from infra import storage, tracking
from infra.cli import main
from infra.config import EMBEDDED_DEFAULT, PipelineConfig, load_config
from model.presets import get_preset
from model.weights import MODEL_FILE, save_model
from pipelines.workflow import plan, run_stages

SECONDS = 3


@pytest.fixture(scope="module")
def untrained_inputs(tmp_path_factory: pytest.TempPathFactory) -> PipelineConfig:
    """Complete outputs of the stages evaluate reads, holding freshly initialised tiny networks, where a command
    without --config (the embedded default's config) looks for them."""
    root = tmp_path_factory.mktemp("evaluate") / "root"
    config = load_config(
        EMBEDDED_DEFAULT,
        [f"storage.root={root}", "ray.num_cpus=2", f"evaluate.seconds={SECONDS}", "evaluate.num_prompts=2",
         "evaluate.causal_teacher_steps=2"],
    )
    the_plan = plan(config)
    preset = get_preset("tiny")
    torch.manual_seed(0)
    save_model(storage.join(the_plan.output_uri("vae"), MODEL_FILE), preset.build_vae(), kind="vae", preset="tiny", step=0)
    for stage, mode in [("teacher", "bidirectional"), ("causal_teacher", "block_causal"), ("ode_init", "block_causal"),
                        ("dmd", "block_causal")]:
        dit = preset.build_dit(attention_mode=mode)
        save_model(storage.join(the_plan.output_uri(stage), MODEL_FILE), dit, kind="dit", preset="tiny", step=0)
    for stage in ("vae", "teacher", "causal_teacher", "ode_init", "dmd"):
        storage.write_manifest(the_plan.output_uri(stage), {"fingerprint": the_plan.fingerprints[stage]})
    return config


@pytest.fixture(scope="module")
def evaluated(ray_local: None, untrained_inputs: PipelineConfig) -> tuple[PipelineConfig, str]:
    return untrained_inputs, run_stages(untrained_inputs, ["evaluate"])["evaluate"]


def test_evaluate_stage_writes_curves_summary_videos_and_mlflow(evaluated: tuple[PipelineConfig, str]) -> None:
    config, uri = evaluated
    summary = storage.read_json(storage.join(uri, "summary.json"))
    assert set(summary["models"]) == {"dmd_student", "ode_init_student", "causal_teacher", "teacher"}
    student = summary["models"]["dmd_student"]
    assert student["seconds_of_video"] == SECONDS
    for key in ("color_acc", "shape_acc", "motion_acc", "persistence", "crispness", "temporal_flickering"):
        assert 0.0 <= student[key] <= 1.0, key
    assert set(student["drift_ratio"]) >= {"color_acc", "sharpness", "temporal_flickering"}
    assert set(student["drift_ratio_interval"]) == set(student["drift_ratio"])
    for metric, interval in student["drift_ratio_interval"].items():
        ratio = student["drift_ratio"][metric]
        assert ratio is not None or interval is None, metric
        assert interval is None or interval[0] <= ratio <= interval[1], metric
    for metric in ("sharpness", "temporal_flickering", "motion_smoothness"):  # never zero: always bounded
        assert student["drift_ratio_interval"][metric] is not None, metric
    assert summary["clip_metrics"] is False and not any(key.startswith("clip_") for key in student)
    per_second = storage.read_json(storage.join(uri, "per_second.json"))
    assert len(per_second["dmd_student"]["sharpness"]) == SECONDS
    teacher_clip_seconds = get_preset("tiny").clip_frames // get_preset("tiny").fps
    assert len(per_second["teacher"]["sharpness"]) == teacher_clip_seconds
    videos = sorted(Path(v).name for v in storage.list_files(storage.join(uri, "videos")))
    assert "dmd_student_000.mp4" in videos and "teacher_001.png" in videos and len(videos) == 16
    plots = {Path(p).name for p in storage.list_files(storage.join(uri, "plots"))}
    assert {"sharpness.png", "color_acc.png", "temporal_flickering.png"} <= plots

    run_id = storage.read_manifest(uri)["mlflow_run_id"]
    tracking.configure(config)
    history = mlflow.MlflowClient().get_metric_history(run_id, "dmd_student/sharpness")
    assert [m.step for m in history] == list(range(SECONDS))
    assert [m.value for m in history] == pytest.approx(per_second["dmd_student"]["sharpness"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"plots", "videos", "summary.json", "summary_table.md"} <= artifacts
    assert json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="summary.json")).read_text()) == summary


def test_report_prints_the_latest_summary(evaluated: tuple[PipelineConfig, str], capsys: pytest.CaptureFixture) -> None:
    config, uri = evaluated
    root = ["--set", f"storage.root={config.storage.root}"]
    assert main(["report", "--json", *root]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == storage.read_json(storage.join(uri, "summary.json"))
    assert set(printed["models"]["causal_teacher"]) >= {"color_acc", "shape_acc", "motion_acc", "persistence", "crispness"}
    assert main(["report", *root]) == 0
    table = capsys.readouterr().out
    assert uri in table and "temporal quality" in table and "dmd_student" in table
    assert main(["report", "--set", f"storage.root={config.storage.root}/nothing-here"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_dashboard_embeds_plots_tables_and_videos(
    evaluated: tuple[PipelineConfig, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config, uri = evaluated
    root = ["--set", f"storage.root={config.storage.root}"]
    out = tmp_path / "report.html"
    assert main(["dashboard", *root, "--out", str(out), "--videos", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    page = out.read_text()
    assert page.count("data:image/png;base64,") >= 3
    assert page.count("data:video/mp4;base64,") == 4
    assert all(model in page for model in ("dmd_student", "ode_init_student", "causal_teacher", "teacher"))
    assert "last 5 s / first 5 s" in page
    assert main(["dashboard", *root, "--out", str(out), "--runs", "not-a-run"]) == 2
    assert "not-a-run" in capsys.readouterr().err


def test_a_missing_clip_checkpoint_is_one_line(evaluated: tuple[PipelineConfig, str], capsys: pytest.CaptureFixture) -> None:
    config, _ = evaluated
    args = ["stage", "evaluate", "--set", f"storage.root={config.storage.root}", "--set", "evaluate.clip_checkpoint=nowhere.pt"]
    assert main(args) == 2
    assert "evaluate.clip_checkpoint: no file at nowhere.pt" in capsys.readouterr().err
