"""The `evaluate` stage: long rollouts of every model under test, scored second by second.

Models: the DMD student and the ODE-init student stream with a KV cache and a sliding window (4 steps
per chunk); the causal teacher streams with many Euler steps per chunk; the bidirectional teacher
samples clips of its own training length, as the quality reference. Each (model, prompt) rollout is a
Ray task that renders, decodes, scores (oracle + weight-free metrics) and writes its MP4; the driver
aggregates curves, drift summaries, plots and `summary.json`, and logs every per-second metric to
MLflow with step = second of video.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import ray
import torch

from evaluation import drift
from evaluation.metrics import ClipScorer, weight_free_metrics
from infra import storage
from infra.errors import UserError
from model.presets import get_preset
from model.streaming import stream, teacher_sample
from model.vae import video_to_pixels
from model.weights import MODEL_FILE, load_model
from pipelines.oracle import OBJECT_KEYS, ORACLE_KEYS, score_video
from pipelines.video import encode_mp4
from pipelines.workflow import EVALUATED_MODELS, StageContext, vae_of

log = logging.getLogger("causvid")


@dataclass(frozen=True)
class RolloutSpec:
    """One rollout: which model, which prompt, how long, and how to sample it."""

    model: str
    weights_uri: str
    vae_uri: str
    preset: str
    prompt_index: int
    caption: str
    expected: dict[str, Any] | None
    text_emb: np.ndarray
    text_mask: np.ndarray
    seconds: float
    seed: int
    causal_teacher_steps: int
    guidance_scale: float
    clip_checkpoint: str | None = None


def render(spec: RolloutSpec) -> tuple[np.ndarray, float]:
    """Sample one rollout; returns its frames and the seconds spent generating them."""
    torch.set_num_threads(1)
    preset = get_preset(spec.preset)
    vae = load_model(spec.vae_uri)
    text = (torch.tensor(spec.text_emb)[None], torch.tensor(spec.text_mask)[None])  # copies: Ray hands read-only arrays
    generator = torch.Generator().manual_seed(spec.seed)
    schedule = preset.schedule()
    started = time.perf_counter()
    if spec.model == "teacher":
        model = load_model(spec.weights_uri, mode="bidirectional")
        f, c, h, w = preset.latent_shape()
        noise = torch.randn((1, f, c, h, w), generator=generator)
        latents = teacher_sample(
            model, text, noise, schedule, num_steps=preset.teacher_steps, guidance_scale=spec.guidance_scale
        ).x0
        frames = video_to_pixels(vae.decode(latents)[0])
        return frames, time.perf_counter() - started
    model = load_model(spec.weights_uri, mode="block_causal")
    _, c, h, w = preset.latent_shape()
    many_step = spec.model == "causal_teacher"
    chunks = stream(
        model,
        text,
        num_chunks=preset.chunks_for(spec.seconds),
        latent_shape=(c, h, w),
        schedule=schedule,
        timesteps=preset.student_timesteps,
        sampler="euler" if many_step else "student",
        num_steps=spec.causal_teacher_steps,
        guidance_scale=spec.guidance_scale if many_step else 1.0,
        window_chunks=preset.window_chunks,
        vae=vae,
        generator=generator,
    )
    frames = np.concatenate([video_to_pixels(chunk.video[0]) for chunk in chunks])
    return frames[: preset.frames_for(spec.seconds)], time.perf_counter() - started


def score(frames: np.ndarray, fps: float, expected: dict[str, Any] | None) -> dict[str, list[float]]:
    """Per-second curves: oracle correctness, persistence, crispness (shapes-world prompts only, whose ``expected``
    attributes the oracle checks), and the weight-free metrics."""
    if expected is None:
        return weight_free_metrics(frames, fps)
    rows = score_video(frames, fps, expected)
    curves = {f"{key}_acc": [float(row[f"{key}_ok"]) for row in rows] for key in OBJECT_KEYS}
    curves["persistence"] = [row["persistence"] for row in rows]
    curves["crispness"] = [row["crispness"] for row in rows]
    curves.update(weight_free_metrics(frames, fps))
    return curves


@ray.remote(num_cpus=1)
def rollout_task(spec: RolloutSpec, output_uri: str, fps: int) -> dict[str, Any]:
    """Render, score and store one rollout; the MP4 and a contact sheet go under `videos/`."""
    frames, seconds = render(spec)
    curves = score(frames, fps, spec.expected)
    if spec.clip_checkpoint:
        curves.update(ClipScorer.from_checkpoint(spec.clip_checkpoint).per_second(frames, fps, spec.caption))
    name = f"{spec.model}_{spec.prompt_index:03d}"
    storage.write_bytes(storage.join(output_uri, "videos", f"{name}.mp4"), encode_mp4(frames, fps))
    storage.write_bytes(storage.join(output_uri, "videos", f"{name}.png"), contact_sheet(frames, fps))
    return {
        "model": spec.model,
        "prompt_index": spec.prompt_index,
        "caption": spec.caption,
        "curves": curves,
        "render_seconds": seconds,
        "frames": len(frames),
    }


def contact_sheet(frames: np.ndarray, fps: int, columns: int = 10) -> bytes:
    """One frame per second in a grid, as PNG bytes: the whole rollout at a glance."""
    import io

    from PIL import Image

    picks = frames[:: max(1, fps)]
    rows = int(np.ceil(len(picks) / columns))
    h, w = frames.shape[1:3]
    sheet = np.zeros((rows * h, min(columns, len(picks)) * w, 3), np.uint8)
    for i, frame in enumerate(picks):
        r, c = divmod(i, columns)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = frame
    buffer = io.BytesIO()
    Image.fromarray(sheet).save(buffer, format="PNG")
    return buffer.getvalue()


def mean_curves(results: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """{model: {metric: per-second mean over prompts}}; curves are cut to the shortest rollout of the model."""
    out: dict[str, dict[str, list[float]]] = {}
    for model in dict.fromkeys(r["model"] for r in results):
        runs = [r["curves"] for r in results if r["model"] == model]
        out[model] = {}
        for metric in runs[0]:
            length = min(len(run[metric]) for run in runs)
            out[model][metric] = np.mean([run[metric][:length] for run in runs], axis=0).tolist() if length else []
    return out


def summarize(per_second: dict[str, dict[str, list[float]]], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The `summary.json` schema: per model, overall scores and drift ratios per metric, each ratio with its
    bootstrap interval over the model's rollouts."""
    models: dict[str, Any] = {}
    for model, curves in per_second.items():
        stats = drift.summarize_curves(curves)
        runs = [r for r in results if r["model"] == model]
        entry: dict[str, Any] = {metric: stats[metric]["mean"] for metric in curves}
        entry["drift_ratio"] = {metric: stats[metric]["ratio"] for metric in curves}
        entry["drift_ratio_interval"] = {
            metric: drift.ratio_interval([r["curves"][metric] for r in runs]) for metric in curves
        }
        entry["drift_slope"] = {metric: stats[metric]["slope"] for metric in curves}
        entry["seconds_of_video"] = len(next(iter(curves.values()), []))
        entry["render_seconds"] = float(np.mean([r["render_seconds"] for r in runs]))
        entry["generated_fps"] = float(np.mean([r["frames"] / r["render_seconds"] for r in runs]))
        models[model] = entry
    return {"models": models}


