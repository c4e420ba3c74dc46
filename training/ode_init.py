"""The `ode_init` stage: the block-causal student regresses the teacher's ODE end points (CausVid stage 1).

The student is the teacher's DiT used with the block-causal mask, initialised from the teacher's weights. Each
chunk of each trajectory gets its own timestep from the student's list; the input is the stored ODE state at that
timestep, the target the stored x0: ``L_init = ||G(x_t) - x0||^2``. Afterwards the exported student is scored
by the pixel oracle on 4-step streaming samples of the teacher's held-out prompts (decoded by the VAE), and its
regression loss is measured per timestep. Output: ``model.pt`` (the plain block-causal DiT), ``checkpoints/``,
``eval/alignment.json``, ``eval/regression.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from torch import Tensor, nn

from infra import storage, tracking
from infra.config import StudentConfig
from model.dit import DiT
from model.distillation import chunk_timestep_indices, ode_regression_loss, per_timestep_errors, select_states
from model.presets import get_preset
from pipelines import trajectories
from pipelines.workflow import StageContext
from training import sampling
from training.harness import MODEL_FILE, EngineSet, EngineSpec, Export, Models, TrainJob, TrainTask, fit
from training.weights import load_model, read_payload

SAMPLE_SEED = 4321
REGRESSION_ROWS = 32


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
        b, num_steps, f = states.shape[:3]
        idx = chunk_timestep_indices(b, f, self.chunk_frames, num_steps, device=states.device)
        x_t = select_states(states, idx)
        t = self.student_times.to(x_t.dtype)[idx]
        pred = self.dit.predict_x0(x_t, t, text_emb.to(x_t.dtype), text_mask.bool(), mode="block_causal")
        return ode_regression_loss(pred, x0), per_timestep_errors(pred, x0, idx, num_steps)


def unwrap_dit(module: nn.Module) -> nn.Module:
    return module.dit


def build_student(preset_name: str) -> StudentRegression:
    p = get_preset(preset_name)
    times = p.schedule().student_times(p.student_timesteps)
    return StudentRegression(p.build_dit(attention_mode="block_causal"), times, p.chunk_frames)


@torch.no_grad()
def stream_videos(
    student: DiT,
    vae: nn.Module,
    text_emb: Tensor,
    text_mask: Tensor,
    preset_name: str,
    *,
    latent_frames: int | None = None,
    seed: int = SAMPLE_SEED,
    batch_size: int = 16,
) -> np.ndarray:
    """4-step chunk-by-chunk samples (KV cache, Algorithm 2) decoded to ``[B, T, H, W, 3]`` uint8."""
    from model.streaming import stream

    p = get_preset(preset_name)
    frames, channels, height, width = p.latent_shape(latent_frames)
    videos = []
    for start in range(0, text_emb.shape[0], batch_size):
        emb, mask = text_emb[start : start + batch_size], text_mask[start : start + batch_size]
        chunks = stream(
            student,
            (emb, mask),
            num_chunks=-(-frames // p.chunk_frames),
            latent_shape=(channels, height, width),
            schedule=p.schedule(),
            timesteps=p.student_timesteps,
            window_chunks=p.window_chunks,
            vae=vae,
            generator=torch.Generator().manual_seed(seed + start),
        )
        videos.append(sampling.to_uint8(torch.cat([c.video for c in chunks], dim=1)))
    return np.concatenate(videos)


def student_prompts(config_seed: int, num: int) -> list[dict[str, Any]]:
    """The teacher's held-out evaluation prompts (same seed), so every model is scored on the same captions."""
    from pipelines.shapes_world import heldout_prompts

    return heldout_prompts(num, seed=config_seed)


def evaluate_student(
    model_uri: str, vae_uri: str, preset_name: str, section: StudentConfig, prompt_seed: int
) -> dict[str, Any]:
    """Oracle alignment of 4-step streaming samples for ``section.eval_prompts`` held-out prompts."""
    from training.teacher import prompt_embeddings

    prompts = student_prompts(prompt_seed, section.eval_prompts)
    emb, mask = prompt_embeddings(preset_name, [q["caption"] for q in prompts])
    videos = stream_videos(
        load_model(model_uri, mode="block_causal"),
        load_model(vae_uri),
        torch.from_numpy(emb),
        torch.from_numpy(mask),
        preset_name,
        latent_frames=section.eval_latent_frames,
        batch_size=section.eval_batch_size,
    )
    scores = sampling.oracle_alignment(videos, prompts)
    frames = get_preset(preset_name).latent_shape(section.eval_latent_frames)[0]
    scores.update({"prompts": len(prompts), "steps": len(get_preset(preset_name).student_timesteps), "latent_frames": frames})
    scores["captions"] = [q["caption"] for q in prompts]
    return {"scores": scores, "videos": videos[:8]}


