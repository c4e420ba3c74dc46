"""The zero-shot applications, measured with the shapes world's pixel oracle.

- dynamic prompting: after a switch at second s to a prompt with another colour, shape and motion, the fraction of
  frames whose colour, shape and motion all match the new prompt, per second after s (how fast it follows), and
  the fraction still showing the old colour (whether the old prompt comes back);
- image-to-video: the first second keeps the image's colour and shape, and the object starts where it was;
- video-to-video: with a recolouring prompt, the output keeps the input's object track (centroid error in pixels)
  while taking the prompt's colour;
- speed: latency to the first output frame and output frames per second of each mode.

The scoring functions take frames (``[T, H, W, 3]`` uint8) and attributes, so they are exact on constructed
videos; :func:`measure` runs the four modes on held-out prompts and :func:`run_applications` is the evaluate
stage's "applications" section (``applications.json`` and MLflow metrics ``applications/...``).
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from evaluation.checkpoint import Checkpoint
from evaluation.generate import Frames, Generator, timing
from evaluation.request import Request
from infra import storage
from model.weights import MODEL_FILE
from pipelines.oracle import classify_motion, detect_frames
from pipelines.shapes_world import MOTIONS, OBJECT_COLORS, SHAPES, ShapeClip, heldout_prompts, render
from pipelines.video import encode_mp4
from pipelines.workflow import StageContext

log = logging.getLogger("causvid")

MODES = ("text_to_video", "dynamic_prompting", "image_to_video", "video_to_video")


def _next(options: tuple[str, ...] | list[str], value: str) -> str:
    return options[(list(options).index(value) + 1) % len(options)]


def clip_of(prompt: dict[str, Any]) -> ShapeClip:
    return ShapeClip(**{k: prompt[k] for k in ("shape", "color", "background", "motion", "period", "phase")})


def switched(clip: ShapeClip) -> ShapeClip:
    """The same scene with another colour, shape and motion: every attribute the follow rate checks changes."""
    return ShapeClip(
        _next(SHAPES, clip.shape), _next(list(OBJECT_COLORS), clip.color), clip.background,
        _next(MOTIONS, clip.motion), clip.period, clip.phase,
    )


def recoloured(clip: ShapeClip) -> ShapeClip:
    return ShapeClip(clip.shape, _next(list(OBJECT_COLORS), clip.color), clip.background, clip.motion, clip.period, clip.phase)


def follow_curves(
    frames: np.ndarray, fps: float, switch_second: float, new: dict[str, str], old: dict[str, str]
) -> dict[str, list[float]]:
    """Per whole second after ``switch_second``: the fraction of frames matching the new prompt's colour, shape,
    motion (the second's centroid track) and all three (``follow``), and the fraction showing the old colour."""
    det = detect_frames(frames)
    per_second = max(1, int(round(fps)))
    first = int(math.ceil(switch_second * fps - 1e-9))
    curves: dict[str, list[float]] = {"follow": [], "color": [], "shape": [], "motion": [], "old_color": []}
    for start in range(first, len(frames) - per_second + 1, per_second):
        window = slice(start, start + per_second)
        color = np.array([c == new["color"] for c in det.color[window]])
        shape = np.array([s == new["shape"] for s in det.shape[window]])
        motion = classify_motion(det.centroid[window]) == new["motion"]
        curves["color"].append(float(color.mean()))
        curves["shape"].append(float(shape.mean()))
        curves["motion"].append(float(motion))
        curves["follow"].append(float((color & shape).mean() * motion))
        curves["old_color"].append(float(np.mean([c == old["color"] for c in det.color[window]])))
    return curves


def follow_summary(curves: dict[str, list[float]], threshold: float = 0.5) -> dict[str, float | None]:
    """Scalars of the follow curves: the mean follow rate, the whole seconds after the switch before it first
    reaches ``threshold``, and the most frames showing the old colour in any later second (None where the
    rollout never follows, so that JSON and MLflow carry no NaN)."""
    follow = curves["follow"]
    reached = [i for i, value in enumerate(follow) if value >= threshold]
    later = curves["old_color"][reached[0] :] if reached else []
    return {
        "follow_mean": float(np.mean(follow)) if follow else None,
        "seconds_to_follow": float(reached[0]) if reached else None,
        "old_color_after_follow": float(max(later)) if later else None,
    }


def image_keeping(frames: np.ndarray, fps: float, image: np.ndarray, expected: dict[str, str]) -> dict[str, float]:
    """How the first second of an image-to-video rollout keeps the image: colour and shape rates, the object's
    distance (px) from the image's position in the first frame and in the first generated frame, and the largest
    centroid step between consecutive frames of the first second (a jump shows there)."""
    window = frames[: max(2, int(round(fps)))]
    det = detect_frames(window)
    origin = detect_frames(image[None]).centroid[0]

    def distance(a: np.ndarray, b: np.ndarray) -> float:
        d = float(np.linalg.norm(a - b))
        return d if math.isfinite(d) else math.nan

    steps = np.linalg.norm(np.diff(det.centroid, axis=0), axis=-1)
    return {
        "color_keep": float(np.mean([c == expected["color"] for c in det.color])),
        "shape_keep": float(np.mean([s == expected["shape"] for s in det.shape])),
        "present": float(det.present.mean()),
        "first_frame_error_px": distance(det.centroid[0], origin),
        "next_frame_error_px": distance(det.centroid[1], origin),
        "max_step_px": float(np.nanmax(steps)) if np.isfinite(steps).any() else math.nan,
    }


def recolouring(source: np.ndarray, output: np.ndarray, color: str, shape: str) -> dict[str, float]:
    """Video-to-video with a recolouring prompt: mean centroid distance (px) between output and input over frames
    where both show the object, the fraction of output frames in the prompt's colour, and keeping the shape."""
    n = min(len(source), len(output))
    src, out = detect_frames(source[:n]), detect_frames(output[:n])
    errors = np.linalg.norm(out.centroid - src.centroid, axis=-1)
    both = np.isfinite(errors)
    return {
        "centroid_error_px": float(errors[both].mean()) if both.any() else math.nan,
        "tracked": float(both.mean()),
        "recolor_rate": float(np.mean([c == color for c in out.color])),
        "shape_keep": float(np.mean([s == shape for s in out.shape])),
    }


def _run(generator: Generator, request: Request) -> tuple[np.ndarray, dict[str, float]]:
    chunks: list[Frames] = list(generator.chunks(request))
    return np.concatenate([c.frames for c in chunks]), timing(chunks)


def measure(
    generator: Generator,
    *,
    num_prompts: int,
    seconds: float,
    switch_second: float,
    strength: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Run every mode on ``num_prompts`` held-out prompts and score it; means over prompts (curves per second)."""
    fps, size = generator.preset.fps, generator.preset.height
    dynamic: list[dict[str, list[float]]] = []
    images: list[dict[str, float]] = []
    videos: list[dict[str, float]] = []
    speed: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for i, prompt in enumerate(heldout_prompts(num_prompts, seed=seed)):
            clip = clip_of(prompt)
            frames, timed = _run(generator, Request(clip.caption, seconds=seconds, seed=seed + i))
            speed["text_to_video"].append(timed)

            new = switched(clip)
            request = Request(clip.caption, seconds=seconds, prompt_at=((switch_second, new.caption),), seed=seed + i)
            frames, timed = _run(generator, request)
            speed["dynamic_prompting"].append(timed)
            dynamic.append(follow_curves(frames, fps, switch_second, new.attributes(), clip.attributes()))

            source = render(clip, size=size, fps=fps, seconds=seconds)
            frames, timed = _run(generator, Request(clip.caption, seconds=seconds, image=source[0], seed=seed + i))
            speed["image_to_video"].append(timed)
            images.append(image_keeping(frames, fps, source[0], clip.attributes()))

            path = Path(tmp, f"input_{i}.mp4")
            path.write_bytes(encode_mp4(source, fps))
            target = recoloured(clip)
            request = Request(target.caption, video=path, strength=strength, seed=seed + i)
            frames, timed = _run(generator, request)
            speed["video_to_video"].append(timed)
            videos.append({**recolouring(source, frames, target.color, target.shape), "strength": strength})
    curves = _mean_curves(dynamic)
    return {
        "prompts": num_prompts,
        "seconds": seconds,
        "dynamic_prompting": {"switch_second": switch_second, **curves, **follow_summary(curves)},
        "image_to_video": _mean(images),
        "video_to_video": _mean(videos),
        "speed": {mode: _mean(rows) for mode, rows in speed.items()},
    }


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.nanmean([row[key] for row in rows])) if rows else math.nan for key in (rows[0] if rows else {})}


def _mean_curves(runs: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Per-second means over runs, cut to the shortest."""
    out: dict[str, list[float]] = {}
    for key in runs[0] if runs else {}:
        length = min(len(run[key]) for run in runs)
        out[key] = np.mean([run[key][:length] for run in runs], axis=0).tolist() if length else []
    return out


def measure_checkpoint(model_uri: str, vae_uri: str, settings: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure` for the student at ``model_uri`` (one CPU thread, as the evaluate stage's rollouts)."""
    import torch

    torch.set_num_threads(1)
    generator = Generator.load(Checkpoint(model_uri, vae_uri))
    return measure(generator, **settings)


def flat_metrics(figures: dict[str, Any]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``applications/<section>/<name>`` scalars, and the per-second curves (step = seconds after the switch)."""
    scalars: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    for section, values in figures.items():
        if not isinstance(values, dict):
            continue
        for name, value in values.items():
            key = f"applications/{section}/{name}"
            if isinstance(value, dict):
                scalars.update({f"{key}/{k}": float(v) for k, v in value.items() if _finite(v)})
            elif isinstance(value, list):
                curves[key] = [float(v) for v in value]
            elif _finite(value):
                scalars[key] = float(value)
    return scalars, curves


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def log_figures(figures: dict[str, Any]) -> None:
    """Into the active MLflow run: every scalar, every per-second curve, and ``applications.json``."""
    scalars, curves = flat_metrics(figures)
    mlflow.log_metrics(scalars)
    for key, values in curves.items():
        for second, value in enumerate(values):
            mlflow.log_metric(key, value, step=second)
    mlflow.log_dict(figures, "applications.json")


def run_applications(ctx: StageContext) -> dict[str, Any]:
    """The evaluate stage's applications section for the DMD student: a Ray task measures, the driver writes
    ``applications.json`` beside ``summary.json`` and logs to the stage's MLflow run."""
    import ray

    cfg = ctx.config.evaluate
    settings = {
        "num_prompts": cfg.applications_prompts,
        "seconds": cfg.applications_seconds,
        "switch_second": cfg.applications_seconds / 2,
        "strength": cfg.applications_strength,
        "seed": cfg.seed,
    }
    model_uri = storage.join(ctx.inputs["dmd"], MODEL_FILE)
    vae_uri = storage.join(ctx.inputs["vae"], MODEL_FILE)
    figures = ray.get(ray.remote(num_cpus=1)(measure_checkpoint).remote(model_uri, vae_uri, settings))
    storage.write_json(ctx.output("applications.json"), figures)
    if mlflow.active_run() is not None:
        log_figures(figures)
    log.info("evaluate applications: %s", {k: v for k, v in flat_metrics(figures)[0].items() if "speed" in k})
    return figures