def _prompts(ctx: StageContext) -> list[dict[str, Any]]:
    from pipelines.shapes_world import heldout_prompts

    cfg = ctx.config.evaluate
    preset = get_preset(ctx.config.model.preset)
    if cfg.prompts_file:
        lines = storage.read_bytes(cfg.prompts_file).decode().splitlines()
        prompts: list[dict[str, Any]] = [{"caption": line.strip()} for line in lines if line.strip()][: cfg.num_prompts]
        if not prompts:
            raise UserError(f"evaluate.prompts_file: {cfg.prompts_file} holds no captions")
    else:
        prompts = heldout_prompts(cfg.num_prompts, seed=cfg.seed)
    encoder = preset.text_encoder_for(ctx.config.model.text_path)
    emb, mask = encoder.encode([str(p["caption"]) for p in prompts])
    for prompt, e, m in zip(prompts, emb.numpy(), mask.numpy(), strict=True):
        prompt["text_emb"], prompt["text_mask"] = e.astype(np.float32), m.astype(bool)
    return prompts


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.config.evaluate
    preset = get_preset(ctx.config.model.preset)
    prompts = _prompts(ctx)
    if not cfg.clip_checkpoint:
        log.info("no CLIP checkpoint configured (evaluate.clip_checkpoint): CLIP metrics are skipped")
    elif not storage.exists(cfg.clip_checkpoint):
        raise UserError(f"evaluate.clip_checkpoint: no file at {cfg.clip_checkpoint}; give a local open_clip checkpoint")
    vae_uri = vae_of(ctx.inputs["teacher"]) or storage.join(ctx.inputs["vae"], MODEL_FILE)  # an imported one's own
    specs = [
        RolloutSpec(
            model=model,
            weights_uri=storage.join(ctx.inputs[stage], MODEL_FILE),
            vae_uri=vae_uri,
            preset=preset.name,
            prompt_index=i,
            caption=str(prompt["caption"]),
            expected={k: prompt[k] for k in ORACLE_KEYS} if all(k in prompt for k in ORACLE_KEYS) else None,
            text_emb=prompt["text_emb"],
            text_mask=prompt["text_mask"],
            seconds=cfg.seconds,
            seed=cfg.seed + i,
            causal_teacher_steps=cfg.causal_teacher_steps,
            guidance_scale=preset.guidance_scale,
            clip_checkpoint=cfg.clip_checkpoint,
        )
        for model, stage in EVALUATED_MODELS.items()
        if model in cfg.models
        for i, prompt in enumerate(prompts)
    ]
    pending = [rollout_task.remote(spec, ctx.output_uri, preset.fps) for spec in specs]
    results = []
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        results.extend(ray.get(done))
        log.info("evaluate: %d/%d rollouts scored", len(results), len(specs))
    results.sort(key=lambda r: (list(EVALUATED_MODELS).index(r["model"]), r["prompt_index"]))
    per_second = mean_curves(results)
    summary = summarize(per_second, results)
    summary["clip_metrics"] = bool(cfg.clip_checkpoint)
    _publish(ctx, per_second, summary, results)
    if cfg.applications:
        from evaluation.applications import run_applications

        run_applications(ctx)
    return {
        "counts": {"rollouts": len(results), "models": len(per_second), "prompts": len(prompts)},
        "summary": {
            f"{model}.{key}": value
            for model, entry in summary["models"].items()
            for key, value in entry.items()
            if isinstance(value, float)
        },
    }


