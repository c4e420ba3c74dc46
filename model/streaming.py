"""Sampling: the teacher's many-step bidirectional ODE, and chunk-by-chunk streaming (CausVid Algorithm 2).

:func:`stream` is a generator. For each chunk of ``k`` latent frames it starts from noise, runs the student's few
steps against the KV cache of earlier clean chunks (between steps: predict x0, re-noise to the next student time
with fresh noise), decodes its pixels with the streaming VAE decoder and yields it; the clean chunk's one pass at
t = 0 that appends it to the cache runs when the next chunk is asked for, so pixels leave one DiT pass sooner and
the last chunk skips it. The same loop serves the many-step causal baseline (``sampler="euler"``),
the no-KV-cache reference (``use_cache=False``: recompute the whole past every chunk) and the zero-shot
applications: a text per chunk (dynamic prompting), clean context latents (image-to-video, video extension) and
encoded input chunks denoised from an intermediate time (streaming video-to-video).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from model import schedule as sch
from model.dit import DiT, KVCache
from model.schedule import FlowSchedule, Trajectory
from model.vae import VAE, StreamingDecoder

Text = tuple[Tensor, Tensor]
TextSource = Text | Callable[[int], Text]
"""A caption ``(emb [B, L, D], mask [B, L])``, or a function of the chunk index returning one."""


@dataclass
class Chunk:
    """One streamed chunk: clean ``latents [B, k, C, h, w]``, decoded ``video [B, T_k, 3, H, W]`` in [-1, 1]
    (None without a VAE), whether it was ``given`` (context) rather than generated, its ``seconds`` (from the
    chunk's start until it is yielded) and the part of them its VAE decode took (``decode_seconds``, the paper's
    named latency bound). With ``first_frame_alone`` the stream's first chunk comes in two parts of the same
    ``index``: its first latent frame (one pixel frame), then the rest, timed from the same start."""

    index: int
    latents: Tensor
    video: Tensor | None
    given: bool
    seconds: float
    decode_seconds: float = 0.0


@torch.no_grad()
def teacher_sample(
    model: DiT,
    text: Text,
    noise: Tensor,
    schedule: FlowSchedule,
    *,
    num_steps: int = 50,
    guidance_scale: float = 5.0,
    record_timesteps: Sequence[int] = (),
    mode: str | None = "bidirectional",
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Trajectory:
    """Euler + CFG over a whole clip from ``noise [B, F, C, h, w]``; ``states`` at ``record_timesteps`` (names).

    The trajectories stage records the student's timesteps: ``record_timesteps=(1000, 750, 500, 250)``.
    ``mode=None`` keeps the DiT's own attention mode.
    """
    emb, mask = text

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        return model.guided_velocity(x, t, emb, mask, guidance_scale, mode=mode)

    record = schedule.time_of(list(record_timesteps)) if record_timesteps else ()
    return schedule.solve(velocity, noise, num_steps, record_times=record, callback=callback)


def stream(
    model: DiT,
    text: TextSource,
    *,
    num_chunks: int,
    latent_shape: tuple[int, int, int],
    schedule: FlowSchedule,
    timesteps: Sequence[int] = (1000, 750, 500, 250),
    sampler: str = "student",
    num_steps: int = 50,
    guidance_scale: float = 1.0,
    chunk_frames: int | None = None,
    window_chunks: int | None = None,
    sink: bool = False,
    use_cache: bool = True,
    vae: VAE | None = None,
    generator: torch.Generator | None = None,
    context: Tensor | None = None,
    inputs: Iterable[Tensor] | None = None,
    input_timestep: int = 500,
    clock: Callable[[], float] = time.perf_counter,
    first_frame_alone: bool = False,
) -> Iterator[Chunk]:
    """Yield :class:`Chunk` s of a block-causal rollout, one chunk of ``chunk_frames`` latent frames at a time.

    ``latent_shape = (C, h, w)``; ``num_chunks`` counts generated chunks. ``sampler="student"`` takes the
    ``timesteps`` (names, noisiest first); ``"euler"`` runs ``num_steps`` Euler steps with CFG (the causal-teacher
    baseline; CFG keeps a 2B-row cache). ``context [B, n, C, h, w]`` is fed clean first (n = 1 for an encoded image),
    split into chunks of ``chunk_frames``. ``inputs`` yields encoded chunks ``[B, k, C, h, w]`` that are noised to
    ``input_timestep`` and denoised by the student's remaining steps (video-to-video). ``use_cache=False`` is the
    reference that recomputes every earlier chunk at each step; it equals the cached rollout for a fixed caption,
    chunk-aligned context and no sink (positions there are absolute; see :mod:`model.dit`). ``clock`` times the
    chunks (``time.process_time`` counts only this process's CPU seconds, for a machine shared with others).
    ``first_frame_alone`` yields the first chunk's first latent frame and its one pixel frame on their own, before
    the rest of that chunk is decoded (a viewer's time to the first frame; the pixels are the same).
    """
    if sampler not in ("student", "euler"):
        raise ValueError(f"sampler must be 'student' or 'euler', got {sampler!r}")
    k = chunk_frames or model.cfg.chunk_frames
    text_at = text if callable(text) else (lambda _i, _t=text: _t)
    roller = _Rollout(model, window_chunks, sink, use_cache, guidance_scale, vae, clock, first_frame_alone)
    index = 0
    if context is not None:
        for start in range(0, context.shape[1], k):
            t0 = clock()
            roller.commit_pending()
            clean = context[:, start : start + k]
            for part, video, decode_seconds in roller.decode(clean):
                yield Chunk(index, part, video, True, clock() - t0, decode_seconds)
            roller.pending = (clean, text_at(index))
            index += 1

    input_iter = iter(inputs) if inputs is not None else None
    for _ in range(num_chunks):
        t0 = clock()
        roller.commit_pending()
        emb, mask = text_at(index)
        shape = (emb.shape[0], k, *latent_shape)
        noise = torch.randn(shape, generator=generator, device=emb.device, dtype=emb.dtype)
        if input_iter is not None:
            source = next(input_iter, None)
            if source is None:
                return
            t_in = schedule.time_of(input_timestep)
            x = sch.add_noise(source, noise, t_in)
            times = [float(t_in), *(float(t) for t in schedule.student_times(timesteps) if t < t_in - 1e-6)]
            clean = roller.denoise_student(x, times, (emb, mask), generator)
        elif sampler == "student":
            clean = roller.denoise_student(noise, schedule.student_times(timesteps).tolist(), (emb, mask), generator)
        else:
            clean = roller.denoise_euler(noise, schedule.sampling_times(num_steps), (emb, mask))
        for part, video, decode_seconds in roller.decode(clean):
            yield Chunk(index, part, video, False, clock() - t0, decode_seconds)
        roller.pending = (clean, (emb, mask))
        index += 1


class _Rollout:
    """State of one rollout: the KV cache (or, for the reference, the clean past), the streaming decoder and the
    yielded chunk still to be appended to the cache (``pending``: its clean latents and caption)."""

    def __init__(
        self,
        model: DiT,
        window_chunks: int | None,
        sink: bool,
        use_cache: bool,
        guidance_scale: float,
        vae: VAE | None,
        clock: Callable[[], float],
        first_frame_alone: bool,
    ) -> None:
        self.model = model
        self.clock = clock
        self.window_chunks = window_chunks
        self.sink = sink
        self.guidance = guidance_scale
        self.cache: KVCache | None = model.new_cache(window_chunks, sink) if use_cache else None
        self.past: list[Tensor] = []
        self.pending: tuple[Tensor, Text] | None = None
        self.decoder: StreamingDecoder | None = vae.stream_decoder() if vae is not None else None
        self.first_frame_alone = first_frame_alone
        self.decoded_any = False

    def velocity(self, x: Tensor, t: float, text: Text, *, update_cache: bool = False) -> Tensor:
        """Velocity of the current chunk ``x [B, k, C, h, w]`` at time t, given every earlier clean chunk."""
        emb, mask = text
        frames = x.shape[1]
        tt = torch.full(x.shape[:2], t, device=x.device, dtype=x.dtype)
        kwargs: dict = {"mode": "block_causal"}
        if self.cache is not None:
            kwargs.update(cache=self.cache, update_cache=update_cache)
        elif self.past:
            n = sum(p.shape[1] for p in self.past)
            x = torch.cat([*self.past, x], dim=1)
            tt = torch.cat([torch.zeros_like(tt[:, :1]).expand(-1, n), tt], dim=1)
            kwargs.update(window_chunks=self.window_chunks, sink=self.sink)
        v = self.model.guided_velocity(x, tt, emb, mask, self.guidance, **kwargs)
        return v[:, -frames:]

    @torch.no_grad()
    def denoise_student(
        self, x: Tensor, times: Sequence[float], text: Text, generator: torch.Generator | None
    ) -> Tensor:
        """Few-step sampling: x0 prediction at each student time, re-noised with fresh noise to the next one."""
        x0 = x
        for i, t in enumerate(times):
            x0 = sch.velocity_to_x0(x, self.velocity(x, t, text), t)
            if i + 1 < len(times):
                eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = sch.add_noise(x0, eps, times[i + 1])
        return x0

    @torch.no_grad()
    def denoise_euler(self, x: Tensor, grid: Tensor, text: Text) -> Tensor:
        for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
            x = sch.euler_step(x, self.velocity(x, t, text), t, t_next)
        return x

    @torch.no_grad()
    def commit_pending(self) -> None:
        """Append the pending clean chunk: one t = 0 pass into the cache (or keep it for recompute)."""
        if self.pending is None:
            return
        clean, text = self.pending
        self.pending = None
        if self.cache is not None:
            self.velocity(clean, 0.0, text, update_cache=True)
        else:
            self.past.append(clean)

    @torch.no_grad()
    def decode(self, clean: Tensor) -> Iterator[tuple[Tensor, Tensor | None, float]]:
        """``(latents, pixels, decode seconds)`` of the chunk from the streaming decoder (pixels None without a
        VAE): one part, or, for the stream's first chunk with ``first_frame_alone``, its first latent frame and then
        the rest, so that the first pixel frame leaves before the chunk's others are decoded."""
        if self.decoder is None:
            yield clean, None, 0.0
            return
        parts = [clean]
        if self.first_frame_alone and not self.decoded_any and clean.shape[1] > 1:
            parts = [clean[:, :1], clean[:, 1:]]
        self.decoded_any = True
        for part in parts:
            start = self.clock()
            video = self.decoder.push(part).clamp(-1.0, 1.0)
            if video.device.type == "cuda":
                torch.cuda.synchronize(video.device)
            yield part, video, self.clock() - start
