"""The workers' side of the clips stage: probe, decode, resample, cut, filter and write one group of videos.

Ray imports a task's module in every worker that runs it; this one imports only the decoding, Parquet and storage
libraries (about a second), not torch or the tracking client (about five), because a curation worker needs neither.
The stage itself and the manifest are in :mod:`pipelines.clips`, which documents the shards' columns; their Arrow
schema is here, with the writer.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import av
import decord
import numpy as np
import pyarrow as pa
import ray

from infra import storage
from pipelines.video import encode_clip

if TYPE_CHECKING:
    from infra.config import ClipsConfig
    from model.presets import Preset

REJECT_REASONS = (
    "unsupported_scheme",
    "empty_caption",
    "missing",
    "empty",
    "unreadable",
    "no_video_stream",
    "truncated",
    "decode_error",
    "too_small",
    "too_short",
    "blank",
    "static",
    "error",
)
CLIP_DROP_REASONS = ("blank", "static")
READ_RETRIES = 3
READ_RETRY_PAUSE_S = 2.0
TRUNCATED_FRACTION = 0.75
TRUNCATED_SLACK_FRAMES = 2  # a file that fails to decode and ends this many frames short of its header is cut
DECODE_CHUNK = 64
REJECTED_URI = ("rejected", "rejected.parquet")
GROUPS_DIR = "_groups"

CLIP_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("video_index", pa.int64()),
        ("uri", pa.string()),
        ("caption", pa.string()),
        ("meta", pa.string()),
        ("start_frame", pa.int32()),
        ("start_time", pa.float64()),
        ("fps", pa.float32()),
        ("num_frames", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("frames", pa.binary()),
        ("motion_score", pa.float32()),
        ("text_emb", pa.binary()),
        ("text_mask", pa.binary()),
        ("text_len", pa.int32()),
        ("text_dim", pa.int32()),
        ("source_fps", pa.float32()),
        ("source_width", pa.int32()),
        ("source_height", pa.int32()),
        ("codec", pa.string()),
    ]
)
REJECTED_SCHEMA = pa.schema(
    [
        ("video_index", pa.int64()),
        ("uri", pa.string()),
        ("caption", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


class ReadFailed(OSError):
    """A video that is there but could not be read (a storage outage): its group's task is retried, and a read that
    keeps failing fails the stage; it is never counted as a rejection."""


class Rejected(Exception):
    """A video that yields no clip, with one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Rules:
    """What a video must satisfy and what a clip looks like; the part of ClipsConfig the tasks need."""

    fps: int
    height: int
    width: int
    clip_frames: int
    stride_frames: int
    min_seconds: float
    min_side: int
    static_threshold: float
    blank_threshold: float
    rows_per_shard: int
    crf: int | None

    @classmethod
    def from_config(cls, cfg: ClipsConfig, preset: Preset) -> Rules:
        """The section's settings, its unset shape ones (size, fps, clip length) the preset's."""
        given = {name: getattr(cfg, name) for name in cls.__dataclass_fields__ if hasattr(cfg, name)}
        height = cfg.height or cfg.size or preset.height
        width = cfg.width or cfg.size or preset.width
        return cls(**{
            **given,
            "fps": cfg.fps or preset.fps,
            "height": height,
            "width": width,
            "clip_frames": cfg.clip_frames or preset.clip_frames,
        })


@dataclass(frozen=True)
class Probe:
    """Container facts read from the header: codec, size, frame rate, declared duration (s)."""

    codec: str
    width: int
    height: int
    fps: float
    duration: float


def probe(data: bytes) -> Probe:
    """Header-only look at a video file's bytes; raises Rejected when it is not a video."""
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise Rejected("no_video_stream", f"streams: {[s.type for s in container.streams]}")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = stream.frames / fps if stream.frames and fps else 0.0
            return Probe(stream.codec_context.name, stream.width, stream.height, fps, duration)
    except Rejected:
        raise
    except Exception as err:  # PyAV raises many error kinds for garbage input
        raise Rejected("unreadable", f"{type(err).__name__}: {err}") from None


