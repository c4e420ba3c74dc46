"""`causvid bench data`: how close the clips stage runs to raw decord decoding.

Renders test videos from ffmpeg's built-in sources (through PyAV's lavfi), measures decord's raw
decode rate on one core, then runs the clips stage end to end (its own local Ray with 1, then 2
CPUs; manifest read, caption embedding, probe, decode, filter, cut, Parquet writes) and reports
source frames per second. `stage_vs_raw_decode` = (stage frames/s per core at 1 CPU) / (raw decode
frames/s on one core). `embedding_seconds` is the caption embedding's own cost (a task in a fresh one-CPU Ray:
starting its worker, loading the text encoder, embedding the captions), which the stage overlaps with curation
where it has a CPU of its own.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import av
import decord
import ray

from infra import storage
from infra.config import load_config
from pipelines import clips
from pipelines.captions import start_embedding
from pipelines.workflow import StageContext

SOURCES = ("testsrc2", "mandelbrot", "life", "cellauto")


def render_source(source: str, width: int, height: int, fps: int, seconds: float) -> bytes:
    """An H.264 MP4 of one of ffmpeg's generated sources (`testsrc2`, `mandelbrot`, `life`, `cellauto`)."""
    options = f"size={width}x{height}:rate={fps}"
    if source == "life":
        options += ":mold=10:ratio=0.3:seed=1"
    elif source == "cellauto":
        options += ":seed=1"
    buffer = io.BytesIO()
    with av.open(f"{source}={options}", format="lavfi") as reader, av.open(buffer, "w", format="mp4") as writer:
        stream = writer.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast", "threads": "1"}
        for index, frame in enumerate(reader.decode(video=0)):
            if index >= int(seconds * fps):
                break
            frame = frame.reformat(format="yuv420p")
            frame.pts = None
            for packet in stream.encode(frame):
                writer.mux(packet)
        for packet in stream.encode():
            writer.mux(packet)
    return buffer.getvalue()


def raw_decode_fps(videos: list[bytes]) -> tuple[int, float]:
    """Frames and frames/s of decord decoding every frame at full size on one thread."""
    frames, started = 0, time.perf_counter()
    for data in videos:
        reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
        frames += reader.get_batch(list(range(len(reader)))).shape[0]
    return frames, frames / (time.perf_counter() - started)


@contextmanager
def fresh_ray(num_cpus: int) -> Iterator[None]:
    """A local Ray of its own with `num_cpus` CPUs for one measurement, shut down after it."""
    ray.shutdown()
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def stage_fps(manifest: str, root: Path, num_cpus: int, overrides: list[str]) -> dict[str, Any]:
    """Run the clips stage in a fresh local Ray with `num_cpus` CPUs; source frames per second of wall time."""
    with fresh_ray(num_cpus):
        config = load_config(None, [f"storage.root={root}", f"clips.manifest={manifest}", *overrides])
        ctx = StageContext("clips", config, {}, str(root / f"clips-{num_cpus}cpu"), f"bench{num_cpus}")
        started = time.perf_counter()
        result = clips.run(ctx)
        seconds = time.perf_counter() - started
    frames = result["counts"]["source_frames"]
    return {
        "cpus": num_cpus,
        "seconds": round(seconds, 3),
        "seconds_curate": result["summary"]["seconds_curate"],
        "source_frames": frames,
        "clips_out": result["counts"]["clips_out"],
        "fps": round(frames / seconds, 1),
        "fps_per_core": round(frames / seconds / num_cpus, 1),
    }


def embedding_seconds(captions: list[str], preset: str, text_path: str | None) -> float:
    """Wall seconds of the stage's caption-embedding task alone, in a fresh one-CPU Ray."""
    with fresh_ray(1):
        started = time.perf_counter()
        ray.get(start_embedding(captions, preset, text_path))
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="causvid bench data", description=__doc__)
    parser.add_argument("--videos", type=int, default=100, help="test videos, cycling through the sources")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="clips config, e.g. clips.size=128")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="causvid-bench-") as tmp:
        root = Path(tmp)
        videos = [
            render_source(SOURCES[i % len(SOURCES)], args.width, args.height, args.fps, args.seconds)
            for i in range(args.videos)
        ]
        lines, captions = ["uri,caption"], []
        for index, data in enumerate(videos):
            storage.write_bytes(str(root / "videos" / f"{index:04d}.mp4"), data)
            captions.append(f"{SOURCES[index % len(SOURCES)]} number {index}")
            lines.append(f"videos/{index:04d}.mp4,{captions[-1]}")
        (root / "manifest.csv").write_text("\n".join(lines) + "\n")
        raw_frames, raw = raw_decode_fps(videos)
        runs = [stage_fps(str(root / "manifest.csv"), root, cpus, args.overrides) for cpus in args.cpus]
        model = load_config(None, args.overrides).model
        embedding = embedding_seconds(captions, model.preset, model.text_path)
    first = runs[0]
    return {
        "stage_vs_raw_decode": round(first["fps_per_core"] / raw, 3),
        "embedding_seconds": round(embedding, 3),
        "raw_decode": {"frames": raw_frames, "fps_one_core": round(raw, 1)},
        "stage": runs,
        "stage_vs_raw_decode_by_cpus": {str(r["cpus"]): round(r["fps_per_core"] / raw, 3) for r in runs},
        "videos": {
            "count": args.videos,
            "seconds": args.seconds,
            "size": f"{args.width}x{args.height}",
            "fps": args.fps,
            "sources": list(SOURCES),
        },
    }


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
