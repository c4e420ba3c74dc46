"""What the student stages (`ode_init`, `dmd`) share around training: 4-step streaming samples and the learning
curve while they train, and at the end the regression loss per timestep and the oracle's scores of 4-step samples of held-out prompts,
next to the teacher's on the same prompts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from torch import nn

from infra import storage
from infra.config import StudentConfig
from model.distillation import ode_regression_loss
from model.presets import get_preset
from model.weights import load_model
from pipelines.oracle import ORACLE_KEYS
from pipelines.shapes_world import heldout_prompts
from pipelines.shard_rows import decode_trajectories
from pipelines.workflow import StageContext
from training import sampling
from training.harness import after_training

REGRESSION_ROWS = 32


def sample_text_for(
    preset_name: str, section: StudentConfig, prompt_seed: int, text_path: str | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Caption embeddings of the prompts of the sample videos logged while training (None for no samples)."""
    if not section.sample_prompts:
        return None
    return sampling.heldout_text(preset_name, section.sample_prompts, prompt_seed, text_path)[1]


def sample_videos(
    student: nn.Module, frozen: Mapping[str, nn.Module], sample_text: tuple[np.ndarray, np.ndarray] | None, preset: str
) -> dict[str, np.ndarray]:
    """A training run's sample videos by name, decoded by the frozen VAE (none without text or VAE)."""
    if sample_text is None or "vae" not in frozen:
        return {}
    emb, mask = (torch.from_numpy(a) for a in sample_text)
    videos = sampling.stream_videos(student.eval(), frozen["vae"], emb, mask, preset)
    return {f"prompt{i}": video for i, video in enumerate(videos)}


@dataclass(frozen=True)
class StudentCurve:
    """The learning curve's fixed held-out prompts, their caption embeddings and the samples' latent frames."""

    prompts: list[dict[str, Any]]
    text: tuple[np.ndarray, np.ndarray]
    latent_frames: int | None


def curve_for(preset_name: str, section: StudentConfig, prompt_seed: int, text_path: str | None = None) -> StudentCurve | None:
    """The curve of a student stage that scores one (``eval_every``), else None."""
    if not section.eval_every:
        return None
    prompts, text = sampling.heldout_text(preset_name, section.curve_prompts, prompt_seed, text_path)
    return StudentCurve(prompts, text, section.eval_latent_frames)


def curve_scores(student: nn.Module, frozen: Mapping[str, nn.Module], curve: StudentCurve | None, preset: str) -> dict[str, float]:
    """Oracle accuracies of 4-step streaming samples of the curve's prompts: how distillation moves, step by step."""
    if curve is None or "vae" not in frozen:
        return {}
    emb, mask = (torch.from_numpy(a) for a in curve.text)
    videos = sampling.stream_videos(
        student.eval(), frozen["vae"], emb, mask, preset, latent_frames=curve.latent_frames, batch_size=len(curve.prompts)
    )
    scores = sampling.alignment_scores(videos, curve.prompts)["scores"]
    return {k: v for k, v in scores.items() if k.endswith("_accuracy")}


def evaluate_student(
    model_uri: str, vae_uri: str, preset_name: str, section: StudentConfig, prompt_seed: int, text_path: str | None
) -> dict[str, Any]:
    """Oracle alignment of 4-step streaming samples for ``section.eval_prompts`` held-out prompts."""
    prompts, (emb, mask) = sampling.heldout_text(preset_name, section.eval_prompts, prompt_seed, text_path)
    videos = sampling.stream_videos(
        load_model(model_uri, mode="block_causal"),
        load_model(vae_uri),
        torch.from_numpy(emb),
        torch.from_numpy(mask),
        preset_name,
        latent_frames=section.eval_latent_frames,
        batch_size=section.eval_batch_size,
    )
    p = get_preset(preset_name)
    frames = p.latent_shape(section.eval_latent_frames)[0]
    return sampling.alignment_scores(videos, prompts, steps=len(p.student_timesteps), latent_frames=frames)


@torch.no_grad()
def regression_per_timestep(model_uri: str, trajectories_uri: str, preset_name: str, rows: int = REGRESSION_ROWS) -> dict[str, float]:
    """``||G(x_t) - x0||^2`` with every frame at one student timestep, for each timestep, over the first rows."""
    p = get_preset(preset_name)
    student = load_model(model_uri, mode="block_causal")
    tables = [storage.read_parquet(uri) for uri in storage.parquet_files(trajectories_uri)]
    batch = decode_trajectories(pa.concat_tables(tables).slice(0, rows).to_pydict())
    states, x0 = torch.from_numpy(batch["states"]), torch.from_numpy(batch["x0"])
    emb, mask = torch.from_numpy(batch["text_emb"]), torch.from_numpy(batch["text_mask"])
    times = p.schedule().student_times(p.student_timesteps)
    out = {}
    for s, name in enumerate(p.student_timesteps):
        t = torch.full(states.shape[:1] + states.shape[2:3], float(times[s]))
        pred = student.predict_x0(states[:, s], t, emb, mask)
        out[f"regression_loss_t{name}"] = float(ode_regression_loss(pred, x0))
    return out


def teacher_alignment_on(teacher_uri: str, num: int, prompt_seed: int) -> dict[str, float]:
    """The teacher's oracle accuracies on its first ``num`` evaluation prompts (those the students see)."""
    uri = storage.join(teacher_uri, "eval", "alignment.json")
    if not storage.exists(uri):
        return {}
    scores = storage.read_json(uri)
    detected = scores.get("detected", [])[:num]
    expected = heldout_prompts(len(detected), seed=prompt_seed)
    if scores.get("captions", [])[: len(detected)] != [e["caption"] for e in expected]:
        return {}
    out = {f"teacher_oracle_{k}_accuracy": float(np.mean([d[k] == e[k] for d, e in zip(detected, expected)])) for k in ORACLE_KEYS}
    out["teacher_eval_latent_frames"] = float(scores.get("latent_frames", 0))
    return out


def finish_student(
    ctx: StageContext, section: StudentConfig, model_uri: str, vae_uri: str | None, trajectories_uri: str | None
) -> dict[str, Any]:
    """Shared end of the student stages: per-timestep regression loss and oracle scores, logged and summarised."""
    preset_name = ctx.config.model.preset
    summary: dict[str, Any] = {}
    if trajectories_uri:
        regress = after_training(regression_per_timestep, section)
        regression = ray.get(regress.remote(model_uri, trajectories_uri, preset_name))
        storage.write_json(ctx.output("eval", "regression.json"), regression)
        summary.update(regression)
    if section.eval_prompts and vae_uri:
        evaluate = after_training(evaluate_student, section)
        evaluated = ray.get(
            evaluate.remote(model_uri, vae_uri, preset_name, section, ctx.config.teacher.seed, ctx.config.model.text_path)
        )
        summary.update(sampling.publish_alignment(ctx, evaluated))
        summary.update(teacher_alignment_on(ctx.inputs["teacher"], evaluated["scores"]["prompts"], ctx.config.teacher.seed))
    return summary