def resampled_indices(starts: np.ndarray, end: float, target_fps: float) -> np.ndarray:
    """Source frame shown at each target-rate instant k / target_fps, from the source frames' presentation times
    ``starts [S]`` (seconds, increasing; any frame rate, constant or not) and the time the last one ends.
    -> [N] int64."""
    count = int(math.floor((end - starts[0]) * target_fps + 1e-6))
    instants = starts[0] + np.arange(count) / target_fps
    return np.maximum(np.searchsorted(starts, instants + 1e-6, side="right") - 1, 0).astype(np.int64)


def clip_starts(num_frames: int, clip_frames: int, stride_frames: int) -> list[int]:
    return list(range(0, num_frames - clip_frames + 1, stride_frames))


def decode_size(width: int, height: int, out_height: int, out_width: int) -> tuple[int, int]:
    """Decoder output (w, h), aspect kept, just covering out_height x out_width, so a centre crop gives it."""
    scale = max(out_width / width, out_height / height)
    return max(out_width, int(round(width * scale))), max(out_height, int(round(height * scale)))


def center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """frames: [T, h, w, 3] with h >= height, w >= width -> [T, height, width, 3]."""
    top, left = (frames.shape[1] - height) // 2, (frames.shape[2] - width) // 2
    return frames[:, top : top + height, left : left + width]


def blank_frames(frames: np.ndarray, threshold: float) -> np.ndarray:
    """[T] bool: frames whose pixel standard deviation (0..1) is below `threshold` (black, white, any flat colour)."""
    return frames.reshape(len(frames), -1).std(axis=1) / 255.0 < threshold


def motion_score(frames: np.ndarray) -> float:
    """Mean absolute difference (0..1) between consecutive frames.  frames: [T, H, W, 3] uint8."""
    if len(frames) < 2:
        return 0.0
    return float(np.abs(np.diff(frames.astype(np.int16), axis=0)).mean() / 255.0)


def curate_video(data: bytes, rules: Rules) -> tuple[Probe, int, list[dict[str, Any]], Counter[str]]:
    """Cut one video's bytes into clips that pass the rules.

    Returns the probe, the number of decodable source frames, the kept clips (`start_frame`,
    `start_time`, `frames` [T, H, W, 3] uint8, `motion_score`) and the count of clips dropped per reason.
    Raises Rejected when the video cannot be read or yields no clip. The kept clips of one video are
    held in memory (at the target size) until it is decided; source frames are decoded in bounded chunks.
    """
    if not data:
        raise Rejected("empty", "zero bytes")
    info = probe(data)
    if min(info.width, info.height) < rules.min_side:
        raise Rejected("too_small", f"{info.width}x{info.height} < {rules.min_side}")
    if 0 < info.duration < rules.min_seconds:
        raise Rejected("too_short", f"{info.duration:.2f} s declared < {rules.min_seconds} s")
    try:
        return _curate_decoded(data, info, rules)
    except Rejected as rej:
        if rej.reason != "decode_error" or info.duration <= 0:
            raise
        decodable = decodable_seconds(data)
        if decodable < info.duration - TRUNCATED_SLACK_FRAMES / max(info.fps, 1.0):
            raise Rejected("truncated", f"{decodable:.2f} s decodable of {info.duration:.2f} s declared") from None
        raise


def decodable_seconds(data: bytes) -> float:
    """How far into a video PyAV decodes before the data ends or breaks (the timestamp of its last good frame)."""
    seconds = 0.0
    try:
        with av.open(io.BytesIO(data)) as container:
            for frame in container.decode(container.streams.video[0]):
                seconds = float(frame.time) if frame.time is not None else seconds
    except Exception:  # the point where a cut file breaks is what we are measuring
        pass
    return seconds


