"""Generation from a trained student, as a Python API that streams: text-to-video, dynamic prompting,
image-to-video and streaming video-to-video, all zero-shot from the same 4-step causal student and KV cache.

``Generator.chunks(request)`` yields each chunk's frames as soon as the student has denoised it and the VAE
decoded it (CausVid Algorithm 2 in :func:`model.streaming.stream`), so a service can send frames while later
ones are still being computed. What to generate is a :class:`evaluation.request.Request`; the checkpoint is
found by :func:`evaluation.checkpoint.resolve_checkpoint`; a video input is read as it lands by
:class:`pipelines.video.VideoSource`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from evaluation.checkpoint import Checkpoint, resolve_checkpoint
from evaluation.progress import SecondsBar
from evaluation.request import Request, requested_seconds, validate
from infra.config import PipelineConfig
from infra.errors import UserError
from model.dit import DiT
from model.precision import Precision, default_precision, for_inference
from model.presets import Preset, get_preset
from model.streaming import stream
from model.text import TextEncoder
from model.vae import VAE, pixels_to_video, video_to_pixels
from model.weights import build_from_payload, read_payload
from pipelines.video import Mp4Writer, VideoSource, read_image

UNBOUNDED = 1 << 40

log = logging.getLogger("causvid")


@dataclass
class Frames:
    """One streamed chunk: ``frames [T, H, W, 3]`` uint8 starting at output frame ``start``, its clean
    ``latents [1, k, C, h, w]``, whether it was ``given`` (the encoded image), its caption, and ``elapsed``:
    seconds from the start of the request until these frames were ready. The first generated chunk comes in two
    parts of the same ``index``, its first frame alone and then the rest, so the first frame is not kept waiting."""

    index: int
    start: int
    frames: np.ndarray
    latents: Tensor
    given: bool
    prompt: str
    elapsed: float


@dataclass
class _Plan:
    """What one request needs from the stream: text per chunk, context, encoded inputs and the output length."""

    texts: Callable[[int], tuple[Tensor, Tensor]]
    captions: Callable[[int], str]
    num_chunks: int
    total_frames: Callable[[], int | None]
    context: Tensor | None = None
    inputs: Iterator[Tensor] | None = None
    input_timestep: int = 500


def frames_to_video(frames: np.ndarray | list[np.ndarray], device: torch.device) -> Tensor:
    """``[T, H, W, 3]`` uint8 frames -> one clip ``video [1, T, 3, H, W]`` in [-1, 1] on ``device``."""
    return pixels_to_video(np.stack(list(frames)))[None].to(device)


class Generator:
    """A student, its VAE and the text encoder, ready to stream any of the four modes (see :class:`Request`)."""

    def __init__(self, model: DiT, vae: VAE, preset: Preset, text_encoder: TextEncoder) -> None:
        self.model, self.vae = model.eval().requires_grad_(False), vae.eval().requires_grad_(False)
        self.preset, self.text_encoder = preset, text_encoder
        self.device = next(model.parameters()).device

    @classmethod
    def load(
        cls,
        checkpoint: str | Checkpoint,
        *,
        vae: str | None = None,
        config: PipelineConfig | None = None,
        device: str | torch.device | None = None,
        text_encoder: TextEncoder | None = None,
        precision: Precision | None = None,
        compile: bool = False,
    ) -> Generator:
        """Load a student checkpoint (see :func:`resolve_checkpoint`) and its VAE; the preset comes from the weights.
        Both run in ``precision`` (default: bf16 where the device has it natively, see :mod:`model.precision`);
        ``compile`` compiles the student's blocks and the VAE decoder (graphs built on the first chunks)."""
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else resolve_checkpoint(checkpoint, vae=vae, config=config)
        payload = read_payload(ckpt.model_uri)
        if payload["kind"] != "dit":
            raise UserError(f"checkpoint {ckpt.model_uri} holds a {payload['kind']}, not a student DiT")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        precision = precision or default_precision(device)
        model = for_inference(build_from_payload(payload, mode="block_causal").to(device), precision)
        vae_model = for_inference(build_from_payload(read_payload(ckpt.vae_uri)).to(device), precision)
        if compile:
            model.compile_blocks()
            vae_model.compile_decoder()
        preset = get_preset(payload["preset"])
        text_path = config.model.text_path if config is not None else None
        encoder = text_encoder or preset.text_encoder_for(text_path, device=device)
        return cls(model, vae_model, preset, encoder)

    @property
    def fps(self) -> int:
        return self.preset.fps

    def chunks(self, request: Request) -> Iterator[Frames]:
        """Validate the request now, then stream its chunks (frames of each as soon as it is decoded)."""
        validate(request)
        started = time.perf_counter()
        return self._stream(self._plan(request), started, request.seed)

    def frames(self, request: Request) -> Iterator[np.ndarray]:
        """One ``[H, W, 3]`` uint8 frame at a time, streamed."""
        for chunk in self.chunks(request):
            yield from chunk.frames

    def render(self, request: Request) -> np.ndarray:
        """The whole video ``[T, H, W, 3]`` uint8."""
        return np.concatenate([chunk.frames for chunk in self.chunks(request)])

    def _plan(self, request: Request) -> _Plan:
        p, k = self.preset, self.preset.chunk_frames
        switches = sorted(request.prompt_at)
        captions = [request.prompt, *(caption for _, caption in switches)]
        emb, mask = self.text_encoder.encode(captions)
        emb, mask = emb.to(self.device), mask.to(self.device)
        context = None
        if request.image is not None:
            image = read_image(request.image, p.height, p.width)
            context = self.vae.encode(frames_to_video([image], self.device))
        offset = 0 if context is None else context.shape[1]
        seconds = requested_seconds(request)
        wanted = None if seconds is None else p.frames_for(seconds)
        num_chunks = UNBOUNDED if seconds is None else p.chunks_for(seconds, given_latent_frames=offset)

        def start_second(chunk: int) -> float:
            latent = 0 if chunk < offset else offset + (chunk - offset) * k
            return self.vae.cfg.pixel_frames(latent) / p.fps if latent else 0.0

        def caption_index(chunk: int) -> int:
            """The latest switch whose second falls in or before this chunk (0 = the main prompt)."""
            after = start_second(chunk + 1)
            return sum(1 for at, _ in switches if at < after - 1e-9)

        plan = _Plan(
            texts=lambda chunk: (emb[caption_index(chunk)][None], mask[caption_index(chunk)][None]),
            captions=lambda chunk: captions[caption_index(chunk)],
            num_chunks=num_chunks,
            total_frames=lambda: wanted,
            context=context,
        )
        if request.video is not None:
            source = VideoSource(request.video, p.fps, p.height, p.width, request.idle_seconds)
            plan.inputs = self._encoded_chunks(source, wanted)
            plan.input_timestep = min(p.student_timesteps, key=lambda t: abs(t - request.strength * 1000))
            plan.total_frames = lambda: source.frames_read
        return plan

    def _encoded_chunks(self, source: VideoSource, limit: int | None) -> Iterator[Tensor]:
        """Latent chunks ``[1, k, C, h, w]`` of the input as its frames arrive; a short last chunk repeats its
        last frame (the output is cut to the input's length)."""
        k, tf = self.preset.chunk_frames, self.vae.cfg.temporal_factor
        encoder = self.vae.stream_encoder()
        need = 1 + tf * (k - 1)
        pending: list[np.ndarray] = []
        for frame in source:
            pending.append(frame)
            if len(pending) == need:
                yield encoder.push(frames_to_video(pending, self.device))
                pending, need = [], tf * k
            if limit is not None and source.frames_read >= limit:
                break
        if pending:
            pending += [pending[-1]] * (need - len(pending))
            yield encoder.push(frames_to_video(pending, self.device))
        if not source.frames_read:
            raise UserError(f"cannot read video {source.path}: no frames")

    def _stream(self, plan: _Plan, started: float, seed: int) -> Iterator[Frames]:
        _, c, h, w = self.preset.latent_shape()
        rollout = stream(
            self.model,
            plan.texts,
            num_chunks=plan.num_chunks,
            latent_shape=(c, h, w),
            schedule=self.preset.schedule(),
            timesteps=self.preset.student_timesteps,
            window_chunks=self.preset.window_chunks,
            vae=self.vae,
            generator=torch.Generator(self.device).manual_seed(seed),
            context=plan.context,
            inputs=plan.inputs,
            input_timestep=plan.input_timestep,
            first_frame_alone=True,
        )
        written = 0
        for chunk in rollout:
            assert chunk.video is not None
            total = plan.total_frames()
            frames = video_to_pixels(chunk.video[0])[: None if total is None else max(0, total - written)]
            elapsed = time.perf_counter() - started
            yield Frames(chunk.index, written, frames, chunk.latents, chunk.given, plan.captions(chunk.index), elapsed)
            written += len(frames)


