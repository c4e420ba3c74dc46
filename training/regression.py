"""ODE regression of the block-causal student onto the teacher's trajectories (CausVid stage 1) on the harness:
the `ode_init` stage, and the `dmd` stage's regression-only ablation (``dmd.teacher = none``).

The student is the teacher's DiT used with the block-causal mask. Each chunk of each trajectory gets its own
timestep from the student's list; the input is the stored ODE state at that timestep, the target the stored x0:
``L_init = ||G(x_t) - x0||^2``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor, nn

from infra.config import StudentConfig
from model.dit import DiT
from model.distillation import chunk_timestep_indices, ode_regression_loss, per_timestep_errors, select_states
from model.presets import get_preset
from model.weights import load_model, read_payload
from pipelines import trajectories
from pipelines.workflow import StageContext
from training.harness import EngineSet, EngineSpec, Export, Models, TrainTask, fit, stage_job, unwrap_dit
from training.student_evaluation import StudentCurve, curve_for, curve_scores, finish_student, sample_text_for, sample_videos


class StudentRegression(nn.Module):
    """ODE regression of a block-causal DiT: per-chunk timesteps, stored states in, x0 out.

    ``forward(states [B, S, F, C, h, w], x0 [B, F, C, h, w], text_emb, text_mask) -> (loss, errors [S])``, the
    errors being the mean squared error of the frames that drew each timestep (NaN for none).
    """

    def __init__(self, dit: DiT, student_times: Tensor, chunk_frames: int) -> None:
        super().__init__()
        self.dit = dit
        self.chunk_frames = chunk_frames
        self.register_buffer("student_times", student_times.float().clone())

    def forward(self, states: Tensor, x0: Tensor, text_emb: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        return regression_on_states(self.dit, self.student_times, self.chunk_frames, states, x0, text_emb, text_mask)


def regression_on_states(
    dit: DiT, student_times: Tensor, chunk_frames: int, states: Tensor, x0: Tensor, text_emb: Tensor, text_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """``L_init`` of one batch of trajectories and its per-timestep errors ``[S]``; the `dmd` stage's anchor too."""
    b, num_steps, f = states.shape[:3]
    idx = chunk_timestep_indices(b, f, chunk_frames, num_steps, device=states.device)
    x_t = select_states(states, idx)
    t = student_times.to(x_t.dtype)[idx]
    pred = dit.predict_x0(x_t, t, text_emb.to(x_t.dtype), text_mask.bool(), mode="block_causal")
    return ode_regression_loss(pred, x0), per_timestep_errors(pred, x0, idx, num_steps)


def build_student(preset_name: str) -> StudentRegression:
    p = get_preset(preset_name)
    times = p.schedule().student_times(p.student_timesteps)
    return StudentRegression(p.build_dit(attention_mode="block_causal"), times, p.chunk_frames)


@dataclass
class OdeInitTask(TrainTask):
    """Regression of one engine (`student`); the frozen VAE decodes the logged 4-step samples."""

    preset: str
    lr: float
    weight_decay: float
    init_uri: str
    vae_uri: str | None
    sample_text: tuple[np.ndarray, np.ndarray] | None
    curve: StudentCurve | None = None
    export: Export = Export(engine="student", kind="dit", unwrap=unwrap_dit)

    def plain(self, name: str) -> nn.Module:
        return build_student(self.preset)

    def build(self) -> Models:
        student = self.plain("student")
        student.dit.load_state_dict(read_payload(self.init_uri)["state_dict"])
        frozen = {"vae": load_model(self.vae_uri)} if self.vae_uri else {}
        return Models(engines={"student": EngineSpec(student, lr=self.lr, weight_decay=self.weight_decay)}, frozen=frozen)

    def train_step(self, step: int, batch: dict[str, Tensor], engines: EngineSet, frozen: Mapping[str, nn.Module]) -> dict[str, Tensor | float]:
        loss, errors = engines["student"](batch["states"], batch["x0"], batch["text_emb"], batch["text_mask"])
        engines.optimize("student", loss)
        names = get_preset(self.preset).student_timesteps
        values = {"loss": float(loss.detach())}
        values.update({f"loss_t{n}": float(e) for n, e in zip(names, errors.tolist()) if np.isfinite(e)})
        return values

    def samples(self, step: int, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module]) -> dict[str, np.ndarray]:
        return sample_videos(self.export.unwrap(models[self.export.engine]), frozen, self.sample_text, self.preset)

    def learning_curve(self, step: int, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module]) -> dict[str, float]:
        return curve_scores(self.export.unwrap(models[self.export.engine]), frozen, self.curve, self.preset)


def train_regression(
    ctx: StageContext, section: StudentConfig, trajectories_uri: str, init_uri: str, vae_uri: str | None
) -> dict[str, Any]:
    """ODE regression on the harness from ``init_uri``, then the student stages' evaluation."""
    preset_name = ctx.config.model.preset
    task = OdeInitTask(
        preset=preset_name,
        lr=section.lr,
        weight_decay=section.weight_decay,
        init_uri=init_uri,
        vae_uri=vae_uri,
        sample_text=sample_text_for(preset_name, section, ctx.config.teacher.seed, ctx.config.model.text_path),
        curve=curve_for(preset_name, section, ctx.config.teacher.seed, ctx.config.model.text_path),
    )
    result = fit(stage_job(ctx, section, task, trajectories.training_dataset(trajectories_uri), init=init_uri))
    summary: dict[str, Any] = {"model": result.model_uri, "init": init_uri, "train_seconds": round(result.seconds, 1)}
    summary.update({f"final_{k}": v for k, v in result.metrics.items() if k == "loss" or k.startswith("loss_t")})
    summary.update(finish_student(ctx, section, result.model_uri, vae_uri, trajectories_uri))
    return {"counts": {"steps": result.steps}, "summary": summary}