def _curate_decoded(data: bytes, info: Probe, rules: Rules) -> tuple[Probe, int, list[dict[str, Any]], Counter[str]]:
    width, height = decode_size(info.width, info.height, rules.height, rules.width)
    try:
        reader = decord.VideoReader(io.BytesIO(data), num_threads=1, width=width, height=height)
        num_source, source_fps = len(reader), float(reader.get_avg_fps())
        times = reader.get_frame_timestamp(range(num_source)) if num_source else np.zeros((0, 2))
    except Exception as err:
        raise Rejected("decode_error", f"{type(err).__name__}: {err}") from None
    if num_source == 0 or source_fps <= 0:
        raise Rejected("decode_error", "no decodable frames")
    starts_at, end = times[:, 0], max(float(times[-1, 1]), float(times[-1, 0]) + 1.0 / source_fps)
    seconds = end - float(starts_at[0])
    if info.duration > 0 and seconds < TRUNCATED_FRACTION * info.duration:
        raise Rejected("truncated", f"{seconds:.2f} s decodable of {info.duration:.2f} s declared")
    indices = resampled_indices(starts_at, end, rules.fps)
    starts = clip_starts(len(indices), rules.clip_frames, rules.stride_frames)
    if seconds < rules.min_seconds or not starts:
        raise Rejected("too_short", f"{seconds:.2f} s, {len(indices)} frames at {rules.fps} fps")
    clips, dropped = [], Counter()
    for start, frames in _decode_clips(reader, indices, starts, rules, max(1, int(source_fps))):
        if blank_frames(frames, rules.blank_threshold).any():
            dropped["blank"] += 1
            continue
        score = motion_score(frames)
        if score < rules.static_threshold:
            dropped["static"] += 1
            continue
        clips.append(
            {
                "start_frame": start,
                "start_time": float(starts_at[indices[start]]),
                "frames": frames,
                "motion_score": score,
            }
        )
    if not clips:
        reason = dropped.most_common(1)[0][0]
        raise Rejected(reason, f"all {len(starts)} clips {reason}")
    return info, num_source, clips, dropped


def _decode_clips(
    reader: decord.VideoReader, indices: np.ndarray, starts: list[int], rules: Rules, max_gap: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start, frames [T, H, W, 3] uint8) per clip, decoding contiguous source runs in chunks.

    decord seeks on every non-consecutive index, so the source frames the clips need are read as
    runs (gaps of at most `max_gap` frames are decoded through) and the resampled ones picked out.
    """
    wanted = np.unique(np.concatenate([indices[s : s + rules.clip_frames] for s in starts]))
    breaks = np.nonzero(np.diff(wanted) > max_gap)[0]
    runs = zip(np.r_[wanted[0], wanted[breaks + 1]], np.r_[wanted[breaks], wanted[-1]])
    decoded: dict[int, np.ndarray] = {}
    pending = list(starts)
    for low, high in runs:
        for first in range(int(low), int(high) + 1, DECODE_CHUNK):
            last = min(int(high), first + DECODE_CHUNK - 1)
            try:
                batch = reader.get_batch(list(range(first, last + 1))).asnumpy()
            except Exception as err:
                raise Rejected("decode_error", f"frames {first}-{last}: {type(err).__name__}: {err}") from None
            for source in np.intersect1d(wanted, np.arange(first, last + 1)):
                decoded[int(source)] = batch[source - first]
            while pending and int(indices[pending[0] + rules.clip_frames - 1]) <= last:
                start = pending.pop(0)
                window = indices[start : start + rules.clip_frames]
                yield start, np.ascontiguousarray(center_crop(np.stack([decoded[int(i)] for i in window]), rules.height, rules.width))
                keep = int(indices[pending[0]]) if pending else last + 1
                decoded = {i: f for i, f in decoded.items() if i >= keep}


class ShardWriter:
    """Buffers clip rows and writes a Parquet shard through storage every `rows_per_shard` rows."""

    def __init__(self, output_uri: str, group: int, rows_per_shard: int) -> None:
        self.output_uri, self.group, self.rows_per_shard = output_uri, group, rows_per_shard
        self.rows: list[dict[str, Any]] = []
        self.shards: list[str] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = shard_name(self.group, len(self.shards))
        storage.write_parquet(storage.join(self.output_uri, name), pa.Table.from_pylist(self.rows, schema=CLIP_SCHEMA))
        self.shards.append(name)
        self.rows = []


def shard_name(group: int, number: int) -> str:
    return f"clips-g{group:05d}-{number:03d}.parquet"


def remove_group_shards(output_uri: str, group: int) -> None:
    """Shards an interrupted attempt at this group wrote before it died; the re-run writes its own."""
    prefix = shard_name(group, 0)[: -len("000.parquet")]
    for uri in storage.list_files(output_uri, ".parquet"):
        if posixpath.basename(uri).startswith(prefix):
            storage.delete_file(uri)


def marker_name(group: int) -> str:
    """A group's marker, relative to the output: written last, so its presence means the group is complete."""
    return posixpath.join(GROUPS_DIR, f"{group:05d}.json")


