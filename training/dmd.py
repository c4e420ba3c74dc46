"""The `dmd` stage: asymmetric distribution matching distillation (CausVid stage 2, Algorithm 1).

Two DeepSpeed engines: the generator (the block-causal student, from the ODE-initialised weights or, with
``dmd.ode_init = false``, the teacher's) and the critic (the fake score, a copy of the real score trained online
with the flow-matching loss on the generator's detached samples). The real score is frozen: the bidirectional
teacher (``dmd.teacher = bidirectional``) or the block-causal many-step teacher (``causal``), with CFG.

One training step = ``critic_steps`` critic updates, each on a fresh generator sample, then one generator update:
real latents are noised chunk by chunk to timesteps drawn from the student's list, the generator predicts x0,
x0 is noised to one random t in [t_min, t_max] (shifted), and the DMD gradient of :mod:`model.distillation`
reaches the generator through its surrogate loss. ``dmd.teacher = none`` is the regression-only ablation: ODE
regression continues on the trajectories of the `ode_init` stage, without DMD.

``causvid sweep configs/sweep_table4.yaml`` runs the paper's Table 4 on the shapes world (:mod:`training.sweep`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from infra import storage
from infra.config import DmdConfig
from model import schedule as sch
from model.dit import DiT
from model.distillation import (
    bucket_means,
    chunk_timestep_indices,
    critic_loss,
    dmd_gradient,
    dmd_loss,
    sample_dmd_times,
)
from model.presets import get_preset
from model.weights import MODEL_FILE, build_from_payload, read_payload
from pipelines.latents import training_dataset
from pipelines.workflow import StageContext, vae_of
from training.harness import EngineSet, EngineSpec, Export, Models, TrainTask, fit, stage_job
from training.regression import train_regression
from training.student_evaluation import finish_student, sample_text_for, sample_videos

REAL_SCORE_MODE = {"bidirectional": "bidirectional", "causal": "block_causal"}


class Generator(nn.Module):
    """The causal student as DMD trains it: ``forward(latents [B, F, C, h, w], text) -> x0 [B, F, C, h, w]``.

    Each chunk of the clean latents is noised to its own timestep from the student's list (t = 1 is pure noise)
    and the student predicts x0. With ``ema_decay`` an exponential moving average of the weights rides along
    (``ema``, frozen) and is what the stage exports.
    """

    def __init__(self, dit: DiT, student_times: Tensor, chunk_frames: int, ema_decay: float | None = None) -> None:
        super().__init__()
        self.dit = dit
        self.chunk_frames = chunk_frames
        self.ema_decay = ema_decay
        self.register_buffer("student_times", student_times.float().clone())
        self.ema = copy.deepcopy(dit).requires_grad_(False) if ema_decay else None

    def forward(self, latents: Tensor, text_emb: Tensor, text_mask: Tensor) -> Tensor:
        b, f = latents.shape[:2]
        idx = chunk_timestep_indices(b, f, self.chunk_frames, len(self.student_times), device=latents.device)
        t = self.student_times.to(latents.dtype)[idx]
        x_t = sch.add_noise(latents, torch.randn_like(latents), t)
        return self.dit.predict_x0(x_t, t, text_emb.to(latents.dtype), text_mask.bool(), mode="block_causal")

    @torch.no_grad()
    def update_ema(self, gathered: bool = True) -> None:
        """``ema <- decay * ema + (1 - decay) * weights``; under ZeRO-3 call it inside a parameter gather."""
        if self.ema is None or self.ema_decay is None:
            return
        for e, p in zip(self.ema.parameters(), self.dit.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1.0 - self.ema_decay)


class FakeScore(nn.Module):
    """The critic. ``forward(x0, text)`` -> per-sample flow-matching loss ``[B]`` and the times ``[B]`` it drew;
    ``forward(x0, text, x_t=x_t, t=t)`` -> its x0 prediction at ``x_t`` (no CFG)."""

    def __init__(self, dit: DiT, mode: str, shift: float, t_min: float, t_max: float) -> None:
        super().__init__()
        self.dit = dit
        self.mode = mode
        self.schedule = sch.FlowSchedule(shift=shift)
        self.t_min, self.t_max = t_min, t_max

    def forward(
        self, x0: Tensor, text_emb: Tensor, text_mask: Tensor, x_t: Tensor | None = None, t: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        text_emb, text_mask = text_emb.to(x0.dtype), text_mask.bool()
        if x_t is not None and t is not None:
            return self.dit.predict_x0(x_t, t, text_emb, text_mask, mode=self.mode)
        b, f = x0.shape[:2]
        t_sample = sample_dmd_times(b, self.schedule, self.t_min, self.t_max, device=x0.device).to(x0.dtype)
        eps = torch.randn_like(x0)
        t_frames = t_sample[:, None].expand(b, f)
        v = self.dit(sch.add_noise(x0, eps, t_frames), t_frames, text_emb, text_mask, mode=self.mode)
        return critic_loss(v, x0, eps), t_sample


def unwrap_generator(module: nn.Module) -> nn.Module:
    return module.ema if module.ema is not None else module.dit


def real_x0(real: DiT, x_t: Tensor, t: Tensor, text_emb: Tensor, text_mask: Tensor, mode: str, cfg_scale: float) -> Tensor:
    """The real score's x0 prediction with classifier-free guidance.  x_t: [B, F, C, h, w], t: [B, F]."""
    v = real.guided_velocity(x_t, t, text_emb.to(x_t.dtype), text_mask.bool(), cfg_scale, mode=mode)
    return sch.velocity_to_x0(x_t, v, t)


