"""Generation from a trained student, as a Python API that streams: text-to-video, dynamic prompting,
image-to-video and streaming video-to-video, all zero-shot from the same 4-step causal student and KV cache.

``Generator.chunks(request)`` yields each chunk's frames as soon as the student has denoised it and the VAE
decoded it (CausVid Algorithm 2 in :func:`model.streaming.stream`), so a service can send frames while later
ones are still being computed. A checkpoint is named by a stage output folder, a ``model.pt`` URI or the MLflow
run id of the stage that wrote it; the VAE is found through the manifests of its inputs. A video input may be a
file another process is still writing (a fragmented MP4, or any streamable container): frames are read as they
land, and reading waits for more until the writer has finished.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import av
import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps
from torch import Tensor

from infra import storage
from infra.config import PipelineConfig
from infra.errors import UserError
from model.dit import DiT
from model.presets import Preset, get_preset
from model.streaming import stream
from model.text import TextEncoder, build_text_encoder
from model.vae import VAE, ConvCache, Downsample

MODEL_FILE = "model.pt"
DEFAULT_SECONDS = 30.0
IDLE_SECONDS = 10.0
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
UNBOUNDED = 1 << 40
BAR = "{desc}: {n:.1f}/{total_fmt} s |{bar}| {elapsed} {postfix}"

log = logging.getLogger("causvid")


@dataclass(frozen=True)
class Checkpoint:
    """Where a student's weights and its VAE live; ``output_uri`` is the stage output when known."""

    model_uri: str
    vae_uri: str
    output_uri: str | None = None


@dataclass(frozen=True)
class Request:
    """One generation. ``prompt_at`` lists ``(second, caption)`` switches (dynamic prompting); ``image`` (a path or
    ``[H, W, 3]`` uint8) starts the video from that frame; ``video`` (a path, possibly still being written) is
    re-rendered under the prompt, noised to the student timestep nearest ``strength`` (0 < strength <= 1).
    ``seconds`` defaults to 30, or to the whole input video."""

    prompt: str
    seconds: float | None = None
    prompt_at: tuple[tuple[float, str], ...] = ()
    image: str | Path | np.ndarray | None = None
    video: str | Path | None = None
    strength: float = 0.5
    seed: int = 0
    idle_seconds: float = IDLE_SECONDS


@dataclass
class Frames:
    """One streamed chunk: ``frames [T, H, W, 3]`` uint8 starting at output frame ``start``, its clean
    ``latents [1, k, C, h, w]``, whether it was ``given`` (the encoded image), its caption, and ``elapsed``:
    seconds from the start of the request until these frames were ready."""

    index: int
    start: int
    frames: np.ndarray
    latents: Tensor
    given: bool
    prompt: str
    elapsed: float


def parse_prompt_at(value: str) -> tuple[float, str]:
    """``'10:a blue square ...'`` -> ``(10.0, 'a blue square ...')``."""
    second, sep, caption = value.partition(":")
    try:
        at = float(second)
    except ValueError:
        at = math.nan
    if not sep or not caption.strip() or not math.isfinite(at) or at < 0:
        raise UserError(f"--prompt-at wants SECONDS:\"TEXT\" with SECONDS >= 0, got {value!r}")
    return at, caption.strip()


