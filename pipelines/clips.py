"""The `clips` stage: curate captioned videos (local or s3://) into fixed-length, text-embedded clips.

The driver reads the manifest and starts one Ray task that embeds every distinct caption once
(:mod:`pipelines.captions`); a Ray Data job curates groups of `videos_per_task` videos meanwhile, one task per
group (:mod:`pipelines.curation`), each fetching the embeddings only to write its shards:
probe (PyAV, header only), reject what cannot make a clip, decode with decord straight from the bytes
(only the frames the clips need, resized in the decoder with the aspect kept so that the target
height x width just fits), resample to the target fps by the frames' own timestamps (so variable frame
rates resample correctly), centre-crop, cut, drop blank or static clips, and write Parquet shards.
Size, fps and clip length are the preset's unless the clips section sets them. A group's marker `_groups/NNNNN.json` is
written after its shards, so an interrupted run skips finished groups. Every video that yields no
clip lands in `rejected/rejected.parquet` with its reason; no single input can stop the stage.

Clip shards (`clips-gGGGGG-PPP.parquet`, at most `rows_per_shard` rows each), one row per clip:

    clip_id        string   "<video_index:06d>-<clip:04d>"
    video_index    int64    row of the input manifest
    uri            string   the source video
    caption        string
    meta           string   JSON of the manifest's other columns (e.g. the shapes world's attributes)
    start_frame    int32    first frame, counted at the target fps
    start_time     float64  seconds into the source video
    fps            float32  target frame rate
    num_frames     int32    T = clip_frames (1 + 4n)
    height, width  int32    H x W (the preset's, e.g. 480 x 832 for Wan)
    frames         binary   the clip as an H.264 MP4 (lossless RGB, or 4:2:0 at `clips.crf`); see shard_rows.decode_clips
    motion_score   float32  mean absolute frame difference in 0..1
    text_emb       binary   float32 little-endian, C order, shape [L, D], zero where masked
    text_mask      binary   uint8 (1 = token), shape [L]
    text_len       int32    L
    text_dim       int32    D
    source_fps     float32
    source_width   int32
    source_height  int32
    codec          string

`read_clips(uri)` gives them as a Ray Dataset and `pipelines.shard_rows.decode_clips(batch)` turns a batch
into arrays.
Rejected rows: `video_index int64, uri string, caption string, reason string, detail string`, reasons
in `REJECT_REASONS`.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import urllib.parse
from collections import Counter
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import ray

from infra import storage
from infra.config import ClipsConfig
from infra.preflight import check_manifest
from model.presets import get_preset
from pipelines.captions import start_embedding
from pipelines.curation import (
    CLIP_DROP_REASONS,
    REJECT_REASONS,
    REJECTED_SCHEMA,
    REJECTED_URI,
    Rules,
    curate_group,
    group_marker,
    marker_name,
)
from pipelines.workflow import StageContext

SUPPORTED_SCHEMES = ("", "file", "s3")


def read_manifest(uri: str) -> list[dict[str, Any]]:
    """Rows of a CSV, JSONL or Parquet manifest with at least `uri, caption`, read by pyarrow in the driver, which
    needs every row to group the videos into tasks (a Ray Data read would gather them there too, after a second of
    starting its job).

    Video URIs may be `s3://...`, `file://...` or plain paths, relative ones taken relative to the manifest's
    folder; a row with another scheme or an empty caption carries the reason it will be rejected for (`reject`).
    Other columns go to `meta` (JSON). Each row gets `video_index` (its row number), `index` (the same, for clip
    ids) and `source_uri` (the URI as written).
    """
    check_manifest(uri)
    lower = uri.lower()
    if lower.endswith(".parquet"):
        table = storage.read_parquet(uri)
    else:
        table = (pacsv.read_csv if lower.endswith(".csv") else pajson.read_json)(pa.BufferReader(storage.read_bytes(uri)))
    base = posixpath.dirname(uri) if storage.is_s3(uri) else os.path.dirname(storage.normalize(uri))
    rows = []
    for number, row in enumerate(table.to_pylist()):
        source_uri = str(row.pop("uri") or "")
        caption = row.pop("caption")
        caption = "" if caption is None else str(caption)
        entry = {"index": number, "video_index": number, "source_uri": source_uri, "caption": caption}
        entry["uri"], entry["reject"], entry["reject_detail"] = _video_uri(source_uri, base)
        if not entry["reject"] and not caption.strip():
            entry["reject"], entry["reject_detail"] = "empty_caption", "the manifest's caption is empty"
        rows.append({**entry, "meta": json.dumps(row, sort_keys=True, default=str)})
    return rows


def _video_uri(source_uri: str, base: str) -> tuple[str, str, str]:
    """(URI to read, rejection reason or '', detail) of a manifest's video URI."""
    kind = storage.scheme(source_uri)
    if kind not in SUPPORTED_SCHEMES:
        return source_uri, "unsupported_scheme", f"scheme {kind!r}: use s3://, file:// or a path"
    if kind == "s3":
        return source_uri, "", ""
    path = urllib.parse.unquote(urllib.parse.urlparse(source_uri).path) if kind == "file" else source_uri
    return (storage.join(base, path) if path and not os.path.isabs(path) else path), "", ""