def group_marker(output_uri: str, group: int) -> str:
    return storage.join(output_uri, marker_name(group))


def curate_group(
    batch: dict[str, np.ndarray], *, output_uri: str, rules: dict[str, Any], text: list[ray.ObjectRef]
) -> dict[str, np.ndarray]:
    """One Ray task: curate the videos of each group row, write its shards, then its marker.

    `text` is `[ref]` to the captions' :data:`pipelines.captions.Embeddings`, which may still be in the making:
    the group's clips are cut meanwhile and held until they are ready, then written as they come (a task waiting
    in `ray.get` gives its CPU back). A group whose video read fails (`ReadFailed`, after the S3 client's own
    retries) is redone from scratch a few times, with a growing pause, before the error fails the stage.
    """
    rule = Rules(**rules)
    markers = []
    for group, videos_json in zip(batch["group"].tolist(), batch["videos"].tolist()):
        for attempt in range(READ_RETRIES + 1):
            try:
                marker = _curate_one_group(output_uri, group, json.loads(videos_json), rule, text[0])
                break
            except ReadFailed:
                if attempt == READ_RETRIES:
                    raise
                time.sleep(READ_RETRY_PAUSE_S * 2**attempt)
        markers.append(json.dumps(marker))
    return {"marker": np.asarray(markers, dtype=object)}


class _GroupRows:
    """Clip rows of one group on their way to its shards: held until the caption embeddings are ready (checked
    without waiting after each video), then written as they come."""

    def __init__(self, writer: ShardWriter, text: ray.ObjectRef, counts: Counter[str]) -> None:
        self.writer, self.text, self.counts = writer, text, counts
        self.held: list[tuple[dict[str, Any], Probe, list[dict[str, Any]]]] = []
        self.embedding: tuple[dict[str, int], np.ndarray, np.ndarray] | None = None

    def add(self, video: dict[str, Any], info: Probe, clips: list[dict[str, Any]]) -> None:
        self.held.append((video, info, clips))
        if self.embedding is not None or ray.wait([self.text], timeout=0)[0]:
            self.finish()

    def finish(self) -> None:
        """Wait for the embeddings if they are not there yet and write every held row."""
        if self.embedding is None and self.held:
            captions, emb, mask = ray.get(self.text)
            self.embedding = ({caption: i for i, caption in enumerate(captions)}, emb, mask)
        for video, info, clips in self.held:
            self._write(video, info, clips)
        self.held = []

    def _write(self, video: dict[str, Any], info: Probe, clips: list[dict[str, Any]]) -> None:
        assert self.embedding is not None
        row_of_caption, text_emb, text_mask = self.embedding
        k = row_of_caption[video["caption"]]
        emb, mask = text_emb[k], text_mask[k]
        meta = json.loads(video["meta"])
        if mask[-1]:
            meta["caption_truncated"] = True
            self.counts["captions_truncated"] += 1
        for number, clip in enumerate(clips):
            num_frames, height, width = clip["shape"]
            self.writer.add(
                {
                    "clip_id": f"{video['index']:06d}-{number:04d}",
                    **{key: video[key] for key in ("video_index", "uri", "caption")},
                    "meta": json.dumps(meta, sort_keys=True),
                    "start_frame": clip["start_frame"],
                    "start_time": clip["start_time"],
                    "fps": clip["fps"],
                    "num_frames": num_frames,
                    "height": height,
                    "width": width,
                    "frames": clip["mp4"],
                    "motion_score": clip["motion_score"],
                    "text_emb": np.ascontiguousarray(emb, dtype="<f4").tobytes(),
                    "text_mask": np.asarray(mask, dtype=np.uint8).tobytes(),
                    "text_len": emb.shape[0],
                    "text_dim": emb.shape[1],
                    "source_fps": info.fps,
                    "source_width": info.width,
                    "source_height": info.height,
                    "codec": info.codec,
                }
            )
            self.counts["clips_out"] += 1


