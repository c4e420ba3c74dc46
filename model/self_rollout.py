"""Self-rollout (Self-Forcing, arXiv 2506.08009): the student's own KV-cached few-step rollout as its training input.

Chunk by chunk, the student denoises from noise through its timestep list against the KV cache of its own earlier
clean chunks, exactly as :func:`model.streaming.stream` does at inference; each chunk stops at a randomly drawn exit
step, whose x0 prediction is the chunk's output and the only forward pass that carries gradient. Every other pass
(earlier steps, and the t = 0 pass that appends the chunk to the cache) runs under ``no_grad``, so memory stays that
of one step per chunk while training sees what inference sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from model import schedule as sch
from model.dit import DiT


def draw_exit_steps(num_chunks: int, num_steps: int, *, device: torch.device | str | None = None) -> list[int]:
    """Per chunk, the index of the student step whose prediction is kept (and carries gradient)."""
    return torch.randint(0, num_steps, (num_chunks,), device=device).tolist()


def self_rollout(
    dit: DiT,
    text_emb: Tensor,
    text_mask: Tensor,
    noise: Tensor,
    times: Sequence[float],
    chunk_frames: int,
    exit_steps: Sequence[int],
) -> Tensor:
    """x0 of a block-causal rollout from ``noise [B, F, C, h, w]``: ``[B, F, C, h, w]``, chunk n at ``exit_steps[n]``.

    ``times`` are the student's flow times, noisiest first (``times[0] = 1``).
    """
    cache = dit.new_cache()
    chunks = []
    for n, start in enumerate(range(0, noise.shape[1], chunk_frames)):
        x = noise[:, start : start + chunk_frames]
        for i, t in enumerate(times[: exit_steps[n] + 1]):
            tt = torch.full(x.shape[:2], float(t), device=x.device, dtype=x.dtype)
            with torch.set_grad_enabled(torch.is_grad_enabled() and i == exit_steps[n]):
                x0 = dit.predict_x0(x, tt, text_emb, text_mask, mode="block_causal", cache=cache)
            if i < exit_steps[n]:
                x = sch.add_noise(x0, torch.randn_like(x0), float(times[i + 1]))
        with torch.no_grad():
            dit(x0.detach(), torch.zeros_like(tt), text_emb, text_mask, mode="block_causal", cache=cache, update_cache=True)
        chunks.append(x0)
    return torch.cat(chunks, dim=1)
