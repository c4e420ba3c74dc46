import json
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from infra import storage
from infra.config import load_config
from model.presets import get_preset
from pipelines import clips, curation, shard_rows, synthetic
from pipelines.oracle import describe
from pipelines.shapes_world import sample_clip
from pipelines.video import decode_video
from pipelines.workflow import StageContext

SETTINGS = ["synthetic.num_videos=6", "synthetic.seconds=2", "synthetic.videos_per_task=2", "synthetic.seed=11"]
ATTRIBUTES = ("shape", "color", "background", "motion")


def synthetic_context(root: Path) -> StageContext:
    config = load_config(None, [f"storage.root={root}", *SETTINGS])
    return StageContext("synthetic", config, {}, str(root / "synthetic" / "test"), "test")


def video_bytes(output_uri: str) -> dict[str, bytes]:
    return {Path(uri).name: storage.read_bytes(uri) for uri in storage.list_files(storage.join(output_uri, "videos"))}


@pytest.fixture(scope="module")
def rendered(ray_local, tmp_path_factory: pytest.TempPathFactory) -> tuple[StageContext, dict]:
    ctx = synthetic_context(tmp_path_factory.mktemp("synthetic"))
    return ctx, synthetic.run(ctx)


def test_manifest_and_videos_match_the_generator(rendered) -> None:
    ctx, result = rendered
    assert result["counts"] == {"videos": 6, "rendered": 6, "skipped": 0, "frames": 144, "captions": 6}
    rows = storage.read_parquet(synthetic.manifest_uri(ctx.output_uri)).to_pylist()
    assert [row["index"] for row in rows] == list(range(6))
    for row in rows:
        clip = sample_clip(11, row["index"])
        assert row["caption"] == clip.caption and all(row[a] == getattr(clip, a) for a in ATTRIBUTES)
        frames = decode_video(storage.read_bytes(row["uri"]))
        assert frames.shape == (24, 64, 64, 3)
        found = describe(frames)
        assert all(found[a] == row[a] for a in ATTRIBUTES)


def test_stage_is_deterministic_and_resumes(rendered, tmp_path: Path) -> None:
    ctx, _ = rendered
    again = synthetic_context(tmp_path)
    synthetic.run(again)
    assert video_bytes(again.output_uri) == video_bytes(ctx.output_uri)
    first, second = (storage.read_parquet(synthetic.manifest_uri(c.output_uri)) for c in (ctx, again))
    assert first.drop_columns(["uri"]).equals(second.drop_columns(["uri"]))
    Path(again.output("videos", "000004.mp4")).unlink()
    resumed = synthetic.run(again)
    assert resumed["counts"]["rendered"] == 1 and resumed["counts"]["skipped"] == 5
    assert video_bytes(again.output_uri) == video_bytes(ctx.output_uri)


def test_clips_stage_reads_the_synthetic_output(rendered, tmp_path: Path) -> None:
    ctx, _ = rendered
    overrides = ["clips.clip_frames=17", "clips.stride_frames=4", "clips.videos_per_task=3"]
    config = load_config(None, [f"storage.root={tmp_path}", *overrides])
    clips_ctx = StageContext("clips", config, {"synthetic": ctx.output_uri}, str(tmp_path / "clips" / "t"), "t")
    result = clips.run(clips_ctx)
    assert result["counts"]["accepted"] == 6 and result["counts"]["clips_out"] == 12
    storage.write_manifest(clips_ctx.output_uri, {"counts": result["counts"]})
    for row in clips.read_clips(clips_ctx.output_uri).take_all():
        frames = shard_rows.decode_clips({k: [row[k]] for k in row})["frames"][0]
        meta = json.loads(row["meta"])
        assert meta["index"] == row["video_index"]
        assert all(describe(frames)[a] == meta[a] for a in ("shape", "color", "background"))


def test_s3_round_trip(ray_local, s3_bucket: str) -> None:
    """The code inside the Ray tasks, run here against a real S3 server: render, then curate while the caption
    embeddings are still being made (a task that takes a second), each clip getting its own caption's."""
    root = f"s3://{s3_bucket}/run"
    rows = synthetic.render_videos(
        {"id": np.arange(2)}, videos_uri=f"{root}/synthetic/videos", seed=11, size=64, fps=12, seconds=2.0
    )
    assert storage.list_files(f"{root}/synthetic/videos") == list(rows["uri"])
    config = load_config(None, ["clips.clip_frames=17", "clips.stride_frames=4"])
    captions = [str(c) for c in rows["caption"]]
    text = (captions, np.stack([np.full((4, 8), i, np.float32) for i in range(2)]), np.ones((2, 4), bool))
    slow = ray.remote(lambda embeddings: time.sleep(1.0) or embeddings).remote(text)
    videos = [
        {"index": i, "video_index": i, "uri": str(u), "source_uri": str(u), "caption": str(c), "meta": "{}"}
        for i, (u, c) in enumerate(zip(rows["uri"], rows["caption"]))
    ]
    curation.curate_group(
        {"group": np.array([0]), "videos": np.array([json.dumps(videos)], dtype=object)},
        output_uri=f"{root}/clips",
        rules=curation.Rules.from_config(config.clips, get_preset(config.model.preset)).__dict__,
        text=[slow],
    )
    marker = storage.read_json(curation.group_marker(f"{root}/clips", 0))
    assert marker["counts"]["clips_out"] == 4 and not marker["rejected"]
    table = storage.read_parquet(f"{root}/clips/{marker['shards'][0]}")
    batch = shard_rows.decode_clips(table.to_pydict())
    assert batch["frames"].shape == (4, 17, 64, 64, 3) and batch["text_emb"].shape == (4, 4, 8)
    for caption, emb in zip(table.column("caption").to_pylist(), batch["text_emb"]):
        assert np.array_equal(emb, np.full((4, 8), captions.index(caption), np.float32))
