"""Video files in and out, for every stage: H.264 MP4 encoding, whole-file decoding, and streaming both ways.

Frames are ``[T, H, W, 3]`` uint8 RGB everywhere. :func:`encode_mp4` makes the bytes every stage stores or logs
(byte-identical for the same frames); :class:`Mp4Writer` writes a file frame by frame that can be read while it
grows; :class:`VideoSource` reads frames at a given rate and size as they land in a file another process may still
be writing (a fragmented MP4, or any streamable container), waiting for more until the writer has finished.
"""

from __future__ import annotations

import io
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps

from infra.errors import UserError

IDLE_SECONDS = 10.0


class Mp4Writer:
    """Write frames to an H.264 (yuv420p) MP4 as they come, one keyframe per second; even sides only.

    ``live`` (the default) writes a fragmented file (a fragment per second, flushed to disk), so it can be played,
    copied or fed to ``--video`` while it is still being written. A whole file (``live=False``, as
    :func:`encode_mp4` writes) has x264's macroblock tree off: on frames this small it reads memory it never wrote,
    so the bytes varied with the heap's history (between Ray workers, or under MALLOC_PERTURB_), and the synthetic
    stage promises the same files on every run. Without it the files are byte-identical however the heap looks.
    """

    def __init__(
        self, target: str | Path | io.BytesIO, fps: int, height: int, width: int, *, crf: int = 18, live: bool = True
    ) -> None:
        if isinstance(target, io.BytesIO):
            destination: str | io.BytesIO = target
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            destination = str(target)
        options = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"} if live else {}
        self.container = av.open(destination, mode="w", format="mp4", options=options)
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        codec = {"crf": str(crf), "preset": "fast", "g": str(fps)}
        if live:
            codec.update({"tune": "zerolatency", "threads": "1"})
        else:
            codec.update({"threads": "1", "x264-params": "mbtree=0"})
        self.stream.options = codec

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


def encode_mp4(frames: np.ndarray, fps: int, crf: int = 18) -> bytes:
    """H.264 MP4 bytes of ``frames [T, H, W, 3]`` uint8 (even H and W), the same bytes on every run."""
    buffer = io.BytesIO()
    with Mp4Writer(buffer, fps, frames.shape[1], frames.shape[2], crf=crf, live=False) as writer:
        writer.write(frames)
    return buffer.getvalue()


def encode_clip(frames: np.ndarray, fps: int, crf: int | None = None) -> bytes:
    """A stored clip: ``frames [T, H, W, 3]`` uint8 as H.264 MP4 bytes, exact RGB (lossless ``libx264rgb``) by
    default, or 4:2:0 at ``crf`` (even H and W), a small fraction of the raw frames' bytes at Wan's 480x832.

    Lossless clips are intermediate data, so they take x264's fastest preset: 4-7x less encoding time than
    ``fast`` for 17-57 % more bytes (64x64 to 480x832), where encoding was a third of the clips stage's work."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264rgb" if crf is None else "libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24" if crf is None else "yuv420p"
        quality = {"qp": "0"} if crf is None else {"crf": str(crf)}
        preset = "ultrafast" if crf is None else "fast"
        stream.options = {**quality, "preset": preset, "threads": "1", "x264-params": "mbtree=0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def decode_clip(data: bytes) -> np.ndarray:
    """The frames of :func:`encode_clip` bytes.  -> [T, H, W, 3] uint8."""
    with av.open(io.BytesIO(data)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def decode_video(data: bytes) -> np.ndarray:
    """Every frame of a video file's bytes, through decord as the clips stage reads them.  -> [T, H, W, 3] uint8."""
    import decord

    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def fit_frame(picture: Image.Image, height: int, width: int) -> np.ndarray:
    """A picture centre-cropped to the aspect and resized.  -> ``[height, width, 3]`` uint8."""
    if picture.size != (width, height):
        picture = ImageOps.fit(picture, (width, height), method=Image.Resampling.BILINEAR)
    return np.asarray(picture, dtype=np.uint8)


def read_image(image: str | Path | np.ndarray, height: int, width: int) -> np.ndarray:
    """An image file or array as one frame (see :func:`fit_frame`).  -> ``[height, width, 3]`` uint8."""
    if isinstance(image, np.ndarray):
        picture = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    else:
        try:
            with Image.open(image) as opened:
                picture = opened.convert("RGB")
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read image {image}: {err}") from None
    return fit_frame(picture, height, width)


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
