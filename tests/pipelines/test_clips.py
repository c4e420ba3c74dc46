import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra import storage
from infra.config import load_config
from infra.errors import UserError
from model.presets import get_preset
from pipelines import clips, curation, shard_rows
from pipelines.captions import embed_captions
from pipelines.oracle import describe
from pipelines.workflow import StageContext
from tests.paths import REPO

CLIP_FRAMES = 17


def clips_context(root: Path, manifest: str, **overrides: object) -> StageContext:
    settings = {
        "clips.manifest": manifest,
        "clips.clip_frames": CLIP_FRAMES,
        "clips.stride_frames": 16,
        "clips.videos_per_task": 6,
        "clips.rows_per_shard": 3,
        **overrides,
    }
    config = load_config(None, [f"storage.root={root}", *(f"{k}={v}" for k, v in settings.items())])
    return StageContext("clips", config, {}, str(root / "clips" / "test"), "test")


@pytest.fixture(scope="module")
def curated(ray_local, footage: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[StageContext, dict]:
    ctx = clips_context(tmp_path_factory.mktemp("clips"), str(footage / "manifest.csv"))
    result = clips.run(ctx)
    storage.write_manifest(ctx.output_uri, {"counts": result["counts"]})
    return ctx, result


@pytest.fixture(scope="module")
def clip_rows(curated) -> list[dict]:
    """Every clip row, read back once through Ray Data."""
    ctx, _ = curated
    return clips.read_clips(ctx.output_uri).take_all()


def test_every_bad_input_and_filter_is_rejected_with_its_reason(curated, expected_reasons, accepted_names) -> None:
    ctx, result = curated
    rejected = storage.read_parquet(ctx.output(*curation.REJECTED_URI)).to_pylist()
    reasons = {Path(row["uri"]).name: row["reason"] for row in rejected}
    assert reasons == expected_reasons
    counts = result["counts"]
    assert counts["videos_in"] == len(accepted_names) + len(expected_reasons) + 2
    assert counts["accepted"] == len(accepted_names) + 2
    assert counts["rejected"] == len(expected_reasons)
    for reason in set(expected_reasons.values()):
        assert counts[f"rejected_{reason}"] == list(expected_reasons.values()).count(reason)


def test_clips_read_back_with_shapes_captions_and_embeddings(curated, clip_rows, accepted_names) -> None:
    ctx, result = curated
    rows = clip_rows
    assert len(rows) == result["counts"]["clips_out"] == 2 * (len(accepted_names) + 2)
    batch = shard_rows.decode_clips({key: [row[key] for row in rows] for key in rows[0]})
    assert batch["frames"].shape == (len(rows), CLIP_FRAMES, 64, 64, 3) and batch["frames"].dtype == np.uint8
    assert batch["text_emb"].shape == (len(rows), 32, 384) and batch["text_emb"].dtype == np.float32
    assert batch["text_mask"].shape == (len(rows), 32)
    assert not np.abs(batch["text_emb"][~batch["text_mask"]]).any(), "padded tokens are zero"
    by_caption: dict[str, np.ndarray] = {}
    for caption, emb in zip(batch["caption"], batch["text_emb"]):
        np.testing.assert_array_equal(by_caption.setdefault(caption, emb), emb)
    assert len(by_caption) == len(accepted_names) + 2
    first, second = list(by_caption.values())[:2]
    assert np.abs(first - second).max() > 0.1
    codecs = {Path(row["uri"]).name: row["codec"] for row in rows}
    assert codecs["mandelbrot.webm"] == "vp9" and codecs["life.avi"] == "mpeg4" and codecs["cellauto.mkv"] == "h264"
    starts = sorted(row["start_frame"] for row in rows if row["uri"].endswith("testsrc2.mp4"))
    assert starts == [0, 16]
    shards = storage.parquet_files(ctx.output_uri)
    assert all(pq.read_metadata(shard).num_rows <= 3 for shard in shards)
    assert len(shards) == result["counts"]["shards"]


def test_resampling_keeps_source_timing(clip_rows) -> None:
    rows = [r for r in clip_rows if r["uri"].endswith("cellauto.mkv")]
    second = next(r for r in rows if r["start_frame"] == 16)
    assert second["source_fps"] == 30 and second["fps"] == 12
    assert second["start_time"] == pytest.approx(16 / 12, abs=1 / 30)


def test_shapes_world_clips_keep_their_attributes(clip_rows) -> None:
    rows = [r for r in clip_rows if "shapes" in r["uri"]]
    assert len(rows) == 4
    for row in rows:
        frames = shard_rows.decode_clips({k: [row[k]] for k in row})["frames"][0]
        meta = json.loads(row["meta"])
        found = describe(frames)
        assert {k: found[k] for k in ("shape", "color", "background", "motion")} == {
            k: meta[k] for k in ("shape", "color", "background", "motion")
        }


def test_finished_groups_are_skipped_on_resume(curated, tmp_path: Path) -> None:
    ctx, first = curated
    root = tmp_path / "copy"
    shutil.copytree(Path(ctx.output_uri).parent.parent, root)
    resumed = clips_context(root, ctx.config.clips.manifest)
    marker = storage.read_json(curation.group_marker(resumed.output_uri, 1))
    for name in marker["shards"]:
        Path(resumed.output(name)).unlink()
    Path(curation.group_marker(resumed.output_uri, 1)).unlink()
    before = {p.name: p.stat().st_mtime_ns for p in Path(resumed.output_uri).glob("*.parquet")}
    result = clips.run(resumed)
    assert result["counts"]["groups_run"] == 1 and result["counts"]["groups_skipped"] == 2
    assert {k: v for k, v in result["counts"].items() if not k.startswith("groups")} == {
        k: v for k, v in first["counts"].items() if not k.startswith("groups")
    }
    after = {p.name: p.stat().st_mtime_ns for p in Path(resumed.output_uri).glob("*.parquet")}
    assert {k: after[k] for k in before} == before, "shards of finished groups are not rewritten"
    for name in marker["shards"]:
        assert pq.read_table(resumed.output(name)).equals(pq.read_table(ctx.output(name)))


def test_manifest_formats(ray_local, footage: Path, tmp_path: Path) -> None:
    rows = [{"uri": str(footage / "testsrc2.mp4"), "caption": "a", "extra": 1}, {"uri": "life.avi", "caption": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("m.parquet", "m.jsonl"):
        read = clips.read_manifest(str(tmp_path / name))
        assert [r["uri"] for r in read] == [str(footage / "testsrc2.mp4"), str(tmp_path / "life.avi")]
        assert [r["caption"] for r in read] == ["a", ""]
        assert json.loads(read[0]["meta"]) == {"extra": 1}
    with pytest.raises(UserError, match="lacks the column\\(s\\) uri"):
        (tmp_path / "bad.csv").write_text("path,caption\nx.mp4,a\n")
        clips.read_manifest(str(tmp_path / "bad.csv"))


def test_clip_geometry() -> None:
    np.testing.assert_array_equal(curation.resampled_indices(np.arange(10) / 25.0, 10 / 25.0, 12.0), [0, 2, 4, 6])
    np.testing.assert_array_equal(
        curation.resampled_indices(np.arange(6) / 10.0, 0.6, 20.0), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    )
    variable = np.array([0.0, 0.04, 0.08, 0.2, 0.4, 0.5, 0.52])  # frames bunched, then sparse
    np.testing.assert_array_equal(curation.resampled_indices(variable, 0.6, 10.0), [0, 2, 3, 3, 4, 5])
    assert curation.clip_starts(48, 17, 16) == [0, 16]
    assert curation.clip_starts(16, 17, 16) == []
    assert curation.decode_size(160, 120, 64, 64) == (85, 64)
    assert curation.decode_size(90, 200, 64, 64) == (64, 142)
    assert curation.decode_size(1920, 1080, 480, 832) == (853, 480)
    assert curation.decode_size(1080, 1920, 480, 832) == (832, 1479)
    frames = np.arange(2 * 5 * 7 * 3, dtype=np.uint8).reshape(2, 5, 7, 3)
    np.testing.assert_array_equal(curation.center_crop(frames, 3, 3), frames[:, 1:4, 2:5])
    np.testing.assert_array_equal(curation.center_crop(frames, 2, 6), frames[:, 1:3, 0:6])


# name -> (lavfi source, encoder arguments): H.264 and VP9, landscape and portrait, 25 and 30 fps, one of
# variable frame rate (30 fps for the first second, 10 fps after it)
SHAPED_FOOTAGE = {
    "landscape.mp4": ("testsrc2=size=640x360:rate=25", ["-c:v", "libx264", "-pix_fmt", "yuv420p"]),
    "portrait.webm": ("testsrc2=size=360x480:rate=30", ["-c:v", "libvpx-vp9", "-b:v", "400k"]),
    "variable.mp4": (
        "testsrc2=size=480x270:rate=30,select='lt(t\\,1)+not(mod(n\\,3))'",
        ["-fps_mode", "vfr", "-c:v", "libx264", "-pix_fmt", "yuv420p"],
    ),
}


@pytest.fixture(scope="module")
def shaped_footage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.pipelines.conftest import ffmpeg

    folder = tmp_path_factory.mktemp("shaped")
    for name, (source, args) in SHAPED_FOOTAGE.items():
        ffmpeg(source, 3.0, args, folder / name)
    (folder / "manifest.csv").write_text("uri,caption\n" + "".join(f"{n},footage {n}\n" for n in SHAPED_FOOTAGE))
    return folder


@pytest.fixture(scope="module")
def umt5_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random UMT5 encoder with a tokenizer, laid out as a diffusers pipeline folder."""
    import torch
    import transformers

    from model.text import MiniLMTextEncoder

    folder = tmp_path_factory.mktemp("umt5")
    tokenizer = MiniLMTextEncoder().tokenizer
    cfg = transformers.UMT5Config(vocab_size=tokenizer.vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
    torch.manual_seed(0)
    transformers.UMT5EncoderModel(cfg).save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder


@pytest.mark.parametrize(
    "preset,settings,height,width,fps",
    [("wan2.1-t2v-1.3b", {"clips.crf": 18}, 480, 832, 16), ("tiny", {}, 64, 64, 12)],
)
def test_real_footage_curates_to_the_presets_shape(
    ray_local, shaped_footage: Path, umt5_folder: Path, tmp_path: Path, preset: str, settings: dict,
    height: int, width: int, fps: int,
) -> None:
    ctx = clips_context(
        tmp_path, str(shaped_footage / "manifest.csv"),
        **{"model.preset": preset, "model.text_path": str(umt5_folder), "clips.clip_frames": 17, "clips.stride_frames": 16,
           **settings},
    )
    result = clips.run(ctx)
    storage.write_manifest(ctx.output_uri, {"counts": result["counts"]})
    rows = clips.read_clips(ctx.output_uri).take_all()
    assert result["counts"]["accepted"] == 3 and result["counts"]["rejected"] == 0
    assert {Path(r["uri"]).name: r["codec"] for r in rows} == {
        "landscape.mp4": "h264", "portrait.webm": "vp9", "variable.mp4": "h264"
    }
    for row in rows:
        assert (row["height"], row["width"], row["fps"], row["num_frames"]) == (height, width, fps, 17)
        frames = shard_rows.decode_clips({k: [row[k]] for k in row})["frames"][0]
        assert frames.shape == (17, height, width, 3) and frames.std() > 10
        assert len(row["frames"]) < frames.nbytes / (20 if row["height"] == 480 else 2)
    variable = sorted((r for r in rows if r["uri"].endswith("variable.mp4")), key=lambda r: r["start_frame"])
    assert [r["start_frame"] for r in variable] == [0, 16]
    assert variable[1]["start_time"] == pytest.approx(16 / fps, abs=1 / 10)


def test_uris_duplicates_and_captions(ray_local, footage: Path, tmp_path: Path) -> None:
    long_caption = " ".join(["a red circle circling clockwise"] * 400)
    rows = [
        (f"file://{footage / 'testsrc2.mp4'}", "a test pattern"),
        (f"file://{footage / 'testsrc2.mp4'}", "a test pattern"),
        ("ftp://example.com/a.mp4", "a video"),
        ("gs://bucket/b.mp4", "a video"),
        (str(footage / "life.avi"), "   "),
        ("cellauto.mkv", long_caption),
    ]
    pq.write_table(pa.Table.from_pylist([{"uri": u, "caption": c} for u, c in rows]), footage / "uris.parquet")
    ctx = clips_context(tmp_path, str(footage / "uris.parquet"))
    result = clips.run(ctx)
    rejected = storage.read_parquet(ctx.output(*curation.REJECTED_URI)).to_pylist()
    assert [(r["uri"], r["reason"]) for r in rejected] == [
        ("ftp://example.com/a.mp4", "unsupported_scheme"),
        ("gs://bucket/b.mp4", "unsupported_scheme"),
        (str(footage / "life.avi"), "empty_caption"),
    ]
    counts = result["counts"]
    assert (counts["videos_in"], counts["duplicates"], counts["accepted"], counts["clips_out"]) == (6, 1, 2, 4)
    assert counts["captions_truncated"] == 1, "the video with the 10,000-character caption"
    storage.write_manifest(ctx.output_uri, {"files": result["files"]})
    metas = {r["clip_id"]: json.loads(r["meta"]) for f in storage.parquet_files(ctx.output_uri) for r in pq.read_table(f).to_pylist()}
    assert metas == {"000000-0000": {}, "000000-0001": {}, "000005-0000": {"caption_truncated": True}, "000005-0001": {"caption_truncated": True}}


def test_odd_clip_length_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match="clips.clip_frames': must be 1 \\+ 4n, e.g. 13 or 17"):
        load_config(None, ["clips.clip_frames=16"])


def test_curation_workers_import_neither_torch_nor_the_tracking_client() -> None:
    """Ray imports a task's module in every worker; the curation module must stay light for workers to start fast."""
    check = "import sys, pipelines.curation; print(sorted({'torch', 'mlflow', 'transformers'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_no_captions_embed_to_empty_arrays_of_the_presets_shape() -> None:
    captions, emb, mask = embed_captions([], "tiny", None)
    preset = get_preset("tiny")
    assert captions == [] and emb.shape == (0, preset.text_len, preset.text_dim) and mask.shape == (0, preset.text_len)
