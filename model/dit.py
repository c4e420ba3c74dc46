"""Video diffusion transformer (Wan2.1-style DiT) shared by teacher, critic and student.

Latents are ``[B, F, C, H, W]``; tokens are ``1 x 2 x 2`` (by default) latent patches in (frame, row, column) order.
Each latent frame carries its own flow time ``t [B, F]`` (chunks may sit at different noise levels), fed to the
blocks by adaLN modulation. Self-attention is ``bidirectional`` or ``block_causal`` (frame i sees frame j iff
``j // chunk <= i // chunk``, computed chunk by chunk without a dense mask, see :mod:`model.attention`); the output
is the flow velocity ``eps - x0`` (see :mod:`model.schedule`).

Incremental inference uses a :class:`KVCache`: one forward per chunk attends to the cached keys/values of earlier
clean chunks; a forward with ``update_cache=True`` (the clean pass at t = 0) appends the chunk. Positions are
relative to the cache start (the oldest kept chunk, or the sink): the cached frames take frame positions ``0..n-1``
and the new chunk ``n..``. With a window of W chunks of k frames the largest position is ``(W + 1) * k - 1``, so a
rollout of any length stays inside the range seen in training whenever ``(W + 1) * k`` is at most the training
clip's latent frames. Rotary scores depend only on position differences, so without a sink this equals absolute
positions exactly. Cached keys are kept rotated: when the window drops a chunk, the keys after it are rotated back
by its frames once, so no step re-rotates the cache. Without gradients the cache also keeps the caption's
cross-attention keys and values, computed once while the caption stays the same tensor.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model import schedule
from model.attention import BlockCausalLayout, attention, block_causal_attention
from model.text import check_text_width

ATTENTION_MODES = ("bidirectional", "block_causal")
ARCHITECTURES = ("causvid", "wan2.1")
"""``causvid``: a linear patch embedding, cross-attention masked to the caption's tokens, a learned null caption.
``wan2.1``: Wan2.1's exact layout (a Conv3d patch embedding, cross-attention over every position of the padded
text, the encoded empty prompt as the null caption, held fixed), so its weights load one to one."""


@dataclass(frozen=True)
class DiTConfig:
    """Shape of the transformer; the defaults are Wan2.1-T2V-1.3B's."""

    in_channels: int = 16
    dim: int = 1536
    depth: int = 30
    heads: int = 12
    ffn_dim: int = 8960
    text_dim: int = 4096
    freq_dim: int = 256
    patch: tuple[int, int, int] = (1, 2, 2)
    chunk_frames: int = 3
    attention_mode: str = "bidirectional"
    rope_theta: float = 10000.0
    null_text_len: int = 1
    eps: float = 1e-6
    architecture: str = "causvid"
    pooled_text: bool = False
    """Add the caption's mean token, through a zero-initialised MLP, to the timestep embedding: the adaLN
    conditioning of many DiTs, which reaches every token's modulation, where cross-attention alone leaves a
    caption's global attributes (a motion's direction) to be read token by token."""
    absolute_positions: bool = False
    """Add fixed 2D sine-cosine positions (DiT's) to the patch tokens, the same in every frame. Rotary attention
    tells a token only its offsets to the others, which say little of where it is in the middle of the frame; with
    the positions the tiny teacher learns earlier and draws every prompted bounce on its axis (README)."""

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if (self.dim // self.heads) % 2:
            raise ValueError("head dim must be even for rotary embedding")
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {self.attention_mode!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.absolute_positions and self.architecture == "wan2.1":
            raise ValueError("absolute_positions is for the causvid architecture; Wan2.1's layout has rotary positions only")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


KeysValues = tuple[Tensor, Tensor]
"""Attention keys and values, each ``[B, heads, N, head_dim]``."""


@dataclass
class LayerKV:
    """Cached keys/values of one layer: ``[B, heads, N, head_dim]``, keys rotated at their cache positions."""

    k: Tensor | None = None
    v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> None:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)

    def drop_tokens(self, start: int, stop: int, rotary: Tensor) -> None:
        """Drop tokens ``start:stop`` and rotate the keys after them by ``rotary`` (``[1, head_dim // 2, 2]``)."""
        assert self.k is not None and self.v is not None
        self.k = torch.cat([self.k[:, :, :start], apply_rope(self.k[:, :, stop:], rotary)], dim=2)
        self.v = torch.cat([self.v[:, :, :start], self.v[:, :, stop:]], dim=2)


@dataclass
class KVCache:
    """Per-layer keys/values of earlier clean chunks, bounded to the last ``window_chunks`` chunks.

    With ``sink`` the first chunk ever cached stays as an attention sink and counts towards the window.
    """

    layers: list[LayerKV]
    window_chunks: int | None = None
    sink: bool = False
    chunk_frames: list[int] = field(default_factory=list)
    tokens_per_frame: int = 0
    chunks_seen: int = 0
    text: tuple[Tensor, Tensor, int] | None = None
    text_kv: list[KeysValues] = field(default_factory=list)

    @classmethod
    def empty(cls, depth: int, window_chunks: int | None = None, sink: bool = False) -> KVCache:
        if window_chunks is not None and window_chunks < (2 if sink else 1):
            raise ValueError(f"window_chunks={window_chunks} leaves no recent chunk (sink={sink})")
        return cls(layers=[LayerKV() for _ in range(depth)], window_chunks=window_chunks, sink=sink)

    @property
    def num_frames(self) -> int:
        return sum(self.chunk_frames)

    def caption_kv(self, text: Tensor, mask: Tensor) -> list[KeysValues] | None:
        """The kept per-layer cross-attention keys/values if they were made from this very caption, else None."""
        if self.text is None:
            return None
        kept_text, kept_mask, version = self.text
        same = kept_text is text and kept_mask is mask and version == text._version + mask._version
        return self.text_kv if same else None

    def keep_caption_kv(self, text: Tensor, mask: Tensor, kv: list[KeysValues]) -> None:
        self.text, self.text_kv = (text, mask, text._version + mask._version), kv

    def commit(self, frames: int, tokens_per_frame: int, frame_rotary: Callable[[int], Tensor]) -> None:
        """Record a chunk of ``frames`` frames whose keys every layer has just appended, then evict; the keys
        after an evicted chunk move back by its frames (``frame_rotary(shift)``: the rotary of a frame shift)."""
        if self.tokens_per_frame and tokens_per_frame != self.tokens_per_frame:
            raise ValueError("chunk resolution differs from the cached chunks")
        self.tokens_per_frame = tokens_per_frame
        self.chunk_frames.append(frames)
        self.chunks_seen += 1
        while self.window_chunks is not None and len(self.chunk_frames) > self.window_chunks:
            idx = 1 if self.sink else 0
            start = sum(self.chunk_frames[:idx]) * tokens_per_frame
            stop = start + self.chunk_frames[idx] * tokens_per_frame
            rotary = frame_rotary(-self.chunk_frames[idx])
            for layer in self.layers:
                layer.drop_tokens(start, stop, rotary)
            del self.chunk_frames[idx]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalised and scaled in fp32, returned in ``x``'s dtype: under autocast the fp32 weight no longer
        promotes the queries and keys to fp32, so bf16 flows on."""
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Rotary pairs given to (frame, row, column): the frame axis takes the remainder, as in Wan."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_angles(frames: Tensor, rows: int, cols: int, head_dim: int, theta: float) -> Tensor:
    """Angles ``[len(frames) * rows * cols, head_dim // 2]`` for tokens in (frame, row, column) order
    (``rows = cols = 1``: row and column 0, a pure shift along frames)."""
    device = frames.device
    parts = []
    for n_pairs, pos in zip(
        rope_split(head_dim),
        (frames.double(), torch.arange(rows, device=device).double(), torch.arange(cols, device=device).double()),
    ):
        inv_freq = theta ** (-torch.arange(n_pairs, device=device, dtype=torch.float64) / n_pairs)
        parts.append(pos[:, None] * inv_freq[None, :])
    f, h, w = len(frames), rows, cols
    grid = torch.cat(
        [
            parts[0][:, None, None, :].expand(f, h, w, -1),
            parts[1][None, :, None, :].expand(f, h, w, -1),
            parts[2][None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    )
    return grid.reshape(f * h * w, -1).float()


def rope_rotary(angles: Tensor) -> Tensor:
    """Cosines and sines ``[N, Dh // 2, 2]`` of ``angles``: computed once per forward, shared by every layer.
    Real, not complex, so a compiled block fuses the rotation (inductor generates no code for complex numbers)."""
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: Tensor, rotary: Tensor) -> Tensor:
    """Rotate adjacent pairs of ``x [B, H, N, Dh]`` (in fp32) by ``rotary [N, Dh // 2, 2]``; also
    ``x [B, N, H * Dh]`` by ``rotary`` tiled over the heads, which needs no copy into head-major order."""
    re, im = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rotary.unbind(-1)
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).type_as(x)


@functools.cache
def sincos_grid(dim: int, rows: int, cols: int) -> Tensor:
    """DiT's fixed 2D positions ``[rows * cols, dim]`` in fp64 (column first, then row), made once per grid:
    every streamed chunk's forward reads them, and making them (80 us) costs more than adding them."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid

    row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return get_2d_sincos_pos_embed_from_grid(dim, torch.stack([col, row]).double())


def pooled_caption(text: Tensor, mask: Tensor) -> Tensor:
    """Mean of a caption's real tokens, ``text [B, L, D]`` under ``mask [B, L]`` -> ``[B, D]`` (zero if none)."""
    weights = mask.to(text.dtype)[..., None]
    return (text * weights).sum(1) / weights.sum(1).clamp(min=1)


def modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN per latent frame, in one kernel: tokens ``h [B, F * S, D]``, ``shift``/``scale [B, F, 1, D]``."""
    b, f = shift.shape[:2]
    return torch.addcmul(shift, h.view(b, f, -1, h.shape[-1]), 1 + scale).view_as(h)


def add_gated(x: Tensor, h: Tensor, gate: Tensor) -> Tensor:
    """``x + h * gate`` in one kernel, with a per-frame ``gate [B, F, 1, D]`` over tokens ``[B, F * S, D]``."""
    b, f = gate.shape[:2]
    return torch.addcmul(x.view(b, f, -1, x.shape[-1]), h.view(b, f, -1, h.shape[-1]), gate).view_as(x)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of flow times ``t [...]`` scaled to 0..1000: ``[..., dim]`` (cos first, as in Wan)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float64) / half)
    args = (t.double() * schedule.TIMESTEP_SCALE)[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).float()


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)

    def forward(
        self,
        x: Tensor,
        rotary: Tensor,
        layout: BlockCausalLayout | None,
        cache: LayerKV | None,
        update_cache: bool,
    ) -> Tensor:
        """``x: [B, N, D]``; ``rotary [N, head_dim // 2, 2]`` at the N new tokens' positions; ``layout`` restricts
        which keys each chunk's queries see (None: all)."""
        split = "b n (h d) -> b h n d"
        tiled = rotary.repeat(1, self.heads, 1)
        q = rearrange(apply_rope(self.norm_q(self.q(x)), tiled), split, h=self.heads)
        k = rearrange(apply_rope(self.norm_k(self.k(x)), tiled), split, h=self.heads)
        v = rearrange(self.v(x), split, h=self.heads)
        k_all, v_all = k, v
        if cache is not None and cache.k is not None:
            k_all = torch.cat([cache.k, k], dim=2)
            v_all = torch.cat([cache.v, v], dim=2)
        if cache is not None and update_cache:
            cache.append(k, v)
        if layout is None:
            out = attention(q, k_all, v_all)
        else:
            out = block_causal_attention(q, k_all, v_all, layout)
        return self.o(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttention(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.masked = cfg.architecture == "causvid"
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)

    def keys_values(self, context: Tensor) -> KeysValues:
        """Keys and values of the caption ``context [B, L, D]``: the same for every step while the caption holds."""
        split = "b n (h d) -> b h n d"
        return rearrange(self.norm_k(self.k(context)), split, h=self.heads), rearrange(self.v(context), split, h=self.heads)

    def forward(self, x: Tensor, context_kv: KeysValues, context_mask: Tensor) -> Tensor:
        """``x: [B, N, D]``, ``context_kv`` of the caption, ``context_mask: [B, L]`` (True = real token; unused by
        Wan, whose queries see the padded positions too)."""
        q = rearrange(self.norm_q(self.q(x)), "b n (h d) -> b h n d", h=self.heads)
        k, v = context_kv
        mask = context_mask[:, None, None, :] if self.masked else None
        out = attention(q, k, v, attn_mask=mask)
        return self.o(rearrange(out, "b h n d -> b n (h d)"))


class DiTBlock(nn.Module):
    """Self-attention, cross-attention, MLP; the first and last modulated per latent frame (adaLN-Zero gates)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.zeros(1, 1, 6, cfg.dim))

    def forward(
        self,
        x: Tensor,
        e: Tensor,
        context_kv: KeysValues,
        context_mask: Tensor,
        rotary: Tensor,
        layout: BlockCausalLayout | None,
        cache: LayerKV | None,
        update_cache: bool,
    ) -> Tensor:
        """``x: [B, N, D]`` with N = F * S tokens; ``e: [B, F, 6, D]`` per-frame modulation."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e).unsqueeze(3).unbind(2)

        h = self.self_attn(modulate(self.norm1(x), shift1, scale1), rotary, layout, cache, update_cache)
        x = add_gated(x, h, gate1)
        x = x + self.cross_attn(self.norm3(x), context_kv, context_mask)
        return add_gated(x, self.ffn(modulate(self.norm2(x), shift2, scale2)), gate2)


class DiT(nn.Module):
    """Flow-velocity transformer. ``forward(x [B, F, C, H, W], t [B, F], text [B, L, text_dim], mask [B, L])``.

    The attention mode is the ``attention_mode`` attribute (from the config) or a forward argument, so a student is
    the teacher's state dict loaded into a model used in ``block_causal`` mode.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.attention_mode = cfg.attention_mode
        self.gradient_checkpointing = False
        pt, ph, pw = cfg.patch
        if cfg.architecture == "wan2.1":
            self.patch_embed: nn.Module = nn.Conv3d(cfg.in_channels, cfg.dim, cfg.patch, stride=cfg.patch)
        else:
            self.patch_embed = nn.Linear(cfg.in_channels * pt * ph * pw, cfg.dim)
        self.text_embed = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embed = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.text_pool: nn.Module | None = None
        if cfg.pooled_text:
            self.text_pool = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.head_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head_modulation = nn.Parameter(torch.zeros(1, 1, 2, cfg.dim))
        self.head = nn.Linear(cfg.dim, cfg.in_channels * pt * ph * pw)
        self.null_text_embedding = nn.Parameter(
            torch.zeros(cfg.null_text_len, cfg.text_dim), requires_grad=cfg.architecture == "causvid"
        )
        self.initialize()

    def initialize(self, adaln_zero: bool = True) -> None:
        """Xavier linears; with ``adaln_zero`` every gate and the output start at zero (DiT), else random (Wan)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if self.cfg.architecture == "causvid":
            nn.init.normal_(self.null_text_embedding, std=0.02)
        if self.text_pool is not None:
            nn.init.zeros_(self.text_pool[-1].weight)  # starts as the timestep-only model
        modulations = [self.head_modulation, *(b.modulation for b in self.blocks)]
        if adaln_zero:
            for p in [*modulations, self.time_proj[-1].weight, self.head.weight]:
                nn.init.zeros_(p)
        else:
            for p in modulations:
                nn.init.normal_(p, std=self.cfg.dim**-0.5)

    def compile_blocks(self) -> None:
        """Compile each transformer block (the blocks share one graph per input shape): fuses the norms,
        modulations and rotary embedding around the small matmuls that bound a streamed chunk's forward. Compiling
        the whole forward gains no more and recompiles for every cache length."""
        for block in self.blocks:
            block.compile(dynamic=False)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def set_null_text(self, emb: Tensor, mask: Tensor) -> None:
        """Hold an encoded caption ``emb [L, text_dim]`` with ``mask [L]`` (Wan: the empty prompt) as the null one."""
        self.null_text_embedding.copy_(emb * mask[:, None])

    def null_text(self, batch_size: int, length: int | None = None) -> tuple[Tensor, Tensor]:
        """Null caption for classifier-free guidance: ``emb [B, L, text_dim]``, ``mask [B, L]``.

        Padded with zeros (masked out) to ``length`` so it can stand in for a batch of captions of that length.
        """
        n = self.cfg.null_text_len
        length = n if length is None else length
        if length < n:
            raise ValueError(f"length {length} is shorter than the null embedding ({n})")
        emb = F.pad(self.null_text_embedding, (0, 0, 0, length - n)).expand(batch_size, -1, -1)
        mask = torch.zeros(batch_size, length, dtype=torch.bool, device=emb.device)
        mask[:, :n] = True
        return emb, mask

    def drop_text(self, text: Tensor, text_mask: Tensor, drop: Tensor) -> tuple[Tensor, Tensor]:
        """Replace the captions of samples where ``drop [B]`` is True by the null caption (CFG training)."""
        null, null_mask = self.null_text(text.shape[0], text.shape[1])
        d = drop.to(text.device)
        return torch.where(d[:, None, None], null.to(text.dtype), text), torch.where(d[:, None], null_mask, text_mask)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text: Tensor,
        text_mask: Tensor,
        *,
        mode: str | None = None,
        window_chunks: int | None = None,
        sink: bool = False,
        cache: KVCache | None = None,
        update_cache: bool = False,
    ) -> Tensor:
        """Velocity ``[B, F, C, H, W]`` for latents ``x [B, F, C, H, W]`` at per-frame times ``t [B, F]`` (or ``[B]``).

        Inputs are taken in the weights' dtype (a bf16 DiT reads an fp32 batch), or autocast's where it is on.

        ``mode`` overrides ``self.attention_mode``. Without a cache, ``window_chunks``/``sink`` restrict a
        ``block_causal`` forward to what a sliding-window cache sees. With a ``cache``, ``x`` is the next chunk(s)
        (starting on a chunk boundary) and attends to every cached frame; ``update_cache`` appends its keys/values.
        """
        cfg = self.cfg
        mode = mode or self.attention_mode
        if mode not in ATTENTION_MODES:
            raise ValueError(f"mode must be one of {ATTENTION_MODES}, got {mode!r}")
        b, f, _, hh, ww = x.shape
        check_text_width(text.shape[-1], cfg.text_dim, embeddings="caption embeddings", model="the DiT")
        pt, ph, pw = cfg.patch
        if pt != 1:
            raise ValueError("per-frame modulation needs a temporal patch of 1")
        gh, gw = hh // ph, ww // pw
        tokens_per_frame = gh * gw
        t = t.expand(b, f) if t.dim() == 2 else t[:, None].expand(b, f)

        tokens = self.embed_patches(x.to(self.head.weight.dtype))
        e = self.time_embed(timestep_embedding(t, cfg.freq_dim).to(tokens.dtype))
        if self.text_pool is not None:
            e = e + self.text_pool(pooled_caption(text, text_mask).to(tokens.dtype))[:, None]
        e_mod = self.time_proj(e).unflatten(-1, (6, cfg.dim))
        keep_caption = cache is not None and not torch.is_grad_enabled()  # kept values would carry no gradient
        context_kv = cache.caption_kv(text, text_mask) if keep_caption else None
        if context_kv is None:
            context = self.text_embed(text.to(tokens.dtype))
            context_kv = [block.cross_attn.keys_values(context) for block in self.blocks]
            if keep_caption:
                cache.keep_caption_kv(text, text_mask, context_kv)
        context_mask = text_mask.bool() | ~text_mask.bool().any(-1, keepdim=True)

        past = cache.num_frames if cache is not None else 0
        frames = torch.arange(past, past + f, device=x.device)
        rotary = rope_rotary(rope_angles(frames, gh, gw, cfg.head_dim, cfg.rope_theta))
        layout = None
        if mode == "block_causal":
            layout = BlockCausalLayout.of(
                f, cfg.chunk_frames, tokens_per_frame, past, window_chunks=None if cache else window_chunks, sink=sink
            )

        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            args = (tokens, e_mod, context_kv[i], context_mask, rotary, layout, layer_cache, update_cache)
            if self.gradient_checkpointing and self.training and cache is None:
                tokens = checkpoint(block, *args, use_reentrant=False)
            else:
                tokens = block(*args)
        if cache is not None and update_cache:
            cache.commit(f, tokens_per_frame, self.frame_rotary)

        shift, scale = (self.head_modulation + e[:, :, None]).unsqueeze(3).unbind(2)
        out = self.head(modulate(self.head_norm(tokens), shift, scale))
        return rearrange(
            out, "b (f h w) (c p q) -> b f c (h p) (w q)", f=f, h=gh, w=gw, p=ph, q=pw, c=cfg.in_channels
        )

    def embed_patches(self, x: Tensor) -> Tensor:
        """Latents ``[B, F, C, H, W]`` -> tokens ``[B, F * H/ph * W/pw, dim]`` in (frame, row, column) order."""
        _, ph, pw = self.cfg.patch
        if isinstance(self.patch_embed, nn.Conv3d):
            return rearrange(self.patch_embed(rearrange(x, "b f c h w -> b c f h w")), "b d f h w -> b (f h w) d")
        tokens = self.patch_embed(rearrange(x, "b f c (h p) (w q) -> b (f h w) (c p q)", p=ph, q=pw))
        if not self.cfg.absolute_positions:
            return tokens
        positions = self.spatial_positions(x.shape[-2] // ph, x.shape[-1] // pw, tokens)
        return (tokens.unflatten(1, (x.shape[1], -1)) + positions).flatten(1, 2)

    def spatial_positions(self, rows: int, cols: int, like: Tensor) -> Tensor:
        """Sine-cosine embedding ``[rows * cols, dim]`` of each token's (row, column), in ``like``'s dtype and device."""
        return sincos_grid(self.cfg.dim, rows, cols).to(like)

    def frame_rotary(self, shift: int) -> Tensor:
        """Rotary ``[1, head_dim // 2, 2]`` that moves a key by ``shift`` frames (rows and columns unchanged)."""
        frames = torch.tensor([shift], device=self.head.weight.device)
        return rope_rotary(rope_angles(frames, 1, 1, self.cfg.head_dim, self.cfg.rope_theta))

    def new_cache(self, window_chunks: int | None = None, sink: bool = False) -> KVCache:
        return KVCache.empty(self.cfg.depth, window_chunks=window_chunks, sink=sink)

    def predict_x0(self, x_t: Tensor, t: Tensor, text: Tensor, text_mask: Tensor, **kwargs) -> Tensor:
        """Clean-latent prediction ``[B, F, C, H, W]`` from the velocity (``x0 = x_t - t v``)."""
        return schedule.velocity_to_x0(x_t, self(x_t, t, text, text_mask, **kwargs), t)

    def guided_velocity(
        self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor, guidance_scale: float, **kwargs
    ) -> Tensor:
        """Classifier-free-guided velocity; conditional and null captions run as one batch of 2B.

        With a cache, that cache must hold 2B rows (built by guided passes), conditional rows first.
        """
        if guidance_scale == 1.0:
            return self(x, t, text, text_mask, **kwargs)
        null, null_mask = self.null_text(x.shape[0], text.shape[1])
        v = self(
            torch.cat([x, x]),
            torch.cat([t, t]),
            torch.cat([text, null.to(text.dtype)]),
            torch.cat([text_mask.bool(), null_mask]),
            **kwargs,
        )
        v_cond, v_uncond = v.chunk(2)
        return schedule.guided_velocity(v_cond, v_uncond, guidance_scale)