def resolve_checkpoint(checkpoint: str, *, vae: str | None = None, config: PipelineConfig | None = None) -> Checkpoint:
    """A stage output folder, a ``model.pt`` URI, or an MLflow run id (its ``causvid.output`` tag) -> weights + VAE."""
    output: str | None
    if checkpoint.endswith(".pt") and storage.exists(checkpoint):
        model_uri = storage.normalize(checkpoint)
        parent = model_uri.rsplit("/", 1)[0]
        output = parent if storage.is_complete(parent) else None
    elif storage.exists(checkpoint):
        output = storage.normalize(checkpoint)
        if not storage.is_complete(output):
            raise UserError(f"checkpoint {checkpoint} is not a complete stage output (no {storage.MANIFEST})")
        model_uri = storage.join(output, MODEL_FILE)
        if not storage.exists(model_uri):
            raise UserError(f"checkpoint {checkpoint} holds no {MODEL_FILE}")
    elif RUN_ID.match(checkpoint):
        output = _run_output(checkpoint, config or PipelineConfig())
        model_uri = storage.join(output, MODEL_FILE)
        if not storage.exists(model_uri):
            raise UserError(f"MLflow run {checkpoint} wrote no {MODEL_FILE} (output {output})")
    else:
        raise UserError(f"unknown checkpoint {checkpoint!r}: not a stage output, a {MODEL_FILE} or an MLflow run id")
    vae_uri = vae or (_vae_of_output(output) if output else None)
    if not vae_uri:
        raise UserError(f"no VAE is recorded for checkpoint {checkpoint}; pass --vae PATH/model.pt")
    if not storage.exists(vae_uri):
        raise UserError(f"VAE weights not found: {vae_uri}")
    return Checkpoint(model_uri, vae_uri, output)


def _run_output(run_id: str, config: PipelineConfig) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from infra import tracking

    uri = tracking.tracking_uri(config)
    try:
        tags = MlflowClient(tracking_uri=uri).get_run(run_id).data.tags
    except MlflowException:
        raise UserError(f"unknown checkpoint {run_id!r}: no such MLflow run in {uri}") from None
    output = tags.get("causvid.output")
    if not output or not storage.is_complete(output):
        raise UserError(f"MLflow run {run_id} has no complete stage output (tag causvid.output={output!r})")
    return output


def _vae_of_output(output_uri: str) -> str | None:
    """The VAE that made a student's training latents: its manifest's inputs, through the latents manifest."""
    inputs = storage.read_manifest(output_uri).get("inputs", {})
    if inputs.get("vae"):
        return storage.join(inputs["vae"], MODEL_FILE)
    if not inputs.get("teacher") and not inputs.get("latents"):
        return None
    from training.ode_init import vae_of

    return vae_of(inputs.get("teacher", ""), inputs.get("latents"))


def read_image(image: str | Path | np.ndarray, height: int, width: int) -> np.ndarray:
    """An image file or array, centre-cropped to the aspect and resized.  -> ``[height, width, 3]`` uint8."""
    if isinstance(image, np.ndarray):
        picture = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    else:
        try:
            with Image.open(image) as opened:
                picture = opened.convert("RGB")
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read image {image}: {err}") from None
    return fit_frame(picture, height, width)


def fit_frame(picture: Image.Image, height: int, width: int) -> np.ndarray:
    if picture.size != (width, height):
        picture = ImageOps.fit(picture, (width, height), method=Image.Resampling.BILINEAR)
    return np.asarray(picture, dtype=np.uint8)


def requested_seconds(request: Request) -> float | None:
    """The length asked for: ``seconds``, else 30 s, else (with a video input) None for the whole input."""
    if request.seconds is not None or request.video is not None:
        return request.seconds
    return DEFAULT_SECONDS


def validate(request: Request) -> None:
    """Every mistake in a request that can be seen before generating, as one UserError line."""
    if request.image is not None and request.video is not None:
        raise UserError("--image and --video cannot be combined")
    if request.seconds is not None and not request.seconds > 0:
        raise UserError(f"--seconds must be positive, got {request.seconds:g}")
    if not 0.0 < request.strength <= 1.0:
        raise UserError(f"--strength must be in (0, 1], got {request.strength:g}")
    length = requested_seconds(request)
    if request.video is not None:
        source = VideoSource(request.video, fps=1, height=8, width=8, idle_seconds=request.idle_seconds)
        source.check()
        length = length if length is not None else source.finished_seconds()
    if request.image is not None and not isinstance(request.image, np.ndarray):
        read_image(request.image, 8, 8)
    for at, _ in request.prompt_at:
        if length is not None and at >= length:
            raise UserError(f"--prompt-at {at:g} is past the end of the video ({length:g} s)")


