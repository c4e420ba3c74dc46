"""Text encoders load from local files only, are deterministic and tell captions apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.text import HFTextEncoder, MiniLMTextEncoder, build_text_encoder

CAPTIONS = ["a red circle bouncing left and right on a blue background", "a green square circling clockwise"]


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        return MiniLMTextEncoder(max_length=24)


def test_minilm_offline_shapes_and_padding(minilm: MiniLMTextEncoder) -> None:
    emb, mask = minilm.encode(CAPTIONS)
    assert minilm.dim == 384
    assert emb.shape == (2, 24, 384) and emb.dtype == torch.float32
    assert mask.dtype == torch.bool and mask[:, 0].all() and not mask[:, -1].any()
    assert mask[0].sum() > mask[1].sum()
    assert not emb[~mask].any()


def test_minilm_is_deterministic_and_discriminates(minilm: MiniLMTextEncoder) -> None:
    emb, _ = minilm.encode(CAPTIONS)
    again, _ = minilm.encode(list(reversed(CAPTIONS)))
    assert torch.equal(emb[0], again[1]) and torch.equal(emb[1], again[0])
    red, blue = minilm.encode(["a red circle", "a blue circle"])[0]
    assert (red - blue).abs().max() > 0.1


def test_t5_encoder_from_a_local_directory(tmp_path: Path, minilm: MiniLMTextEncoder) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(
        vocab_size=minilm.tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4
    )
    torch.manual_seed(0)
    transformers.T5EncoderModel(cfg).save_pretrained(tmp_path)
    minilm.tokenizer.save_pretrained(tmp_path)
    encoder = build_text_encoder("t5", path=tmp_path, max_length=16)
    emb, mask = encoder.encode(CAPTIONS)
    assert isinstance(encoder, HFTextEncoder) and encoder.dim == 32
    assert emb.shape == (2, 16, 32) and torch.equal(emb, encoder.encode(CAPTIONS)[0])
    assert not emb[~mask].any()


def test_open_clip_text_tower_from_local_weights(tmp_path: Path) -> None:
    open_clip = pytest.importorskip("open_clip")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1},
    }
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "tiny-clip-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "cfg")
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("tiny-clip-test").state_dict(), weights)
    encoder = build_text_encoder("open_clip", arch="tiny-clip-test", path=weights, max_length=20)
    emb, mask = encoder.encode(CAPTIONS)
    assert encoder.dim == 32 and emb.shape == (2, 20, 32)
    assert mask[:, 0].all() and mask[0].sum() == len(encoder.tokenizer([CAPTIONS[0]])[0].nonzero())
    assert torch.equal(emb, encoder.encode(CAPTIONS)[0]) and (emb[0] - emb[1]).abs().max() > 1e-3


def test_missing_local_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="directory not found"):
        build_text_encoder("umt5", path=tmp_path / "absent")
    with pytest.raises(ValueError, match="local model directory"):
        build_text_encoder("t5")
    with pytest.raises(ValueError, match="unknown text encoder"):
        build_text_encoder("bert-large")


def test_umt5_from_a_pipeline_folder_embeds_as_wans_pipeline(tmp_path: Path, minilm: MiniLMTextEncoder) -> None:
    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    cfg = transformers.UMT5Config(
        vocab_size=minilm.tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4
    )
    torch.manual_seed(0)
    umt5 = transformers.UMT5EncoderModel(cfg).eval()
    umt5.save_pretrained(tmp_path / "text_encoder")
    minilm.tokenizer.save_pretrained(tmp_path / "tokenizer")
    pipeline = diffusers.WanPipeline(
        tokenizer=minilm.tokenizer, text_encoder=umt5, transformer=None, vae=None,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
    )
    captions = ["a red  circle &amp; a\tblue square", ""]
    encoder = build_text_encoder("umt5", path=tmp_path, max_length=40)
    emb, mask = encoder.encode(captions)
    with torch.no_grad():
        expected = pipeline._get_t5_prompt_embeds(captions, max_sequence_length=40, device=torch.device("cpu"))
    assert emb.shape == (2, 40, 32) and mask[1].sum() == 2  # the empty prompt is [CLS] [SEP] here, then padding
    assert (emb - expected).abs().max().item() < 1e-6
