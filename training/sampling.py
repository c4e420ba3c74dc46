"""How a training stage evaluates what it trained: samples of held-out prompts, scored by the pixel oracle.

The teacher stages draw many-step CFG samples (:func:`generate_videos`), the student stages 4-step streaming ones
(:func:`stream_videos`: Algorithm 2 with the KV cache), both from seeded noise for the shapes world's held-out
prompts (:func:`heldout_text`). Videos leave here as ``[B, T, H, W, 3]`` uint8, the oracle's layout;
:func:`alignment_scores` scores them and :func:`publish_alignment` writes and logs the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from infra import storage, tracking
from model.dit import DiT
from model.precision import Precision, default_precision, in_precision
from model.presets import get_preset
from model.schedule import FlowSchedule
from model.streaming import stream, teacher_sample
from model.vae import video_to_pixels
from pipelines.oracle import oracle_alignment
from pipelines.shapes_world import heldout_prompts
from pipelines.workflow import StageContext
from training.harness import log_videos

SAMPLE_SEED = 4321


def prompt_embeddings(
    preset_name: str, captions: Sequence[str], text_path: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Caption embeddings ``[N, L, D]`` float32 and masks ``[N, L]`` with the preset's text encoder."""
    emb, mask = get_preset(preset_name).text_encoder_for(text_path).encode(list(captions))
    return emb.numpy().astype(np.float32), mask.numpy()


@torch.no_grad()
def generate_videos(
    dit: DiT,
    vae: nn.Module,
    text_emb: Tensor,
    text_mask: Tensor,
    latent_shape: Sequence[int],
    *,
    schedule: FlowSchedule,
    steps: int,
    guidance_scale: float,
    seed: int,
    batch_size: int = 16,
    mode: str | None = None,
    precision: Precision | None = None,
) -> np.ndarray:
    """Euler + CFG samples from seeded noise (per batch) for every caption embedding, decoded to pixels.

    ``text_emb [B, L, D]``, ``latent_shape = (F, C, h, w)``; ``mode`` overrides the DiT's attention mode. The
    networks run in ``precision``, the device's default (:func:`model.precision.default_precision`): every stage
    scores its samples alike.
    """
    precision = precision or default_precision(text_emb.device)
    dit, vae = in_precision(dit, precision), in_precision(vae, precision)
    videos = []
    for start in range(0, text_emb.shape[0], batch_size):
        emb, mask = text_emb[start : start + batch_size], text_mask[start : start + batch_size]
        noise = torch.randn((emb.shape[0], *latent_shape), generator=torch.Generator().manual_seed(seed + start))
        x0 = teacher_sample(
            dit, (emb, mask), noise.to(emb.device), schedule, num_steps=steps, guidance_scale=guidance_scale, mode=mode
        ).x0
        videos.append(video_to_pixels(vae.decode(x0)))
    return np.concatenate(videos)


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
    precision: Precision | None = None,
) -> np.ndarray:
    """4-step chunk-by-chunk samples (KV cache, sliding window) of ``latent_frames`` (the training clip's length
    by default), decoded to pixels; the networks run in ``precision`` as in :func:`generate_videos`."""
    precision = precision or default_precision(text_emb.device)
    student, vae = in_precision(student, precision), in_precision(vae, precision)
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
        videos.append(video_to_pixels(torch.cat([c.video for c in chunks], dim=1)))
    return np.concatenate(videos)


def heldout_text(
    preset_name: str, num: int, seed: int, text_path: str | None = None
) -> tuple[list[dict[str, Any]], tuple[np.ndarray, np.ndarray]]:
    """The shapes world's first ``num`` held-out prompts for ``seed`` (the teacher's seed for every model, so all
    are scored on the same captions) and their caption embeddings."""
    prompts = heldout_prompts(num, seed=seed)
    return prompts, prompt_embeddings(preset_name, [p["caption"] for p in prompts], text_path)


def alignment_scores(videos: np.ndarray, prompts: Sequence[dict[str, Any]], **settings: Any) -> dict[str, Any]:
    """The oracle's alignment of samples with their prompts, with the sampling ``settings``, and the first samples."""
    scores = oracle_alignment(videos, prompts)
    scores.update({"prompts": len(prompts), **settings})
    scores["captions"] = [p["caption"] for p in prompts]
    return {"scores": scores, "videos": videos[:8]}


def publish_alignment(ctx: StageContext, evaluated: dict[str, Any]) -> dict[str, Any]:
    """Write a stage's ``eval/alignment.json`` and log its samples (``eval_samples/``); the summary's oracle figures."""
    scores = evaluated["scores"]
    storage.write_json(ctx.output("eval", "alignment.json"), scores)
    fps = get_preset(ctx.config.model.preset).fps
    log_videos(tracking.tracking_uri(ctx.config), ctx.run_id, evaluated["videos"], fps, "eval_samples")
    summary = {f"oracle_{k}": v for k, v in scores.items() if k.endswith("_accuracy") or k == "present"}
    summary["eval_prompts"] = scores["prompts"]
    return summary
