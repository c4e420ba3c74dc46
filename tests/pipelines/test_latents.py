"""The `latents` stage on a small clips output: rows carried over, latents equal the VAE's, finished shards skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from infra import storage
from model.presets import get_preset
from model.weights import MODEL_FILE, load_model, save_model
from pipelines import latents, shard_rows
from pipelines.curation import CLIP_SCHEMA
from pipelines.shapes_world import render, sample_clip
from pipelines.video import encode_clip
from pipelines.workflow import StageContext

FRAMES = 5


def clip_row(index: int) -> dict:
    clip = sample_clip(3, index)
    frames = render(clip, size=64, fps=12, seconds=FRAMES / 12)
    emb = np.zeros((4, 384), np.float32)
    emb[:2] = index + 1.0
    return {
        "clip_id": f"{index:06d}-0000",
        "video_index": index,
        "uri": f"video{index}.mp4",
        "caption": clip.caption,
        "meta": json.dumps(clip.attributes()),
        "start_frame": 0,
        "start_time": 0.0,
        "fps": 12.0,
        "num_frames": FRAMES,
        "height": 64,
        "width": 64,
        "frames": encode_clip(frames, 12),
        "motion_score": 0.1,
        "text_emb": emb.tobytes(),
        "text_mask": np.asarray([1, 1, 0, 0], np.uint8).tobytes(),
        "text_len": 4,
        "text_dim": 384,
        "source_fps": 12.0,
        "source_width": 64,
        "source_height": 64,
        "codec": "h264",
    }


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, str]:
    clips_uri, vae_uri = str(tmp_path / "clips"), str(tmp_path / "vae")
    for shard in range(2):
        rows = [clip_row(3 * shard + i) for i in range(3)]
        storage.write_parquet(storage.join(clips_uri, f"clips-g{shard:05d}-000.parquet"), pa.Table.from_pylist(rows, schema=CLIP_SCHEMA))
    storage.write_manifest(clips_uri, {"stage": "clips"})
    torch.manual_seed(0)
    save_model(storage.join(vae_uri, MODEL_FILE), get_preset("tiny").build_vae(), kind="vae", preset="tiny", step=0)
    storage.write_manifest(vae_uri, {"stage": "vae"})
    return {"clips": clips_uri, "vae": vae_uri}


def test_latents_stage_encodes_every_clip_and_resumes(ray_local, make_config, tmp_path: Path, inputs: dict[str, str]) -> None:
    out = str(tmp_path / "latents")
    ctx = StageContext("latents", make_config("latents.batch_size=2"), inputs, out, "fp")
    result = latents.run(ctx)
    assert result["counts"] == {"clips": 6, "shards": 2, "shards_encoded": 2, "shards_skipped": 0}
    assert result["summary"]["latent_shape"] == "2x8x16x16"

    table = pa.concat_tables([storage.read_parquet(f) for f in storage.list_files(out, ".parquet")]).sort_by("clip_id")
    arrays = shard_rows.decode_latents(table.to_pydict())
    assert arrays["latents"].shape == (6, 2, 8, 16, 16)
    expected_rows = [clip_row(i) for i in range(6)]
    assert arrays["caption"] == [r["caption"] for r in expected_rows]
    assert [json.loads(m)["shape"] for m in arrays["meta"]] == [json.loads(r["meta"])["shape"] for r in expected_rows]
    assert arrays["text_mask"].tolist() == [[True, True, False, False]] * 6
    assert np.all(arrays["text_emb"][:, :2, 0] == np.arange(1, 7)[:, None])

    frames = np.stack([render(sample_clip(3, i), size=64, fps=12, seconds=FRAMES / 12) for i in range(6)])
    direct = latents.encode_frames(load_model(storage.join(inputs["vae"], MODEL_FILE)), frames)
    np.testing.assert_allclose(arrays["latents"], direct, rtol=1e-4, atol=1e-5)

    storage.write_manifest(out, {"stage": "latents"})
    batch = next(iter(latents.training_dataset(out).iter_torch_batches(batch_size=6)))
    assert batch["latents"].shape == (6, 2, 8, 16, 16) and batch["text_mask"].dtype == torch.bool

    again = latents.run(ctx)
    assert again["counts"]["shards_skipped"] == 2 and again["counts"]["shards_encoded"] == 0


def test_vae_latent_stats_whiten_the_encoded_training_clips(inputs: dict[str, str]) -> None:
    from training.vae import measure_latent_stats

    model_uri = storage.join(inputs["vae"], MODEL_FILE)
    stats = measure_latent_stats(model_uri, inputs["clips"], frozenset({"000005-0000"}), count=4)
    assert stats["clips"] == 4 and len(stats["latent_std"]) == 8
    vae = load_model(model_uri)
    assert torch.allclose(vae.latent_std, torch.tensor(stats["latent_std"], dtype=torch.float32))
    frames = np.stack([render(sample_clip(3, i), size=64, fps=12, seconds=FRAMES / 12) for i in range(4)])
    per_channel = torch.from_numpy(latents.encode_frames(vae, frames)).transpose(0, 2).reshape(8, -1)
    np.testing.assert_allclose(per_channel.mean(dim=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(per_channel.std(dim=1), 1.0, atol=1e-3)
