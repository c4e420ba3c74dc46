"""Flow-matching training of a DiT teacher on latents, with text dropout for CFG: the `teacher` stage
(bidirectional) and the `causal_teacher` stage (block-causal, each chunk at its own noise level).

The engine trains a :class:`FlowMatchingLoss` wrapped around the DiT (the loss lives inside ``forward`` so ZeRO-3
gathers every parameter it touches, the null caption included). Afterwards the exported teacher draws
many-step CFG samples for held-out prompts, the VAE decodes them, and the pixel oracle scores colour, shape and
motion against the prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor, nn

from infra.config import CurriculumPhase, TeacherConfig
from model.dit import DiT
from model.presets import get_preset
from model.schedule import FlowSchedule, add_noise, velocity_target
from model.weights import load_model, read_payload
from pipelines.latents import training_dataset
from pipelines.workflow import StageContext, vae_of
from training import sampling
from training.harness import EngineSet, EngineSpec, Export, Models, TrainTask, after_training, fit, stage_job, unwrap_dit
from training.weight_average import WeightAverage, update_gathered

SAMPLE_PROMPTS = 4
EVAL_SEED = 20240


class FlowMatchingLoss(nn.Module):
    """Velocity MSE of a DiT on ``latents [B, F, C, h, w]`` noised to flow times t, captions dropped at random.

    With ``chunk_frames`` set, every chunk of that many latent frames draws its own t (``t: [B, F]`` constant
    within a chunk), the training signal of a block-causal teacher; otherwise one t per clip. With ``ema_decay``
    a moving average of the weights rides along (``ema``), which the stage samples, scores and exports.
    """

    def __init__(
        self,
        dit: DiT,
        shift: float,
        text_dropout: float,
        chunk_frames: int | None = None,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__()
        import deepspeed

        self.dit = dit
        self.schedule = FlowSchedule(shift=shift)
        self.text_dropout = text_dropout
        self.chunk_frames = chunk_frames
        self.ema = WeightAverage(dit, ema_decay) if ema_decay else None
        deepspeed.zero.register_external_parameter(self, dit.null_text_embedding)

    def forward(self, latents: Tensor, text_emb: Tensor, text_mask: Tensor) -> Tensor:
        b, f = latents.shape[:2]
        if self.chunk_frames:
            chunks = -(-f // self.chunk_frames)
            t = self.schedule.sample_training_times((b, chunks), device=latents.device)
            t = repeat(t, "b n -> b (n k)", k=self.chunk_frames)[:, :f]
        else:
            t = repeat(self.schedule.sample_training_times((b,), device=latents.device), "b -> b f", f=f)
        t = t.to(latents.dtype)
        drop = torch.rand(b, device=latents.device) < self.text_dropout
        text, mask = self.dit.drop_text(text_emb.to(latents.dtype), text_mask.bool(), drop)
        eps = torch.randn_like(latents)
        v = self.dit(add_noise(latents, eps, t), t, text, mask)
        return F.mse_loss(v.float(), velocity_target(latents, eps).float())


@dataclass
class TeacherTask(TrainTask):
    """Flow-matching training of one DiT engine (`dit`); the frozen VAE decodes the logged samples."""

    preset: str
    mode: str
    lr: float
    weight_decay: float
    text_dropout: float
    vae_uri: str | None
    sample_text: tuple[np.ndarray, np.ndarray] | None
    sample_steps: int
    guidance_scale: float
    init_uri: str | None = None
    independent_chunks: bool = False
    curriculum: tuple[CurriculumPhase, ...] = ()
    curve_prompts: list[dict[str, Any]] | None = None
    curve_text: tuple[np.ndarray, np.ndarray] | None = None
    curve_steps: int = 20
    curve_frames: int | None = None
    ema_decay: float | None = None
    export: Export = Export(engine="dit", kind="dit", unwrap=unwrap_dit)

    def plain(self, name: str) -> nn.Module:
        p = get_preset(self.preset)
        chunk = p.chunk_frames if self.independent_chunks else None
        return FlowMatchingLoss(p.build_dit(attention_mode=self.mode), p.shift, self.text_dropout, chunk, self.ema_decay)

    def build(self) -> Models:
        objective = self.plain("dit")
        if self.init_uri:
            objective.dit.load_state_dict(read_payload(self.init_uri)["state_dict"])
            if objective.ema is not None:
                objective.ema.module.load_state_dict(objective.dit.state_dict())
        frozen = {"vae": load_model(self.vae_uri)} if self.vae_uri else {}
        return Models(engines={"dit": EngineSpec(objective, lr=self.lr, weight_decay=self.weight_decay)}, frozen=frozen)

    def train_step(self, step: int, batch: dict[str, Tensor], engines: EngineSet, frozen: Mapping[str, nn.Module]) -> dict[str, Tensor | float]:
        engine = engines["dit"]
        frames = curriculum_frames(self.curriculum, step, get_preset(self.preset).clip_latent_frames)
        loss = engine(batch["latents"][:, :frames], batch["text_emb"], batch["text_mask"])
        engines.optimize("dit", loss)
        if engine.module.ema is not None:
            update_gathered(engine.module.ema, engine.module.dit, engines.zero_stage)
        return {"loss": loss.detach()}

    def _draw(
        self, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module], text: tuple[np.ndarray, np.ndarray],
        latent_frames: int | None, steps: int, **kwargs: Any,
    ) -> np.ndarray:
        """Seeded CFG samples of the trained DiT for caption embeddings, decoded: ``[B, T, H, W, 3]`` uint8."""
        p = get_preset(self.preset)
        emb, mask = (torch.from_numpy(a) for a in text)
        return sampling.generate_videos(
            self.export.unwrap(models["dit"]),
            frozen["vae"],
            emb,
            mask,
            p.latent_shape(latent_frames),
            schedule=p.schedule(),
            steps=steps,
            guidance_scale=self.guidance_scale,
            seed=EVAL_SEED,
            **kwargs,
        )

    def samples(self, step: int, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module]) -> dict[str, np.ndarray]:
        if self.sample_text is None or "vae" not in frozen:
            return {}
        videos = self._draw(models, frozen, self.sample_text, None, self.sample_steps)
        return {f"prompt{i}": video for i, video in enumerate(videos)}

    def learning_curve(self, step: int, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module]) -> dict[str, float]:
        """Oracle accuracy of few-step CFG samples of a fixed prompt set: the curve to watch while it trains."""
        if self.curve_text is None or self.curve_prompts is None or "vae" not in frozen:
            return {}
        videos = self._draw(
            models, frozen, self.curve_text, self.curve_frames, self.curve_steps, batch_size=len(self.curve_prompts)
        )
        scores = sampling.alignment_scores(videos, self.curve_prompts)["scores"]
        return {k: v for k, v in scores.items() if k.endswith("_accuracy")}


def curriculum_frames(curriculum: Sequence[CurriculumPhase], step: int, clip_frames: int) -> int:
    """Latent frames trained at ``step``: those of the curriculum phase it falls in (one, an image, on every
    ``image_every``-th step of the phase), else the whole clip."""
    start = 0
    for phase in curriculum:
        if step < start + phase.steps:
            every = phase.image_every
            return 1 if every and (step - start) % every == every - 1 else min(phase.latent_frames, clip_frames)
        start += phase.steps
    return clip_frames


def eval_settings(section: TeacherConfig, preset_name: str) -> tuple[int, float, int]:
    """Euler steps, CFG scale and latent frames of the evaluation samples: the section's, else the preset's."""
    p = get_preset(preset_name)
    steps = section.eval_steps or p.teacher_steps
    scale = p.guidance_scale if section.guidance_scale is None else section.guidance_scale
    frames = section.eval_latent_frames or p.clip_latent_frames
    return steps, scale, frames


def evaluate_alignment(
    model_uri: str,
    vae_uri: str,
    preset_name: str,
    section: TeacherConfig,
    mode: str | None = None,
    text_path: str | None = None,
) -> dict[str, Any]:
    """Oracle text alignment of CFG samples for `section.eval_prompts` held-out prompts (the shapes world's)."""
    prompts, (emb, mask) = sampling.heldout_text(preset_name, section.eval_prompts, section.seed, text_path)
    steps, scale, frames = eval_settings(section, preset_name)
    p = get_preset(preset_name)
    videos = sampling.generate_videos(
        load_model(model_uri, mode),
        load_model(vae_uri),
        torch.from_numpy(emb),
        torch.from_numpy(mask),
        p.latent_shape(frames),
        schedule=p.schedule(),
        steps=steps,
        guidance_scale=scale,
        seed=EVAL_SEED,
        batch_size=section.eval_batch_size,
    )
    return sampling.alignment_scores(videos, prompts, steps=steps, guidance_scale=scale, latent_frames=frames)


def train_teacher(ctx: StageContext, section: TeacherConfig, mode: str, init_uri: str | None, independent_chunks: bool) -> dict[str, Any]:
    """Shared body of the `teacher` and `causal_teacher` stages."""
    preset_name = ctx.config.model.preset
    latents_uri = ctx.inputs["latents"]
    vae_uri = vae_of(latents_uri)
    steps, scale, frames = eval_settings(section, preset_name)
    text_path = ctx.config.model.text_path
    _, sample_text = sampling.heldout_text(preset_name, SAMPLE_PROMPTS, section.seed, text_path)
    curve_prompts, curve_text = sampling.heldout_text(preset_name, section.curve_prompts, section.seed, text_path)
    task = TeacherTask(
        preset=preset_name,
        mode=mode,
        lr=section.lr,
        weight_decay=section.weight_decay,
        text_dropout=section.text_dropout,
        vae_uri=vae_uri,
        sample_text=sample_text,
        sample_steps=steps,
        guidance_scale=scale,
        init_uri=init_uri,
        independent_chunks=independent_chunks,
        curriculum=tuple(section.curriculum),
        curve_prompts=curve_prompts,
        curve_text=curve_text,
        curve_steps=section.curve_steps,
        curve_frames=frames,
        ema_decay=section.ema_decay,
    )
    result = fit(stage_job(ctx, section, task, training_dataset(latents_uri)))
    summary: dict[str, Any] = {"model": result.model_uri, "train_seconds": round(result.seconds, 1)}
    summary.update({f"final_{k}": v for k, v in result.metrics.items() if k in ("loss", "samples_per_s", "peak_mem_mb")})
    if section.eval_prompts:
        evaluate = after_training(evaluate_alignment, section)
        evaluated = ray.get(evaluate.remote(result.model_uri, vae_uri, preset_name, section, mode, text_path))
        summary.update(sampling.publish_alignment(ctx, evaluated))
    return {"counts": {"steps": result.steps}, "summary": summary}
