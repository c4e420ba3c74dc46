"""Block-causal self-attention without a dense mask: one attention call per query chunk over the keys it may see.

Frame i sees frame j iff ``j // chunk <= i // chunk`` (and, with a window of W chunks, ``i // chunk - j // chunk <=
W``, plus chunk 0 when it is a sink). The keys a chunk sees are one contiguous run of tokens (two with a sink), so
each chunk attends to slices of the keys with no mask at all: memory stays O(N) at Wan's 32,760 tokens (a boolean
N x N mask alone is 1 GB there and forces SDPA's slow kernel) and every call can take the fused kernels.
:func:`block_causal_mask` and :func:`token_mask` spell out the same rule densely, the reference for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention, in fp32 while a CPU trains under bf16 autocast: there the bf16 flash-attention
    backward runs 2.3 times slower than fp32's, so a tiny DiT's training step gains from autocast (6-28 % over fp32 in
    the teacher stage) only with its attention left in fp32, the matmuls around it still on AMX. GPUs and inference
    keep the inputs' dtype."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def block_causal_mask(
    num_frames: int,
    chunk: int,
    *,
    window_chunks: int | None = None,
    sink: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """Frame-level mask ``[F, F]`` (True = may attend): i sees j iff ``j // chunk <= i // chunk``.

    With ``window_chunks = W`` frame i sees only chunks ``i // chunk - W .. i // chunk`` (plus chunk 0 if ``sink``),
    which is what a KV cache keeping the last W chunks computes.
    """
    c = torch.arange(num_frames, device=device) // chunk
    allowed = c[None, :] <= c[:, None]
    if window_chunks is not None:
        near = c[:, None] - c[None, :] <= window_chunks
        if sink:
            near = near | (c[None, :] == 0)
        allowed = allowed & near
    return allowed


def token_mask(frame_mask: Tensor, tokens_per_frame: int) -> Tensor:
    """Expand a frame mask ``[Fq, Fk]`` to tokens ``[Fq * S, Fk * S]`` (tokens are frame-major)."""
    return frame_mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


@dataclass(frozen=True)
class BlockCausalLayout:
    """Which key tokens each chunk of query frames attends to.

    Keys are ``past_frames`` cached frames (all visible to every new frame) followed by the ``frames`` new ones,
    which start on a chunk boundary; ``window_chunks`` / ``sink`` restrict a forward without a cache.
    """

    frames: int
    chunk_frames: int
    tokens_per_frame: int
    past_frames: int = 0
    window_chunks: int | None = None
    sink: bool = False

    @classmethod
    def of(
        cls,
        frames: int,
        chunk_frames: int,
        tokens_per_frame: int,
        past_frames: int = 0,
        *,
        window_chunks: int | None = None,
        sink: bool = False,
    ) -> BlockCausalLayout | None:
        """The layout, or None when every query sees every key (at most one chunk of new frames, no window)."""
        if frames <= chunk_frames:
            return None
        return cls(frames, chunk_frames, tokens_per_frame, past_frames, window_chunks, sink)

    def chunks(self) -> list[tuple[slice, list[slice]]]:
        """Per query chunk: its slice of the new tokens and the slices of keys (cached + new tokens) it sees."""
        s, k, past = self.tokens_per_frame, self.chunk_frames, self.past_frames
        out = []
        for c in range(-(-self.frames // k)):
            first = 0 if self.window_chunks is None else max(0, c - self.window_chunks)
            keys = [slice(0, past * s)] if past else []
            if self.sink and first > 0:
                keys.append(slice(past * s, (past + k) * s))
            stop = min((c + 1) * k, self.frames)
            keys.append(slice((past + first * k) * s, (past + stop) * s))
            out.append((slice(c * k * s, stop * s), keys))
        return out


def block_causal_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockCausalLayout) -> Tensor:
    """``q [B, H, N, Dh]`` over ``k, v [B, H, N_past + N, Dh]`` as ``layout`` allows.  -> ``[B, H, N, Dh]``."""

    def take(x: Tensor, parts: list[slice]) -> Tensor:
        return x[:, :, parts[0]] if len(parts) == 1 else torch.cat([x[:, :, p] for p in parts], dim=2)

    outs = [
        attention(q[:, :, queries], take(k, keys), take(v, keys))
        for queries, keys in layout.chunks()
    ]
    return torch.cat(outs, dim=2)
