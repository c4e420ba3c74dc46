"""The whole workflow end to end on the session's micro pipeline: every stage from synthetic MP4s to the DMD
student ran for real (Ray Data, Ray Train + DeepSpeed, MLflow), each output is complete, and training moved weights."""

from __future__ import annotations

import torch
from mlflow.tracking import MlflowClient

from infra import storage, tracking
from infra.config import PipelineConfig
from model.weights import MODEL_FILE, read_payload
from pipelines.workflow import run_stages, select_stages


def test_every_stage_to_the_student_is_complete_and_trained(
    trained_pipeline: dict[str, str], micro_config: PipelineConfig
) -> None:
    assert list(trained_pipeline) == [
        "synthetic", "clips", "vae", "latents", "teacher", "trajectories", "ode_init", "dmd",
    ]
    manifests = {name: storage.read_manifest(uri) for name, uri in trained_pipeline.items()}
    assert manifests["synthetic"]["counts"]["videos"] == 6
    assert manifests["clips"]["counts"]["clips_out"] == 6
    assert manifests["trajectories"]["counts"]["rows"] == 4
    for name in ("vae", "teacher", "ode_init", "dmd"):
        assert manifests[name]["counts"]["steps"] == 4, name
    client = MlflowClient(tracking_uri=tracking.tracking_uri(micro_config))
    for name, uri in trained_pipeline.items():
        run = client.get_run(manifests[name]["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["causvid.output"] == uri, name
    assert manifests["dmd"]["counts"]["critic_updates"] == 8
    teacher_run = manifests["teacher"]["mlflow_run_id"]
    for key in ("color", "shape", "motion", "background"):
        curve = client.get_metric_history(teacher_run, f"curve/{key}_accuracy")
        assert sorted(m.step for m in curve) == [2, 4], key  # teacher.eval_every=2 over 4 steps
        assert {m.value * 2 for m in curve} <= {0.0, 1.0, 2.0}, key  # a share of the 2 curve prompts
    assert manifests["dmd"]["inputs"]["teacher"] == trained_pipeline["teacher"]

    trained = ("teacher", "ode_init", "dmd")
    weights = {name: read_payload(storage.join(trained_pipeline[name], MODEL_FILE)) for name in trained}
    assert weights["ode_init"]["mode"] == weights["dmd"]["mode"] == "block_causal"
    for before, after in (("teacher", "ode_init"), ("ode_init", "dmd")):
        kept = {
            key for key, value in weights[after]["state_dict"].items()
            if torch.equal(weights[before]["state_dict"][key], value)
        }
        assert kept == {"null_text_embedding"}, f"{after} left {sorted(kept)} as {before} had them"  # students skip CFG


def test_running_it_again_skips_every_stage(trained_pipeline: dict[str, str], micro_config: PipelineConfig) -> None:
    before = {name: storage.read_manifest(uri)["finished_at"] for name, uri in trained_pipeline.items()}
    assert run_stages(micro_config, select_stages(micro_config, until="dmd")) == trained_pipeline
    assert {name: storage.read_manifest(uri)["finished_at"] for name, uri in trained_pipeline.items()} == before