def _publish(
    ctx: StageContext, per_second: dict[str, dict[str, list[float]]], summary: dict[str, Any], results: list[dict]
) -> None:
    """summary.json, per-second curves, drift plots and a table beside the videos; all of it into MLflow."""
    storage.write_json(ctx.output("summary.json"), summary)
    storage.write_json(ctx.output("per_second.json"), per_second)
    storage.write_json(ctx.output("rollouts.json"), [{k: v for k, v in r.items() if k != "curves"} for r in results])
    table = drift.markdown_table(drift.summary_rows(summary["models"]))
    storage.write_bytes(ctx.output("summary_table.md"), (table + "\n").encode())
    with tempfile.TemporaryDirectory() as tmp:
        plots = drift.plot_all(per_second, Path(tmp) / "plots")
        for plot in plots:
            storage.upload_file(plot, ctx.output("plots", plot.name))
        if mlflow.active_run() is None:
            return
        for model, curves in per_second.items():
            for metric, values in curves.items():
                for second, value in enumerate(values):
                    mlflow.log_metric(f"{model}/{metric}", float(value), step=second)
        mlflow.log_artifacts(str(Path(tmp) / "plots"), "plots")
        mlflow.log_dict(summary, "summary.json")
        mlflow.log_text(table, "summary_table.md")
        for name in storage.list_files(ctx.output("videos")):
            local = Path(tmp) / Path(name).name
            local.write_bytes(storage.read_bytes(name))
            mlflow.log_artifact(str(local), "videos")
    log.info("evaluate summary\n%s", json.dumps(summary["models"], indent=1)[:2000])
