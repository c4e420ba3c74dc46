"""The `synthetic` stage: render the shapes world to H.264 MP4 files with a Ray Data job.

Output under the stage folder: `videos/NNNNNN.mp4` and `manifest.parquet` with one row per video:
`index, uri, caption, shape, color, background, motion, period, phase` (the manifest the clips stage
reads). Video `i` depends only on (seed, i), so reruns are byte-identical and a resumed run skips the
videos already written. All writes go through `infra.storage`, so the root may be local or s3://.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from infra import storage
from pipelines.shapes_world import ShapeClip, render, sample_clip
from pipelines.video import encode_mp4
from pipelines.workflow import StageContext

MANIFEST_NAME = "manifest.parquet"
ATTRIBUTES = ("shape", "color", "background", "motion", "period", "phase")


def manifest_uri(output_uri: str) -> str:
    """Where a synthetic output keeps its manifest of `uri, caption` and attributes."""
    return storage.join(output_uri, MANIFEST_NAME)


def render_videos(
    batch: dict[str, np.ndarray], *, videos_uri: str, seed: int, size: int, fps: int, seconds: float
) -> dict[str, np.ndarray]:
    """Render and write the MP4 of every `id` in the batch not already present; return its manifest rows."""
    rows: dict[str, list[Any]] = {"index": [], "uri": [], "caption": [], "rendered": [], "bytes": []}
    rows.update({name: [] for name in ATTRIBUTES})
    for index in batch["id"].tolist():
        clip: ShapeClip = sample_clip(seed, index)
        uri = storage.join(videos_uri, f"{index:06d}.mp4")
        rendered = not storage.exists(uri)
        size_bytes = 0
        if rendered:
            data = encode_mp4(render(clip, size, fps, seconds), fps)
            storage.write_bytes(uri, data)
            size_bytes = len(data)
        rows["index"].append(index)
        rows["uri"].append(uri)
        rows["caption"].append(clip.caption)
        rows["rendered"].append(rendered)
        rows["bytes"].append(size_bytes)
        for name in ATTRIBUTES:
            rows[name].append(getattr(clip, name))
    return {name: np.asarray(values) for name, values in rows.items()}


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.config.synthetic
    size = cfg.size + cfg.size % 2  # H.264 in yuv420p needs even sides
    dataset = ray.data.range(cfg.num_videos, override_num_blocks=math.ceil(cfg.num_videos / cfg.videos_per_task))
    dataset = dataset.map_batches(
        render_videos,
        batch_size=cfg.videos_per_task,
        batch_format="numpy",
        fn_kwargs={
            "videos_uri": ctx.output("videos"),
            "seed": cfg.seed,
            "size": size,
            "fps": cfg.fps,
            "seconds": cfg.seconds,
        },
    )
    table = pa.concat_tables(ray.get(dataset.to_arrow_refs())).sort_by("index")
    rendered = int(pc.sum(table["rendered"]).as_py() or 0)
    written = int(pc.sum(table["bytes"]).as_py() or 0)
    storage.write_parquet(manifest_uri(ctx.output_uri), table.drop_columns(["rendered", "bytes"]))
    frames_per_video = max(1, int(round(cfg.seconds * cfg.fps)))
    return {
        "counts": {
            "videos": table.num_rows,
            "rendered": rendered,
            "skipped": table.num_rows - rendered,
            "frames": table.num_rows * frames_per_video,
            "captions": len(set(table["caption"].to_pylist())),
        },
        "summary": {"manifest": manifest_uri(ctx.output_uri), "bytes_written": written, "size": size},
    }