class GrowingFile(io.RawIOBase):
    """A file read front to back while another process may still append to it: at its current end a read waits
    for more bytes, and returns end-of-file only once the writer has finished (:func:`writer_finished`)."""

    def __init__(self, path: str | Path, idle_seconds: float, poll_seconds: float = 0.05) -> None:
        super().__init__()
        self.path = Path(path)
        self.handle = open(self.path, "rb")
        self.idle_seconds = idle_seconds
        self.poll_seconds = poll_seconds

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while True:
            n = self.handle.readinto(buffer)
            if n:
                return n
            if writer_finished(self.path, self.idle_seconds):
                n = self.handle.readinto(buffer)
                return n or 0
            time.sleep(self.poll_seconds)

    def close(self) -> None:
        self.handle.close()
        super().close()


def mp4_boxes(path: str | Path) -> list[tuple[bytes, int]] | None:
    """Top-level MP4 boxes ``[(type, size)]`` that lie wholly in the file, plus ``(b"", -1)`` when the last one is
    cut short (still being written); None when the file does not start like an MP4."""
    boxes: list[tuple[bytes, int]] = []
    total = os.path.getsize(path)
    with open(path, "rb") as handle:
        offset = 0
        while offset + 8 <= total:
            handle.seek(offset)
            size, kind = struct.unpack(">I4s", handle.read(8))
            if size == 1 and offset + 16 <= total:
                size = struct.unpack(">Q", handle.read(8))[0]
            if not boxes and kind != b"ftyp":
                return None
            if size < 8 or offset + size > total:
                return [*boxes, (b"", -1)]
            boxes.append((kind, size))
            offset += size
    if offset != total:
        boxes.append((b"", -1))
    return boxes if boxes else None


def writer_finished(path: str | Path, idle_seconds: float) -> bool:
    """A whole MP4 (every box complete, with its index: ``moov``, or the ``mfra`` trailer of a fragmented one),
    or any file left unchanged for ``idle_seconds``."""
    boxes = mp4_boxes(path)
    if boxes and boxes[-1][1] > 0:
        kinds = [kind for kind, _ in boxes]
        if (b"moof" in kinds and kinds[-1] == b"mfra") or (b"moof" not in kinds and b"moov" in kinds):
            return True
    return time.time() - os.path.getmtime(path) > idle_seconds


def _streamable(path: str | Path) -> bool:
    """Whether frames can be read before the writer finishes: not an MP4 whose index comes after its data."""
    boxes = mp4_boxes(path)
    if not boxes:
        return True
    kinds = [kind for kind, _ in boxes]
    return b"moov" in kinds and (b"mdat" not in kinds or kinds.index(b"moov") < kinds.index(b"mdat"))