def bucket_edges(buckets: int) -> list[float]:
    return [i / buckets for i in range(buckets + 1)]


def bucket_name(edges: Sequence[float], j: int) -> str:
    return f"critic_loss_t{round(edges[j] * 100):02d}_{round(edges[j + 1] * 100):02d}"


@dataclass
class DmdTask(TrainTask):
    """Generator and critic engines; the frozen real score and VAE ride along."""

    preset: str
    teacher_mode: str
    generator_init: str
    real_uri: str
    vae_uri: str | None
    section: DmdConfig
    cfg_scale: float
    sample_text: tuple[np.ndarray, np.ndarray] | None
    export: Export = Export(engine="generator", kind="dit", unwrap=unwrap_generator)

    def plain(self, name: str) -> nn.Module:
        p = get_preset(self.preset)
        if name == "generator":
            times = p.schedule().student_times(p.student_timesteps)
            return Generator(p.build_dit(attention_mode="block_causal"), times, p.chunk_frames, self.section.ema_decay)
        mode = REAL_SCORE_MODE[self.teacher_mode]
        return FakeScore(p.build_dit(attention_mode=mode), mode, p.shift, self.section.t_min, self.section.t_max)

    def build(self) -> Models:
        s = self.section
        generator = self.plain("generator")
        generator.dit.load_state_dict(read_payload(self.generator_init)["state_dict"])
        if generator.ema is not None:
            generator.ema.load_state_dict(generator.dit.state_dict())
        real_payload = read_payload(self.real_uri)
        critic = self.plain("critic")
        critic.dit.load_state_dict(real_payload["state_dict"])
        frozen: dict[str, nn.Module] = {"real": build_from_payload(real_payload, REAL_SCORE_MODE[self.teacher_mode])}
        if self.vae_uri:
            frozen["vae"] = build_from_payload(read_payload(self.vae_uri))
        return Models(
            engines={
                "generator": EngineSpec(generator, lr=s.lr, weight_decay=s.weight_decay),
                "critic": EngineSpec(critic, lr=s.critic_lr, weight_decay=s.weight_decay),
            },
            frozen=frozen,
        )

    def train_step(self, step: int, batch: dict[str, Tensor], engines: EngineSet, frozen: Mapping[str, nn.Module]) -> dict[str, Tensor | float]:
        s = self.section
        p = get_preset(self.preset)
        latents = batch["latents"][:, : p.clip_latent_frames]
        emb, mask = batch["text_emb"], batch["text_mask"]
        generator, critic = engines["generator"], engines["critic"]

        critic_losses, critic_times = [], []
        for _ in range(s.critic_steps):
            with torch.no_grad():
                fake = generator(latents, emb, mask)
            losses, t_drawn = critic(fake.detach(), emb, mask)
            engines.optimize("critic", losses.mean())
            critic_losses.append(losses.detach())
            critic_times.append(t_drawn.detach())

        x0 = generator(latents, emb, mask)
        b, f = x0.shape[:2]
        t = sample_dmd_times(b, p.schedule(), s.t_min, s.t_max, device=x0.device).to(x0.dtype)
        t_frames = t[:, None].expand(b, f)
        x_t = sch.add_noise(x0.detach(), torch.randn_like(x0), t_frames)
        with torch.no_grad():
            x0_real = real_x0(frozen["real"], x_t, t_frames, emb, mask, REAL_SCORE_MODE[self.teacher_mode], self.cfg_scale)
            x0_fake = critic(x0.detach(), emb, mask, x_t=x_t, t=t_frames)
        grad = dmd_gradient(x0, x0_real, x0_fake)
        loss = dmd_loss(x0, grad).float()
        engines.optimize("generator", loss)
        self._update_ema(generator.module, engines.zero_stage)

        all_losses, all_times = torch.cat(critic_losses), torch.cat(critic_times)
        values = {
            "generator_loss": loss.detach(),
            "critic_loss": all_losses.detach().mean(),
            "dmd_grad_norm": grad.detach().flatten(1).norm(dim=1).mean(),
        }
        edges = bucket_edges(s.t_buckets)
        for j, (mean, _count) in bucket_means(all_losses, all_times, edges).items():
            values[bucket_name(edges, j)] = mean
        return values

    @staticmethod
    def _update_ema(module: Generator, zero_stage: int) -> None:
        if module.ema is None:
            return
        if zero_stage == 3:
            import deepspeed

            params = [*module.dit.parameters(), *module.ema.parameters()]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                module.update_ema()
        else:
            module.update_ema()

    def samples(self, step: int, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module]) -> dict[str, np.ndarray]:
        return sample_videos(self.export.unwrap(models["generator"]), frozen, self.sample_text, self.preset)


