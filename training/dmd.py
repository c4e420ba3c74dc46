"""The `dmd` stage: asymmetric distribution matching distillation (CausVid stage 2, Algorithm 1).

Two DeepSpeed engines: the generator (the block-causal student, from the ODE-initialised weights or, with
``dmd.ode_init = false``, the teacher's) and the critic (the fake score, a copy of the real score trained online
with the flow-matching loss on the generator's detached samples). The real score is frozen: the bidirectional
teacher (``dmd.teacher = bidirectional``) or the block-causal many-step teacher (``causal``), with CFG.

One training step = ``critic_steps`` critic updates, each on its own fresh batch, then (after
``critic_warmup_steps`` critic-only steps) one generator update on another batch: real latents are noised chunk by
chunk to timesteps drawn from the student's list (with ``clean_context``, t = 0 too: clean context chunks, masked
from the loss), or the generator rolls itself out (``rollout = self``, Self-Forcing); the generator predicts x0,
x0 is noised to one random t in [t_min, t_max] (shifted), and the DMD gradient of :mod:`model.distillation`
reaches the generator through its surrogate loss, plus ``regression_weight`` times the ODE-regression loss (then
the stage trains on the trajectories, whose x0 are the clean latents, as CausVid does). The real score's guidance
``guidance_scale`` defaults to 0.75 of the trajectories' (CausVid: 4.5 against 6.0). ``dmd.teacher = none`` is the
regression-only ablation: ODE regression continues on the trajectories of the `ode_init` stage, without DMD.

``causvid sweep configs/sweep_table4.yaml`` runs the paper's Table 4 on the shapes world (:mod:`training.sweep`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from einops import rearrange
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
from model.self_rollout import draw_exit_steps, self_rollout
from model.vae import video_to_pixels
from model.weights import MODEL_FILE, build_from_payload, read_payload
from pipelines import trajectories
from pipelines.latents import training_dataset
from pipelines.workflow import StageContext, vae_of
from training.harness import EngineSet, EngineSpec, Export, Models, TrainTask, fit, stage_job, unwrap_dit
from training.regression import regression_on_states, train_regression
from training.scoreboard import publish_scoreboard
from training.student_evaluation import StudentCurve, curve_for, curve_scores, finish_student, sample_text_for, sample_videos
from training.weight_average import WeightAverage, update_gathered

REAL_SCORE_MODE = {"bidirectional": "bidirectional", "causal": "block_causal"}


class Generator(nn.Module):
    """The causal student as DMD trains it: ``forward(latents [B, F, C, h, w], text) -> (x0, loss_frames [B, F])``.

    ``rollout = "data"``: each chunk of the clean latents is noised to its own timestep from the student's list
    (t = 1 is pure noise), and with ``clean_context`` also to t = 0, where the chunk stays clean: context for the
    chunks after it, as inference's KV cache is, and masked from the loss (``loss_frames`` false). ``"self"``: x0 is
    the student's own KV-cached rollout from noise (:mod:`model.self_rollout`). With ``states`` (trajectories)
    ``forward`` returns the ODE-regression loss instead. With ``ema_decay`` a moving average of the weights rides
    along (``ema``, :class:`~training.weight_average.WeightAverage`) and is what the stage evaluates and exports.
    """

    def __init__(
        self,
        dit: DiT,
        student_times: Tensor,
        chunk_frames: int,
        ema_decay: float | None = None,
        clean_context: bool = False,
        rollout: str = "data",
    ) -> None:
        super().__init__()
        self.dit = dit
        self.chunk_frames = chunk_frames
        self.clean_context = clean_context
        self.rollout = rollout
        self.register_buffer("student_times", student_times.float().clone())
        self.ema = WeightAverage(dit, ema_decay) if ema_decay else None

    def forward(
        self, latents: Tensor, text_emb: Tensor, text_mask: Tensor, states: Tensor | None = None
    ) -> tuple[Tensor, Tensor] | Tensor:
        emb, mask = text_emb.to(latents.dtype), text_mask.bool()
        if states is not None:
            return regression_on_states(self.dit, self.student_times, self.chunk_frames, states, latents, emb, mask)[0]
        b, f = latents.shape[:2]
        if self.rollout == "self":
            times = self.student_times.tolist()
            exits = draw_exit_steps(-(-f // self.chunk_frames), len(times), device=latents.device)
            x0 = self_rollout(self.dit, emb, mask, torch.randn_like(latents), times, self.chunk_frames, exits)
            return x0, torch.ones(b, f, dtype=torch.bool, device=latents.device)
        times = self.student_times.to(latents.dtype)
        if self.clean_context:
            times = torch.cat([times, times.new_zeros(1)])
        idx = chunk_timestep_indices(b, f, self.chunk_frames, len(times), device=latents.device)
        t = times[idx]
        x_t = sch.add_noise(latents, torch.randn_like(latents), t)
        x0 = self.dit.predict_x0(x_t, t, emb, mask, mode="block_causal")
        return x0, t > 0


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


def real_x0(real: DiT, x_t: Tensor, t: Tensor, text_emb: Tensor, text_mask: Tensor, mode: str, guidance_scale: float) -> Tensor:
    """The real score's x0 prediction with classifier-free guidance.  x_t: [B, F, C, h, w], t: [B, F]."""
    v = real.guided_velocity(x_t, t, text_emb.to(x_t.dtype), text_mask.bool(), guidance_scale, mode=mode)
    return sch.velocity_to_x0(x_t, v, t)