def timing(chunks: list[Frames]) -> dict[str, float]:
    """Latency to the first output frame (s) and output frames per second of wall time."""
    shown = [c for c in chunks if len(c.frames)]
    frames = sum(len(c.frames) for c in shown)
    total = chunks[-1].elapsed if chunks else 0.0
    return {
        "latency_s": shown[0].elapsed if shown else math.nan,
        "fps": frames / total if total > 0 else math.nan,
        "frames": float(frames),
    }


def write_mp4(generator: Generator, request: Request, out: str | Path, *, progress: bool = False) -> Path:
    """Stream a request into the MP4 ``out``, each chunk written as soon as it is ready; with ``progress`` a bar of
    seconds generated and the live frames per second goes to stderr."""
    p = generator.preset
    chunks: list[Frames] = []
    bar = SecondsBar(requested_seconds(request), p.fps, enabled=progress)
    with bar, Mp4Writer(out, p.fps, p.height, p.width) as writer:
        for chunk in generator.chunks(request):
            writer.write(chunk.frames)
            chunks.append(replace(chunk, frames=np.empty((len(chunk.frames), 0, 0, 3), np.uint8)))  # counts, not pixels
            bar.advance(len(chunk.frames), chunk.start + len(chunk.frames), chunk.elapsed)
    figures = timing(chunks) if chunks else {}
    log.info(
        "generate: wrote %s: %d frames (%.1f s at %d fps) in %.1f s, %.3g frames/s, first frame after %.3g s",
        Path(out).resolve(), figures.get("frames", 0), figures.get("frames", 0) / p.fps, p.fps,
        chunks[-1].elapsed if chunks else 0.0, figures.get("fps", math.nan), figures.get("latency_s", math.nan),
    )
    return Path(out).resolve()
