"""Real Ray Train + DeepSpeed runs of the teacher task on the tiny preset: every ZeRO stage, a killed worker,
a falling loss, and checkpoints that load into the plain DiT."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch

from infra.config import load_config
from model.weights import load_model, read_payload
from pipelines.latents import training_dataset
from training.flow_matching import TeacherTask
from training.harness import CHECKPOINT_DIR, TRAIN_RUN_NAME, FitResult, TrainJob, checkpoint_state_dict, fit

pytestmark = pytest.mark.usefixtures("ray_local")


@dataclass(frozen=True)
class CrashAt:
    """A harness step hook: SIGKILL worker ``rank`` before ``step`` of the first attempt, once Ray Train's controller
    has polled the reports made so far (it polls every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default), as
    for a crash well after a checkpoint; a kill right after a report can lose it, and the run then rightly restarts
    from the checkpoint before."""

    step: int
    rank: int

    def __call__(self, step: int, rank: int, resumed: bool) -> None:
        if (step, rank, resumed) == (self.step, self.rank, False):
            time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")))
            os.kill(os.getpid(), signal.SIGKILL)


def teacher_task(lr: float = 1e-3) -> TeacherTask:
    return TeacherTask(
        preset="tiny",
        mode="bidirectional",
        lr=lr,
        weight_decay=0.0,
        text_dropout=0.1,
        vae_uri=None,
        sample_text=None,
        sample_steps=2,
        guidance_scale=3.0,
    )


def run_teacher(
    out: Path, latents_uri: str, *overrides: str, tracking: tuple[str, str] | None = None, before_step: CrashAt | None = None
) -> FitResult:
    config = load_config(None, [f"storage.root={out}", "teacher.batch_size=2", "teacher.warmup_steps=0", *overrides])
    job = TrainJob(
        name="teacher",
        output_uri=str(out),
        section=config.teacher,
        task=teacher_task(config.teacher.lr),
        dataset=training_dataset(latents_uri),
        preset="tiny",
        tracking_uri=tracking[0] if tracking else None,
        run_id=tracking[1] if tracking else None,
        before_step=before_step,
    )
    return fit(job)


def checkpoints(out: Path) -> list[Path]:
    return sorted(Path(out, CHECKPOINT_DIR, TRAIN_RUN_NAME).glob("step_*"))


def assert_plain_inference(model_uri: str) -> torch.nn.Module:
    """The exported file is one call away from a plain DiT that runs a forward pass."""
    dit = load_model(model_uri)
    x = torch.randn(1, 3, 8, 16, 16)
    text, mask = dit.null_text(1, 32)
    with torch.no_grad():
        v = dit(x, torch.full((1, 3), 0.5), text, mask)
    assert v.shape == x.shape and torch.isfinite(v).all()
    return dit


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_zero_stage_two_workers(tmp_path: Path, latents_uri: str, zero_stage: int) -> None:
    result = run_teacher(
        tmp_path, latents_uri, f"teacher.zero_stage={zero_stage}", "teacher.num_workers=2", "teacher.steps=3",
        "teacher.checkpoint_every=2",
    )
    assert result.steps == 3
    assert [p.name for p in checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    last = checkpoints(tmp_path)[-1]
    assert sorted(p.name for p in last.glob("dit/state/zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert {p.name for p in last.glob("train_state_rank*.pt")} == {"train_state_rank0.pt", "train_state_rank1.pt"}
    dit = assert_plain_inference(result.model_uri)
    from_checkpoint = checkpoint_state_dict(last, "dit", strip_prefix="dit.")
    exported = dit.state_dict()
    assert from_checkpoint.keys() == exported.keys()
    for key, value in exported.items():
        torch.testing.assert_close(from_checkpoint[key], value)
    assert exported["head.weight"].abs().sum() > 0  # zero-initialised, so it trained


def test_zero0_loss_falls_and_logs_to_mlflow(tmp_path: Path, latents_uri: str) -> None:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("harness", artifact_location=(tmp_path / "art").as_uri()))
    tracking = (client.tracking_uri, run.info.run_id)
    result = run_teacher(
        tmp_path, latents_uri, "teacher.zero_stage=0", "teacher.steps=48", "teacher.batch_size=4", "teacher.lr=3e-3",
        "teacher.log_every=8", "teacher.checkpoint_every=48", tracking=tracking,
    )
    client = mlflow.MlflowClient(tracking[0])
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 6  # one mean per window of log_every steps (8: windows of 4 were within noise of 10 %)
    assert losses[-1] < 0.9 * losses[0], losses
    for name in ("lr", "grad_norm", "samples_per_s", "peak_mem_mb"):
        assert client.get_metric_history(run.info.run_id, name), name
    assert [a.path for a in client.list_artifacts(run.info.run_id, "weights")] == ["weights/model.pt"]
    payload = read_payload(result.model_uri)
    assert (payload["kind"], payload["preset"], payload["mode"], payload["step"]) == ("dit", "tiny", "bidirectional", 48)


def test_killed_worker_resumes_from_last_checkpoint(tmp_path: Path, latents_uri: str) -> None:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("resume", artifact_location=(tmp_path / "art").as_uri()))
    result = run_teacher(
        tmp_path, latents_uri, "teacher.zero_stage=2", "teacher.num_workers=2", "teacher.steps=8",
        "teacher.checkpoint_every=3", "teacher.log_every=1", "teacher.max_failures=1",
        tracking=(client.tracking_uri, run.info.run_id), before_step=CrashAt(step=5, rank=1),
    )
    assert result.steps == 8
    assert [p.name for p in checkpoints(tmp_path)][-2:] == ["step_0000006", "step_0000008"]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    # steps 1-5 ran, rank 1 died before step 6, the restart resumed from step 3 and redid 4 and 5
    assert steps == [1, 2, 3, 4, 4, 5, 5, 6, 7, 8]
    state = torch.load(checkpoints(tmp_path)[-1] / "train_state_rank0.pt", weights_only=False)
    assert state["step"] == 8
    assert_plain_inference(result.model_uri)


def test_killed_worker_resumes_exactly_in_bf16(tmp_path: Path, latents_uri: str) -> None:
    """A crash between checkpoints costs nothing: the resumed run ends on the uninterrupted run's exact weights.

    Compilation stays off here: each worker start would compile the step again (about a minute per start on two
    cores); the compiled forward is held to eager in ``test_precision``."""
    settings = (
        "teacher.zero_stage=2", "teacher.steps=6", "teacher.checkpoint_every=3", "teacher.max_failures=1",
        "teacher.precision=bf16", "teacher.shuffle_buffer=0",
    )
    straight = run_teacher(tmp_path / "straight", latents_uri, *settings)
    resumed = run_teacher(tmp_path / "resumed", latents_uri, *settings, before_step=CrashAt(step=4, rank=0))
    assert [p.name for p in checkpoints(tmp_path / "resumed")] == ["step_0000003", "step_0000006"]
    expected, got = read_payload(straight.model_uri)["state_dict"], read_payload(resumed.model_uri)["state_dict"]
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    assert expected["head.weight"].abs().sum() > 0