DIAGNOSTICS_ARTIFACT = "diagnostics/x0_real_fake"
DIAGNOSTICS_SEED = 4321
DIAGNOSTICS_TIMESTEP = 500
REAL_SCORE_GUIDANCE_RATIO = 0.75
"""CausVid's real-score guidance against its ODE pairs' (4.5 against 6.0, both in the standard CFG form)."""


def real_score_guidance(section: DmdConfig, trajectories_scale: float) -> float:
    return REAL_SCORE_GUIDANCE_RATIO * trajectories_scale if section.guidance_scale is None else section.guidance_scale


def split_rows(batch: Mapping[str, Tensor], parts: int) -> list[dict[str, Tensor]]:
    """A step's rows as ``parts`` consecutive batches of equal size (the harness draws them all at once)."""
    size = len(next(iter(batch.values()))) // parts
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(parts)]


def latent_channel_stats(x0: Tensor, prefix: str) -> dict[str, Tensor]:
    """Per-channel mean and std of latents ``[B, F, C, h, w]``: a drift in colour or saturation shows here first."""
    flat = x0.detach().float().transpose(0, 2).flatten(1)
    out = {f"{prefix}_c{c}_mean": m for c, m in enumerate(flat.mean(1))}
    out.update({f"{prefix}_c{c}_std": sd for c, sd in enumerate(flat.std(1))})
    return out


def bucket_edges(buckets: int) -> list[float]:
    return [i / buckets for i in range(buckets + 1)]


def bucket_name(edges: Sequence[float], j: int) -> str:
    return f"critic_loss_t{round(edges[j] * 100):02d}_{round(edges[j + 1] * 100):02d}"