@torch.no_grad()
def regression_per_timestep(model_uri: str, trajectories_uri: str, preset_name: str, rows: int = REGRESSION_ROWS) -> dict[str, float]:
    """``||G(x_t) - x0||^2`` with every frame at one student timestep, for each timestep, over the first rows."""
    p = get_preset(preset_name)
    student = load_model(model_uri, mode="block_causal")
    tables = [storage.read_parquet(uri) for uri in storage.parquet_files(trajectories_uri)]
    batch = trajectories.decode_trajectories(_first_rows(tables, rows))
    states, x0 = torch.from_numpy(batch["states"]), torch.from_numpy(batch["x0"])
    emb, mask = torch.from_numpy(batch["text_emb"]), torch.from_numpy(batch["text_mask"])
    times = p.schedule().student_times(p.student_timesteps)
    out = {}
    for s, name in enumerate(p.student_timesteps):
        t = torch.full(states.shape[:1] + states.shape[2:3], float(times[s]))
        pred = student.predict_x0(states[:, s], t, emb, mask)
        out[f"regression_loss_t{name}"] = float(ode_regression_loss(pred, x0))
    return out


def _first_rows(tables: Sequence[Any], rows: int) -> dict[str, list[Any]]:
    import pyarrow as pa

    return pa.concat_tables(tables).slice(0, rows).to_pydict()


@dataclass
class OdeInitTask(TrainTask):
    """Regression of one engine (`student`); the frozen VAE decodes the logged 4-step samples."""

    preset: str
    lr: float
    weight_decay: float
    init_uri: str
    vae_uri: str | None
    sample_text: tuple[np.ndarray, np.ndarray] | None
    export: Export = Export(engine="student", kind="dit", unwrap=unwrap_dit)

    def plain(self, name: str) -> nn.Module:
        return build_student(self.preset)

    def build(self) -> Models:
        student = self.plain("student")
        student.dit.load_state_dict(read_payload(self.init_uri)["state_dict"])
        frozen = {"vae": load_model(self.vae_uri)} if self.vae_uri else {}
        return Models(engines={"student": EngineSpec(student, lr=self.lr, weight_decay=self.weight_decay)}, frozen=frozen)

    def train_step(self, step: int, batch: dict[str, Tensor], engines: EngineSet, frozen: Mapping[str, nn.Module]) -> dict[str, float]:
        loss, errors = engines["student"](batch["states"], batch["x0"], batch["text_emb"], batch["text_mask"])
        engines.optimize("student", loss)
        names = get_preset(self.preset).student_timesteps
        values = {"loss": float(loss.detach())}
        values.update({f"loss_t{n}": float(e) for n, e in zip(names, errors.tolist()) if np.isfinite(e)})
        return values

    def samples(self, step: int, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module]) -> dict[str, np.ndarray]:
        return sample_videos(self.export.unwrap(models[self.export.engine]), frozen, self.sample_text, self.preset)


def sample_videos(
    student: nn.Module, frozen: Mapping[str, nn.Module], sample_text: tuple[np.ndarray, np.ndarray] | None, preset: str
) -> dict[str, np.ndarray]:
    if sample_text is None or "vae" not in frozen:
        return {}
    emb, mask = (torch.from_numpy(a) for a in sample_text)
    videos = stream_videos(student.eval(), frozen["vae"], emb, mask, preset)
    return {f"prompt{i}": video for i, video in enumerate(videos)}