class VideoSource:
    """Frames of a video file at ``fps`` and ``height x width``, read as they become available.

    Each output instant k / fps shows the last source frame whose timestamp is not later (variable frame rates
    included); frames are centre-cropped to the aspect and resized. ``frames_read`` counts what was yielded.
    """

    def __init__(self, path: str | Path, fps: float, height: int, width: int, idle_seconds: float = IDLE_SECONDS) -> None:
        self.path = Path(path)
        self.fps, self.height, self.width = fps, height, width
        self.idle_seconds = idle_seconds
        self.frames_read = 0

    def check(self) -> None:
        """Refuse a missing file, and a finished one that PyAV cannot open as a video."""
        if not self.path.is_file():
            raise UserError(f"cannot read video {self.path}: no such file")
        if writer_finished(self.path, self.idle_seconds):
            with self._open(self.path) as container:
                if not container.streams.video:
                    raise UserError(f"cannot read video {self.path}: it has no video stream")

    def finished_seconds(self) -> float | None:
        """Duration of a video whose writer has finished (None while it is still being written)."""
        if not writer_finished(self.path, self.idle_seconds):
            return None
        with self._open(self.path) as container:
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            return container.duration / av.time_base if container.duration else None

    def _open(self, source: str | Path | GrowingFile) -> av.container.InputContainer:
        """A growing file is opened without probing ahead (that would wait for seconds of data not written yet)."""
        try:
            if isinstance(source, GrowingFile):
                return av.open(source, mode="r", options={"probesize": "32", "analyzeduration": "0"})
            return av.open(str(source), mode="r")
        except (av.FFmpegError, OSError) as err:
            raise UserError(f"cannot read video {self.path}: {err}") from None

    def __iter__(self) -> Iterator[np.ndarray]:
        """``[height, width, 3]`` uint8 frames, one per output instant."""
        self.check()
        while not writer_finished(self.path, self.idle_seconds) and not _streamable(self.path):
            time.sleep(0.1)
        growing = not writer_finished(self.path, self.idle_seconds)
        container = self._open(GrowingFile(self.path, self.idle_seconds) if growing else self.path)
        with container:
            if not container.streams.video:
                raise UserError(f"cannot read video {self.path}: it has no video stream")
            stream = container.streams.video[0]
            source_rate = float(stream.guessed_rate or stream.average_rate or self.fps)
            start, previous, previous_time = None, None, 0.0
            try:
                for decoded, frame in enumerate(container.decode(stream)):
                    t = float(frame.time) if frame.time is not None else decoded / source_rate
                    start = t if start is None else start
                    if previous is not None:
                        yield from self._repeat(previous, t - start)
                    previous, previous_time = frame, t - start
            except av.FFmpegError as err:
                raise UserError(f"cannot read video {self.path}: {err}") from None
            if previous is not None:
                yield from self._repeat(previous, previous_time + 1.0 / source_rate)

    def _repeat(self, frame: av.VideoFrame, until: float) -> Iterator[np.ndarray]:
        """The frame for every output instant before ``until`` (seconds from the first frame) not yet yielded."""
        picture = None
        while self.frames_read / self.fps < until - 1e-6:
            if picture is None:
                picture = fit_frame(frame.to_image(), self.height, self.width)
            self.frames_read += 1
            yield picture


class StreamingEncoder:
    """Encode pixel frames chunk by chunk, equal to a whole-clip ``VAE.encode`` (posterior mean).

    Causal convolutions continue from their cached trailing inputs (as :class:`model.vae.StreamingDecoder` does);
    each temporal downsampling keeps the last frame it saw, so the first push must hold ``1 + 4n`` frames and every
    later push a multiple of 4.  ``push(video [B, T, 3, H, W]) -> latents [B, T', C, h, w]``.
    """

    def __init__(self, vae: VAE) -> None:
        self.vae = vae
        self.cache: ConvCache = {}

    def _down(self, down: Downsample, x: Tensor) -> Tensor:
        x = down.spatial(x)
        if down.temporal is None:
            return x
        past = self.cache.get(down)
        pad = torch.cat([x[:, :, :1], x[:, :, :1]], dim=2) if past is None else past
        self.cache[down] = x[:, :, -1:]
        return down.temporal(torch.cat([pad, x], dim=2))

    @torch.no_grad()
    def push(self, video: Tensor) -> Tensor:
        encoder, cfg = self.vae.encoder, self.vae.cfg
        h = encoder.conv_in(rearrange(video, "b t c h w -> b c t h w"), self.cache)
        for level in encoder.levels:
            for block in level["blocks"]:
                h = block(h, self.cache)
            if "down" in level:
                h = self._down(level["down"], h)
        h = encoder.conv_out(encoder.mid(h, self.cache), self.cache)
        mean = h[:, : cfg.latent_channels] if cfg.kl else h
        return self.vae.normalize(rearrange(mean, "b c f h w -> b f c h w"))


def to_tensor(frames: np.ndarray | list[np.ndarray], device: torch.device) -> Tensor:
    """``[T, H, W, 3]`` uint8 -> ``video [1, T, 3, H, W]`` in [-1, 1]."""
    array = torch.from_numpy(np.ascontiguousarray(np.stack(list(frames))))
    return rearrange(array, "t h w c -> 1 t c h w").to(device=device, dtype=torch.float32) / 127.5 - 1.0