@dataclass
class DmdTask(TrainTask):
    """Generator and critic engines; the frozen real score and VAE ride along.

    A step draws ``1 + critic_steps`` batches (one with ``fresh_critic_batches = false``): the critic updates
    each on its own, then the generator on the first, so the critic never fits the very prompts and clips the
    generator is then judged on. The first ``critic_warmup_steps`` steps update the critic only.
    """

    preset: str
    teacher_mode: str
    generator_init: str
    real_uri: str
    vae_uri: str | None
    section: DmdConfig
    guidance_scale: float
    sample_text: tuple[np.ndarray, np.ndarray] | None
    curve: StudentCurve | None = None
    export: Export = Export(engine="generator", kind="dit", unwrap=unwrap_dit)
    _fixed: dict[str, Tensor] | None = field(default=None, init=False, repr=False)
    _figures: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def batches_per_step(self) -> int:
        return 1 + self.section.critic_steps if self.section.fresh_critic_batches else 1

    def plain(self, name: str) -> nn.Module:
        p = get_preset(self.preset)
        s = self.section
        if name == "generator":
            times = p.schedule().student_times(p.student_timesteps)
            dit = p.build_dit(attention_mode="block_causal")
            return Generator(dit, times, p.chunk_frames, s.ema_decay, clean_context=s.clean_context, rollout=s.rollout)
        mode = REAL_SCORE_MODE[self.teacher_mode]
        return FakeScore(p.build_dit(attention_mode=mode), mode, p.shift, s.t_min, s.t_max)

    def build(self) -> Models:
        s = self.section
        generator = self.plain("generator")
        generator.dit.load_state_dict(read_payload(self.generator_init)["state_dict"])
        if generator.ema is not None:
            generator.ema.module.load_state_dict(generator.dit.state_dict())
        real_payload = read_payload(self.real_uri)
        critic = self.plain("critic")
        critic.dit.load_state_dict(real_payload["state_dict"])
        frozen: dict[str, nn.Module] = {"real": build_from_payload(real_payload, REAL_SCORE_MODE[self.teacher_mode])}
        if self.vae_uri:
            frozen["vae"] = build_from_payload(read_payload(self.vae_uri))
        return Models(
            engines={
                "generator": EngineSpec(generator, lr=s.lr, weight_decay=s.weight_decay),
                "critic": EngineSpec(critic, lr=s.critic_lr or s.lr, weight_decay=s.weight_decay),
            },
            frozen=frozen,
        )

    def clean_latents(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The data the generator's inputs are noised from: the clips' latents, or the trajectories' x0."""
        latents = batch["x0"] if "x0" in batch else batch["latents"]
        return latents[:, : get_preset(self.preset).clip_latent_frames]

    def critic_update(self, batch: Mapping[str, Tensor], engines: EngineSet) -> tuple[Tensor, Tensor]:
        """One flow-matching update of the critic on the generator's detached samples of ``batch``."""
        emb, mask = batch["text_emb"], batch["text_mask"]
        with torch.no_grad():
            fake, _ = engines["generator"](self.clean_latents(batch), emb, mask)
        losses, t_drawn = engines["critic"](fake.detach(), emb, mask)
        engines.optimize("critic", losses.mean())
        return losses.detach(), t_drawn.detach()

    def generator_update(
        self, step: int, batch: Mapping[str, Tensor], engines: EngineSet, frozen: Mapping[str, nn.Module]
    ) -> dict[str, Tensor]:
        """One DMD update of the generator on ``batch`` (plus the ODE-regression anchor when weighted)."""
        s = self.section
        p = get_preset(self.preset)
        emb, mask = batch["text_emb"], batch["text_mask"]
        generator, critic = engines["generator"], engines["critic"]
        x0, loss_frames = generator(self.clean_latents(batch), emb, mask)
        b, f = x0.shape[:2]
        t = sample_dmd_times(b, p.schedule(), s.t_min, s.t_max, device=x0.device).to(x0.dtype)
        t_frames = t[:, None].expand(b, f)
        x_t = sch.add_noise(x0.detach(), torch.randn_like(x0), t_frames)
        with torch.no_grad():
            x0_real = real_x0(frozen["real"], x_t, t_frames, emb, mask, REAL_SCORE_MODE[self.teacher_mode], self.guidance_scale)
            x0_fake = critic(x0.detach(), emb, mask, x_t=x_t, t=t_frames)
        grad = dmd_gradient(x0, x0_real, x0_fake, loss_frames)
        distribution = dmd_loss(x0, grad, loss_frames).float()
        loss = distribution
        values = {"dmd_loss": distribution.detach(), "dmd_grad_norm": grad.detach().flatten(1).norm(dim=1).mean()}
        if s.regression_weight:
            regression = generator(self.clean_latents(batch), emb, mask, states=batch["states"])
            loss = loss + s.regression_weight * regression
            values["regression_loss"] = regression.detach()
        engines.optimize("generator", loss)
        if generator.module.ema is not None:
            update_gathered(generator.module.ema, generator.module.dit, engines.zero_stage)
        values["generator_loss"] = loss.detach()
        if s.diagnostics_every and step % s.diagnostics_every == 0:
            for name, tensor in (("data", self.clean_latents(batch)), ("x0", x0), ("x0_real", x0_real), ("x0_fake", x0_fake)):
                values.update(latent_channel_stats(tensor, f"diag/{name}"))
            if "vae" in frozen:
                self._fixed = self._fixed or {k: v[:1].clone() for k, v in batch.items()}
                self._figures = {DIAGNOSTICS_ARTIFACT: self.diagnostic_figure(self._fixed, engines, frozen)}
        return values

    @torch.no_grad()
    def diagnostic_figure(self, batch: Mapping[str, Tensor], engines: EngineSet, frozen: Mapping[str, nn.Module]) -> np.ndarray:
        """Decoded x0, x0_real and x0_fake of one fixed sample, noised to a fixed t with a fixed seed: rows x0,
        real, fake; columns the pixel frames. Where real and fake agree the critic has caught up; where x0 and
        real differ, DMD pulls."""
        p = get_preset(self.preset)
        latents = self.clean_latents(batch)
        emb, mask = batch["text_emb"], batch["text_mask"]
        with torch.random.fork_rng(devices=[latents.device] if latents.is_cuda else []):
            torch.manual_seed(DIAGNOSTICS_SEED)
            x0, _ = engines["generator"](latents, emb, mask)
            t = torch.full(x0.shape[:2], float(p.schedule().time_of(DIAGNOSTICS_TIMESTEP)), device=x0.device, dtype=x0.dtype)
            x_t = sch.add_noise(x0, torch.randn_like(x0), t)
        mode = REAL_SCORE_MODE[self.teacher_mode]
        x0_real = real_x0(frozen["real"], x_t, t, emb, mask, mode, self.guidance_scale)
        x0_fake = engines["critic"](x0, emb, mask, x_t=x_t, t=t)
        video = frozen["vae"].decode(torch.cat([x0, x0_real, x0_fake]).float())
        return rearrange(video_to_pixels(video), "r t h w c -> (r h) (t w) c")

    def figures(self, step: int) -> Mapping[str, np.ndarray]:
        figures, self._figures = self._figures, {}
        return figures

    def train_step(self, step: int, batch: dict[str, Tensor], engines: EngineSet, frozen: Mapping[str, nn.Module]) -> dict[str, Tensor | float]:
        s = self.section
        parts = split_rows(batch, self.batches_per_step())
        critic_batches = parts[1:] or parts * s.critic_steps
        critic_losses, critic_times = zip(*(self.critic_update(part, engines) for part in critic_batches))
        all_losses, all_times = torch.cat(critic_losses), torch.cat(critic_times)
        values: dict[str, Tensor | float] = {"critic_loss": all_losses.mean()}
        edges = bucket_edges(s.t_buckets)
        for j, (mean, _count) in bucket_means(all_losses, all_times, edges).items():
            values[bucket_name(edges, j)] = mean
        if step >= s.critic_warmup_steps:
            values.update(self.generator_update(step, parts[0], engines, frozen))
        return values

    def samples(self, step: int, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module]) -> dict[str, np.ndarray]:
        return sample_videos(self.export.unwrap(models["generator"]), frozen, self.sample_text, self.preset)

    def learning_curve(self, step: int, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module]) -> dict[str, float]:
        """The curve of the generator's EMA (what is exported and evaluated) where it keeps one."""
        return curve_scores(self.export.unwrap(models["generator"]), frozen, self.curve, self.preset)


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
    generator_init, vae_uri, trajectories_uri = _inputs(ctx)
    if section.teacher == "none":
        result = train_regression(ctx, section, trajectories_uri, generator_init, vae_uri)
        result["summary"].update({"teacher": "none", "ode_init": section.ode_init, **publish_scoreboard(ctx)})
        return result
    real_stage = "teacher" if section.teacher == "bidirectional" else "causal_teacher"
    trajectories_scale = storage.read_manifest(trajectories_uri)["summary"]["cfg_scale"]
    guidance_scale = real_score_guidance(section, trajectories_scale)
    task = DmdTask(
        preset=preset_name,
        teacher_mode=section.teacher,
        generator_init=generator_init,
        real_uri=storage.join(ctx.inputs[real_stage], MODEL_FILE),
        vae_uri=vae_uri,
        section=section,
        guidance_scale=guidance_scale,
        sample_text=sample_text_for(preset_name, section, ctx.config.teacher.seed, ctx.config.model.text_path),
        curve=curve_for(preset_name, section, ctx.config.teacher.seed, ctx.config.model.text_path),
    )
    if section.regression_weight:
        dataset = trajectories.training_dataset(trajectories_uri)
    else:
        dataset = training_dataset(ctx.inputs["latents"])
    result = fit(stage_job(ctx, section, task, dataset, teacher=section.teacher, ode_init=section.ode_init))
    summary: dict[str, Any] = {
        "model": result.model_uri,
        "init": generator_init,
        "teacher": section.teacher,
        "ode_init": section.ode_init,
        "guidance_scale": guidance_scale,
        "rollout": section.rollout,
        "train_seconds": round(result.seconds, 1),
    }
    summary.update(
        {f"final_{k}": v for k, v in result.metrics.items() if k in ("generator_loss", "dmd_loss", "regression_loss", "critic_loss", "dmd_grad_norm")}
    )
    summary.update(finish_student(ctx, section, result.model_uri, vae_uri, trajectories_uri))
    summary.update(publish_scoreboard(ctx))
    return {"counts": {"steps": result.steps, "critic_updates": result.steps * section.critic_steps}, "summary": summary}