def sample_text_for(preset_name: str, section: StudentConfig, prompt_seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    from training.teacher import prompt_embeddings

    if not section.sample_prompts:
        return None
    return prompt_embeddings(preset_name, [q["caption"] for q in student_prompts(prompt_seed, section.sample_prompts)])


def teacher_alignment_on(teacher_uri: str, num: int, prompt_seed: int) -> dict[str, float]:
    """The teacher's oracle accuracies on its first ``num`` evaluation prompts (those the students see)."""
    uri = storage.join(teacher_uri, "eval", "alignment.json")
    if not storage.exists(uri):
        return {}
    scores = storage.read_json(uri)
    from pipelines.shapes_world import heldout_prompts

    detected = scores.get("detected", [])[:num]
    expected = heldout_prompts(len(detected), seed=prompt_seed)
    if scores.get("captions", [])[: len(detected)] != [e["caption"] for e in expected]:
        return {}
    out = {f"teacher_oracle_{k}_accuracy": float(np.mean([d[k] == e[k] for d, e in zip(detected, expected)])) for k in sampling.ORACLE_KEYS}
    out["teacher_eval_latent_frames"] = float(scores.get("latent_frames", 0))
    return out


def finish_student(
    ctx: StageContext, section: StudentConfig, model_uri: str, vae_uri: str | None, trajectories_uri: str | None
) -> dict[str, Any]:
    """Shared end of the student stages: per-timestep regression loss and oracle scores, logged and summarised."""
    preset_name = ctx.config.model.preset
    p = get_preset(preset_name)
    use_gpu = section.use_gpu
    summary: dict[str, Any] = {}
    if trajectories_uri:
        regress = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(regression_per_timestep)
        regression = ray.get(regress.remote(model_uri, trajectories_uri, preset_name))
        storage.write_json(ctx.output("eval", "regression.json"), regression)
        summary.update(regression)
    if section.eval_prompts and vae_uri:
        evaluate = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(evaluate_student)
        out = ray.get(evaluate.remote(model_uri, vae_uri, preset_name, section, ctx.config.teacher.seed))
        scores = out["scores"]
        storage.write_json(ctx.output("eval", "alignment.json"), scores)
        from training.teacher import log_videos

        log_videos(tracking.tracking_uri(ctx.config), ctx.run_id, out["videos"], p.fps, "eval_samples")
        summary.update({f"oracle_{k}": v for k, v in scores.items() if k.endswith("_accuracy") or k == "present"})
        summary["eval_prompts"] = scores["prompts"]
        summary.update(teacher_alignment_on(ctx.inputs["teacher"], scores["prompts"], ctx.config.teacher.seed))
    return summary


def train_regression(
    ctx: StageContext, section: StudentConfig, trajectories_uri: str, init_uri: str, vae_uri: str | None
) -> dict[str, Any]:
    """ODE regression on the harness from ``init_uri``; shared with `dmd`'s regression-only ablation."""
    preset_name = ctx.config.model.preset
    task = OdeInitTask(
        preset=preset_name,
        lr=section.lr,
        weight_decay=section.weight_decay,
        init_uri=init_uri,
        vae_uri=vae_uri,
        sample_text=sample_text_for(preset_name, section, ctx.config.teacher.seed),
    )
    job = TrainJob(
        name=ctx.name,
        output_uri=ctx.output_uri,
        section=section,
        task=task,
        dataset=trajectories.training_dataset(trajectories_uri),
        preset=preset_name,
        tracking_uri=tracking.tracking_uri(ctx.config),
        run_id=ctx.run_id,
        fps=get_preset(preset_name).fps,
        extra={"stage": ctx.name, "fingerprint": ctx.fingerprint, "init": init_uri},
    )
    result = fit(job)
    summary: dict[str, Any] = {"model": result.model_uri, "init": init_uri, "train_seconds": round(result.seconds, 1)}
    summary.update({f"final_{k}": v for k, v in result.metrics.items() if k == "loss" or k.startswith("loss_t")})
    summary.update(finish_student(ctx, section, result.model_uri, vae_uri, trajectories_uri))
    return {"counts": {"steps": result.steps}, "summary": summary}


def vae_of(teacher_uri: str, latents_uri: str | None = None) -> str | None:
    """The VAE that encoded the teacher's latents (from the latents manifest), if known."""
    from training.teacher import vae_uri_of

    if latents_uri is None:
        latents_uri = storage.read_manifest(teacher_uri).get("inputs", {}).get("latents")
    if not latents_uri:
        return None
    vae = vae_uri_of(latents_uri)
    return vae if vae and vae != "None" else None


def run(ctx: StageContext) -> dict[str, Any]:
    teacher_uri = ctx.inputs["teacher"]
    init = storage.join(teacher_uri, MODEL_FILE)
    return train_regression(ctx, ctx.config.ode_init, ctx.inputs["trajectories"], init, vae_of(teacher_uri))