def _curate_one_group(
    output_uri: str, group: int, videos: list[dict[str, Any]], rule: Rules, text: ray.ObjectRef
) -> dict[str, Any]:
    """Curate one group's videos, write its shards, then its marker (last); returns the marker."""
    remove_group_shards(output_uri, group)
    writer = ShardWriter(output_uri, group, rule.rows_per_shard)
    counts: Counter[str] = Counter()
    rows = _GroupRows(writer, text, counts)
    rejected: list[dict[str, Any]] = []
    for video in videos:
        counts["videos_in"] += 1
        try:
            if video.get("reject"):
                raise Rejected(video["reject"], video.get("reject_detail", ""))
            data = _read_video(video["uri"])
            info, num_source, clips, dropped = curate_video(data, rule)
        except ReadFailed:
            raise
        except Rejected as rej:
            counts[f"rejected_{rej.reason}"] += 1
            rejected.append({**_video_fields(video), "reason": rej.reason, "detail": rej.detail[:500]})
            continue
        except Exception as err:  # a bug or an unforeseen input must not stop the other videos
            counts["rejected_error"] += 1
            rejected.append({**_video_fields(video), "reason": "error", "detail": f"{type(err).__name__}: {err}"[:500]})
            continue
        counts["accepted"] += 1
        counts["source_frames"] += num_source
        for reason, number in dropped.items():
            counts[f"clips_dropped_{reason}"] += number
        encoded = [
            {**{k: v for k, v in clip.items() if k != "frames"}, "shape": clip["frames"].shape[:3],
             "fps": float(rule.fps), "mp4": encode_clip(clip["frames"], rule.fps, rule.crf)}
            for clip in clips
        ]
        rows.add(video, info, encoded)
    rows.finish()
    writer.flush()
    marker = {"group": group, "shards": writer.shards, "counts": dict(counts), "rejected": rejected}
    storage.write_json(group_marker(output_uri, group), marker)
    return marker


def _read_video(uri: str) -> bytes:
    """The bytes of a video; a local file that is not there is `missing`, an S3 read that fails is `ReadFailed`."""
    try:
        present = bool(uri) and storage.exists(uri)
        data = storage.read_bytes(uri) if present else b""
    except OSError as err:
        if storage.is_s3(uri):
            raise ReadFailed(f"{uri}: {type(err).__name__}: {err}") from err
        raise Rejected("unreadable", f"{type(err).__name__}: {err}") from None
    if not present:
        raise Rejected("missing", f"no object at {uri!r}")
    return data


def _video_fields(video: Mapping[str, Any]) -> dict[str, Any]:
    """A rejected row keeps the URI as the user wrote it in the manifest."""
    return {"video_index": video["video_index"], "uri": video["source_uri"], "caption": video["caption"]}
