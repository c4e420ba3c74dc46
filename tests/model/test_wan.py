"""Wan2.1 through diffusers: the converted DiT and the wrapped VAE equal diffusers' own forward passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from model.dit import DiT
from model.memory import model_state_bytes, training_memory
from model.presets import get_preset
from model.wan import convert_dit_state, dit_config_from_diffusers, dit_from_diffusers, vae_from_diffusers

WAN_CONFIGS = {
    "2x16-d2-p122": dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    ),
    "3x12-d3-p112": dict(
        patch_size=(1, 1, 2), num_attention_heads=3, attention_head_dim=12, in_channels=6, out_channels=6,
        text_dim=20, freq_dim=32, ffn_dim=48, num_layers=3, rope_max_seq_len=64,
    ),
}


def wan_transformer(name: str, seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**WAN_CONFIGS[name]).eval()


def padded_text(batch: int, length: int, dim: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption embeddings zeroed past each caption's length, as Wan's pipeline pads them, and their mask."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None, :] < torch.tensor([length, length - 3])[:batch, None]
    return torch.randn(batch, length, dim, generator=g) * mask[..., None], mask


@pytest.mark.parametrize("name", list(WAN_CONFIGS))
def test_converted_dit_equals_diffusers_transformer(name: str) -> None:
    transformer = wan_transformer(name)
    cfg = WAN_CONFIGS[name]
    dit = dit_from_diffusers(transformer, text_len=7, chunk_frames=2)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, cfg["in_channels"], 4, 6, generator=g)  # [B, F, C, H, W]
    t = torch.tensor([0.93, 0.27])
    text, mask = padded_text(2, 7, cfg["text_dim"])
    with torch.no_grad():
        ours = dit(x, t, text, mask, mode="bidirectional")
        theirs = transformer(x.transpose(1, 2), timestep=1000 * t, encoder_hidden_states=text).sample
        per_frame = dit(x, t[:, None].expand(2, 5), text, mask, mode="bidirectional")
    error = (ours - theirs.transpose(1, 2)).abs().max().item()
    assert error < 1e-4, error
    assert torch.equal(per_frame, ours)


@pytest.mark.parametrize("name", list(WAN_CONFIGS))
def test_kv_cached_student_from_wan_equals_block_causal_clip(name: str) -> None:
    cfg = WAN_CONFIGS[name]
    student = dit_from_diffusers(wan_transformer(name, seed=1), text_len=7, chunk_frames=2, attention_mode="block_causal")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, cfg["in_channels"], 4, 4, generator=g)
    t = torch.rand(2, 6, generator=g)
    text = padded_text(2, 7, cfg["text_dim"])
    with torch.no_grad():
        whole = student(x, t, *text)
        cache = student.new_cache()
        for start in range(0, 6, 2):
            chunk = slice(start, start + 2)
            out = student(x[:, chunk], t[:, chunk], *text, cache=cache)
            assert (out - whole[:, chunk]).abs().max().item() < 1e-5, start
            student(x[:, chunk], t[:, chunk], *text, cache=cache, update_cache=True)


def test_every_wan_tensor_is_mapped_and_a_stray_one_is_refused() -> None:
    transformer = wan_transformer("2x16-d2-p122")
    state = transformer.state_dict()
    cfg = dit_config_from_diffusers(dict(transformer.config), text_len=7)
    converted = convert_dit_state(state, cfg)
    assert len(converted) == len(state) == len(DiT(cfg).state_dict()) - 1  # all but the null caption
    with pytest.raises(ValueError, match="no place in our DiT: \\['blocks.0.attn2.add_k_proj.weight'\\]"):
        convert_dit_state({**state, "blocks.0.attn2.add_k_proj.weight": torch.zeros(1)}, cfg)


def test_dit_converts_from_a_saved_folder(tmp_path: Path) -> None:
    transformer = wan_transformer("3x12-d3-p112")
    transformer.save_pretrained(tmp_path / "transformer")
    from_folder = dit_from_diffusers(tmp_path, text_len=7)
    direct = dit_from_diffusers(transformer, text_len=7)
    assert from_folder.cfg == direct.cfg
    assert all(torch.equal(a, b) for a, b in zip(from_folder.state_dict().values(), direct.state_dict().values()))


WAN_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
               attn_scales=[], latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])


@pytest.fixture(scope="module")
def wan_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(**WAN_VAE).eval()


def test_wrapped_vae_equals_diffusers_encode_and_decode(wan_vae: AutoencoderKLWan) -> None:
    vae = vae_from_diffusers(wan_vae)
    assert (vae.cfg.temporal_factor, vae.cfg.spatial_factor, vae.cfg.latent_channels) == (2, 4, 4)
    video = torch.rand(1, 5, 3, 16, 24, generator=torch.Generator().manual_seed(6)) * 2 - 1
    mean, std = torch.tensor(WAN_VAE["latents_mean"]), torch.tensor(WAN_VAE["latents_std"])
    with torch.no_grad():
        latents = vae.encode(video)
        raw = wan_vae.encode(video.transpose(1, 2)).latent_dist.mode().transpose(1, 2)
        expected = (raw - mean[:, None, None]) / std[:, None, None]
        decoded = vae.decode(latents)
        theirs = wan_vae.decode(raw.transpose(1, 2)).sample.transpose(1, 2)
    assert latents.shape == (1, 3, 4, 4, 6)
    assert (latents - expected).abs().max().item() < 1e-5
    assert decoded.shape == video.shape
    assert (decoded.clamp(-1, 1) - theirs).abs().max().item() < 1e-5


def test_wan_vae_streams_like_a_whole_clip(wan_vae: AutoencoderKLWan) -> None:
    vae = vae_from_diffusers(wan_vae)
    video = torch.rand(1, 9, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1
    whole_latents = vae.encode(video)
    encoder = vae.stream_encoder()
    streamed_latents = torch.cat([encoder.push(video[:, :3]), encoder.push(video[:, 3:7]), encoder.push(video[:, 7:])], 1)
    assert (streamed_latents - whole_latents).abs().max().item() < 1e-5
    whole = vae.decode(whole_latents)
    decoder = vae.stream_decoder()
    streamed = torch.cat([decoder.push(whole_latents[:, :2]), decoder.push(whole_latents[:, 2:])], dim=1)
    assert streamed.shape == whole.shape == video.shape
    assert (streamed - whole).abs().max().item() < 1e-5


def test_vae_loads_from_a_saved_folder(wan_vae: AutoencoderKLWan, tmp_path: Path) -> None:
    wan_vae.save_pretrained(tmp_path / "vae")
    latents = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(vae_from_diffusers(tmp_path).decode(latents), vae_from_diffusers(wan_vae).decode(latents))


WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
)


def test_the_wan_preset_is_wan2_1_t2v_1_3b_tensor_for_tensor() -> None:
    with torch.device("meta"):
        transformer = WanTransformer3DModel(**WAN_1_3B)
    preset = get_preset("wan2.1-t2v-1.3b")
    assert dit_config_from_diffusers(dict(transformer.config), chunk_frames=preset.chunk_frames) == preset.dit
    wan_parameters = sum(p.numel() for p in transformer.parameters())
    memory = training_memory("wan2.1-t2v-1.3b", ranks=8)
    assert memory["trainable_parameters"] == wan_parameters == 1_418_996_800
    assert memory["parameters"] == wan_parameters + 512 * 4096  # the empty prompt, held fixed


def test_model_states_per_zero_stage() -> None:
    assert [model_state_bytes(1000, stage, 8) for stage in range(4)] == [16000, 5500, 3750, 2000]