def _inputs(ctx: StageContext) -> tuple[str, str | None, str]:
    """Generator initial weights, the VAE, and the ODE-init stage's trajectories."""
    section = ctx.config.dmd
    ode_init_uri = ctx.inputs["ode_init"]
    generator_init = storage.join(ode_init_uri if section.ode_init else ctx.inputs["teacher"], MODEL_FILE)
    trajectories_uri = storage.read_manifest(ode_init_uri)["inputs"]["trajectories"]
    return generator_init, vae_of(ctx.inputs["latents"]), trajectories_uri


def run(ctx: StageContext) -> dict[str, Any]:
    section = ctx.config.dmd
    preset_name = ctx.config.model.preset
    p = get_preset(preset_name)
    generator_init, vae_uri, trajectories_uri = _inputs(ctx)
    if section.teacher == "none":
        result = train_regression(ctx, section, trajectories_uri, generator_init, vae_uri)
        result["summary"].update({"teacher": "none", "ode_init": section.ode_init})
        return result
    real_stage = "teacher" if section.teacher == "bidirectional" else "causal_teacher"
    cfg_scale = p.guidance_scale if section.cfg_scale is None else section.cfg_scale
    task = DmdTask(
        preset=preset_name,
        teacher_mode=section.teacher,
        generator_init=generator_init,
        real_uri=storage.join(ctx.inputs[real_stage], MODEL_FILE),
        vae_uri=vae_uri,
        section=section,
        cfg_scale=cfg_scale,
        sample_text=sample_text_for(preset_name, section, ctx.config.teacher.seed, ctx.config.model.text_path),
    )
    dataset = training_dataset(ctx.inputs["latents"])
    result = fit(stage_job(ctx, section, task, dataset, teacher=section.teacher, ode_init=section.ode_init))
    summary: dict[str, Any] = {
        "model": result.model_uri,
        "init": generator_init,
        "teacher": section.teacher,
        "ode_init": section.ode_init,
        "cfg_scale": cfg_scale,
        "train_seconds": round(result.seconds, 1),
    }
    summary.update(
        {f"final_{k}": v for k, v in result.metrics.items() if k in ("generator_loss", "critic_loss", "dmd_grad_norm")}
    )
    summary.update(finish_student(ctx, section, result.model_uri, vae_uri, trajectories_uri))
    return {"counts": {"steps": result.steps, "critic_updates": result.steps * section.critic_steps}, "summary": summary}

