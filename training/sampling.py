"""Many-step CFG sampling of a DiT, VAE decoding, and the oracle's text-alignment score of the samples.

Shared by the teacher stages (samples logged during training, the final alignment figure) and by the VAE stage
(round-trip accuracy). Videos leave here as ``[B, T, H, W, 3]`` uint8, the oracle's layout.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.dit import DiT
from model.schedule import FlowSchedule

ORACLE_KEYS = ("color", "shape", "motion", "background")


def to_uint8(video: Tensor) -> np.ndarray:
    """Decoded pixels ``[B, T, 3, H, W]`` in [-1, 1] -> ``[B, T, H, W, 3]`` uint8."""
    pixels = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 1, 3, 4, 2).cpu().numpy()


@torch.no_grad()
def sample_latents(
    dit: DiT,
    text_emb: Tensor,
    text_mask: Tensor,
    latent_shape: Sequence[int],
    *,
    schedule: FlowSchedule,
    steps: int,
    guidance_scale: float,
    seed: int,
    mode: str | None = None,
) -> Tensor:
    """Euler ODE from seeded noise to x0 with CFG.  text_emb: [B, L, D] -> latents [B, F, C, h, w]."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((text_emb.shape[0], *latent_shape), generator=generator)
    noise = noise.to(text_emb.device)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        return dit.guided_velocity(x, t, text_emb, text_mask, guidance_scale, mode=mode)

    return schedule.solve(velocity, noise, steps).x0


@torch.no_grad()
def generate_videos(
    dit: DiT,
    vae: torch.nn.Module,
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
) -> np.ndarray:
    """Samples for every caption embedding, decoded to pixels: ``[B, T, H, W, 3]`` uint8."""
    videos = []
    for start in range(0, text_emb.shape[0], batch_size):
        stop = start + batch_size
        z = sample_latents(
            dit,
            text_emb[start:stop],
            text_mask[start:stop],
            latent_shape,
            schedule=schedule,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed + start,
            mode=mode,
        )
        videos.append(to_uint8(vae.decode(z)))
    return np.concatenate(videos)


def oracle_alignment(videos: np.ndarray, expected: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Fraction of videos whose oracle reading matches the prompt, per attribute, plus the readings themselves."""
    from evaluation.oracle import describe

    found = [describe(video) for video in videos]
    scores: dict[str, Any] = {}
    for key in ORACLE_KEYS:
        pairs = [(f[key], e[key]) for f, e in zip(found, expected) if key in e]
        if pairs:
            scores[f"{key}_accuracy"] = float(np.mean([a == b for a, b in pairs]))
    scores["present"] = float(np.mean([f["present"] for f in found])) if found else 0.0
    scores["detected"] = found
    return scores


def attributes(meta: str) -> dict[str, Any]:
    """The shapes-world attributes carried in a clip's `meta` JSON (empty for captions of other sources)."""
    try:
        value = json.loads(meta) if meta else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def encode_prompts(captions: Sequence[str], kind: str, max_length: int) -> tuple[Tensor, Tensor]:
    """Caption embeddings ``[N, L, D]`` and masks ``[N, L]`` with the preset's text encoder."""
    from model.text import build_text_encoder

    encoder = build_text_encoder(kind, max_length=max_length)
    return encoder.encode(list(captions))