def to_uint8(video: Tensor) -> np.ndarray:
    """``video [1, T, 3, H, W]`` in [-1, 1] -> ``[T, H, W, 3]`` uint8."""
    array = rearrange(video[0].float().clamp(-1, 1), "t c h w -> t h w c")
    return array.add(1).mul(127.5).round().to(torch.uint8).cpu().numpy()


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
    ) -> Generator:
        """Load a student checkpoint (see :func:`resolve_checkpoint`) and its VAE; the preset comes from the weights."""
        from training.weights import build_from_payload, read_payload

        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else resolve_checkpoint(checkpoint, vae=vae, config=config)
        payload = read_payload(ckpt.model_uri)
        if payload["kind"] != "dit":
            raise UserError(f"checkpoint {ckpt.model_uri} holds a {payload['kind']}, not a student DiT")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = build_from_payload(payload, mode="block_causal").to(device)
        vae_model = build_from_payload(read_payload(ckpt.vae_uri)).to(device)
        preset = get_preset(payload["preset"])
        encoder = text_encoder or build_text_encoder(preset.text_encoder, max_length=preset.text_len, device=device)
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
        p, k, tf = self.preset, self.preset.chunk_frames, self.vae.cfg.temporal_factor
        switches = sorted(request.prompt_at)
        captions = [request.prompt, *(caption for _, caption in switches)]
        emb, mask = self.text_encoder.encode(captions)
        emb, mask = emb.to(self.device), mask.to(self.device)
        context = None
        if request.image is not None:
            image = read_image(request.image, p.height, p.width)
            context = self.vae.encode(to_tensor([image], self.device))
        offset = 0 if context is None else 1
        seconds = requested_seconds(request)
        wanted = None if seconds is None else max(1, int(round(seconds * p.fps)))
        num_chunks = UNBOUNDED if wanted is None else math.ceil((1 + math.ceil((wanted - 1) / tf) - offset) / k)

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
        encoder = StreamingEncoder(self.vae)
        need = 1 + tf * (k - 1)
        pending: list[np.ndarray] = []
        for frame in source:
            pending.append(frame)
            if len(pending) == need:
                yield encoder.push(to_tensor(pending, self.device))
                pending, need = [], tf * k
            if limit is not None and source.frames_read >= limit:
                break
        if pending:
            pending += [pending[-1]] * (need - len(pending))
            yield encoder.push(to_tensor(pending, self.device))
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
        )
        written = 0
        for chunk in rollout:
            assert chunk.video is not None
            total = plan.total_frames()
            frames = to_uint8(chunk.video)[: None if total is None else max(0, total - written)]
            elapsed = time.perf_counter() - started
            yield Frames(chunk.index, written, frames, chunk.latents, chunk.given, plan.captions(chunk.index), elapsed)
            written += len(frames)


class Mp4Writer:
    """Write frames to an H.264 MP4 as they come: fragmented (a fragment per second, flushed to disk), so the file
    can be played, copied or fed to ``--video`` while it is still being written."""

    def __init__(self, path: str | Path, fps: int, height: int, width: int, crf: int = 18) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        options = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"}
        self.container = av.open(str(path), mode="w", format="mp4", options=options)
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(crf), "preset": "fast", "g": str(fps), "tune": "zerolatency", "threads": "1"}

    def write(self, frames: np.ndarray) -> None:
        """``frames [T, H, W, 3]`` uint8."""
        for frame in frames:
            for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    from tqdm import tqdm

    p = generator.preset
    chunks: list[Frames] = []
    bar = tqdm(total=requested_seconds(request), unit="s", desc="generate", disable=not progress, file=sys.stderr, bar_format=BAR)
    with bar, Mp4Writer(out, p.fps, p.height, p.width) as writer:
        for chunk in generator.chunks(request):
            writer.write(chunk.frames)
            chunks.append(replace(chunk, frames=chunk.frames[:0]))
            done = chunk.start + len(chunk.frames)
            bar.update(len(chunk.frames) / p.fps)
            bar.set_postfix_str(f"{done / max(chunk.elapsed, 1e-9):.1f} fps")
    figures = timing(chunks) if chunks else {}
    log.info("generate: %s", " ".join(f"{k}={v:.3g}" for k, v in figures.items()))
    return Path(out).resolve()