def drop_duplicates(videos: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The first row of each (video, caption) pair, and how many repeats were dropped."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for video in videos:
        key = (video["uri"], video["caption"])
        if key not in seen:
            seen.add(key)
            kept.append(video)
    return kept, len(videos) - len(kept)


def run(ctx: StageContext) -> dict[str, Any]:
    cfg: ClipsConfig = ctx.config.clips
    rules = Rules.from_config(cfg, get_preset(ctx.config.model.preset))
    if cfg.manifest:
        manifest = cfg.manifest
    else:
        from pipelines.synthetic import manifest_uri

        manifest = manifest_uri(ctx.inputs["synthetic"])
    listed = read_manifest(manifest)
    videos, duplicates = drop_duplicates(listed)
    groups: dict[int, list[dict[str, Any]]] = {}
    for video in videos:
        groups.setdefault(video["index"] // cfg.videos_per_task, []).append(video)
    ctx.track_progress("groups", [marker_name(g) for g in sorted(groups)])
    pending = {g: vs for g, vs in groups.items() if not ctx.done(marker_name(g))}
    seconds_curate = 0.0
    if pending:
        started = time.perf_counter()
        captions = [v["caption"] for vs in pending.values() for v in vs if not v["reject"]]
        text = start_embedding(captions, ctx.config.model.preset, ctx.config.model.text_path)
        tasks = ray.data.from_items(
            [{"group": g, "videos": json.dumps(vs)} for g, vs in sorted(pending.items())],
            override_num_blocks=len(pending),
        ).map_batches(
            curate_group,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"output_uri": ctx.output_uri, "rules": asdict(rules), "text": [text]},
        )
        tasks.materialize()
        ray.get(text)  # an embedding that failed fails the stage, even where every video was rejected
        seconds_curate = time.perf_counter() - started
    markers = [storage.read_json(group_marker(ctx.output_uri, g)) for g in sorted(groups)]
    rejected = [row for marker in markers for row in marker["rejected"]]
    storage.write_parquet(ctx.output(*REJECTED_URI), pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA))
    totals: Counter[str] = Counter()
    for marker in markers:
        totals.update(marker["counts"])
    counts = {
        "videos_in": len(listed),
        "duplicates": duplicates,
        "accepted": totals["accepted"],
        "rejected": len(rejected),
        **{f"rejected_{reason}": totals[f"rejected_{reason}"] for reason in REJECT_REASONS},
        "clips_out": totals["clips_out"],
        "captions_truncated": totals["captions_truncated"],
        **{f"clips_dropped_{reason}": totals[f"clips_dropped_{reason}"] for reason in CLIP_DROP_REASONS},
        "shards": sum(len(m["shards"]) for m in markers),
        "source_frames": totals["source_frames"],
        "groups_run": len(pending),
        "groups_skipped": len(groups) - len(pending),
    }
    summary = {
        "manifest": manifest,
        "rejected": ctx.output(*REJECTED_URI),
        "clip_frames": rules.clip_frames,
        "seconds_curate": round(seconds_curate, 3),
    }
    return {"counts": counts, "summary": summary, "files": [name for marker in markers for name in marker["shards"]]}


def read_clips(uri: str) -> ray.data.Dataset:
    """The clip shards of a complete clips output as a Ray Dataset (columns as in the module docstring)."""
    files = storage.parquet_files(uri)
    if not files:
        raise FileNotFoundError(f"{uri} holds no clip shards")
    fs, _ = storage.resolve(uri)
    return ray.data.read_parquet([storage.resolve(f)[1] for f in files], filesystem=fs)
