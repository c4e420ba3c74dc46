"""Presets: the Wan-shaped DiT builds on the meta device with the parameter count of its closed form."""

from __future__ import annotations

import pytest
import torch

from model.dit import DiTConfig
from model.presets import PRESETS, get_preset

WAN_1_3B_PARAMETERS = 1_419_000_896


def dit_parameter_count(c: DiTConfig) -> int:
    """Closed form: per block 4+4 attention linears, 4 RMS norms, a cross-attention LayerNorm, the MLP and 6 D
    modulation; plus patch, text and time embeddings, time projection, head, the null caption and the pooled
    caption's MLP where the config has one."""
    d, f = c.dim, c.ffn_dim
    patch = c.in_channels * c.patch[0] * c.patch[1] * c.patch[2]
    linear = lambda i, o: i * o + o  # noqa: E731
    block = 8 * linear(d, d) + 4 * d + 2 * d + linear(d, f) + linear(f, d) + 6 * d
    embed = linear(patch, d) + linear(c.text_dim, d) + linear(d, d) + linear(c.freq_dim, d) + linear(d, d)
    head = linear(d, 6 * d) + 2 * d + linear(d, patch) + c.null_text_len * c.text_dim
    pooled = linear(c.text_dim, d) + linear(d, d) if c.pooled_text else 0
    return c.depth * block + embed + head + pooled


def test_wan_shape_builds_on_meta_with_expected_parameter_count() -> None:
    preset = get_preset("wan1.3b-shape")
    model = preset.build_dit("meta")
    assert next(model.parameters()).device.type == "meta"
    assert (model.cfg.dim, model.cfg.depth, model.cfg.heads, model.cfg.text_dim) == (1536, 30, 12, 4096)
    assert model.num_parameters() == dit_parameter_count(model.cfg) == WAN_1_3B_PARAMETERS
    assert preset.latent_shape() == (21, 16, 60, 104) and preset.clip_frames == 81
    vae = preset.build_vae("meta")
    assert (vae.cfg.spatial_factor, vae.cfg.temporal_factor) == (8, 4)


def test_wan_shape_forward_on_meta() -> None:
    model = get_preset("wan1.3b-shape").build_dit("meta", depth=2)
    x = torch.empty(1, 3, 16, 60, 104, device="meta")
    out = model(x, torch.empty(1, 3, device="meta"), torch.empty(1, 7, 4096, device="meta"),
                torch.ones(1, 7, dtype=torch.bool, device="meta"), mode="block_causal")
    assert out.shape == x.shape


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_consistent(name: str) -> None:
    p = get_preset(name)
    model = p.build_dit("meta")
    assert model.num_parameters() == dit_parameter_count(model.cfg)
    f, c, h, w = p.latent_shape()
    assert c == p.dit.in_channels and h * p.vae.spatial_factor == p.height and w * p.vae.spatial_factor == p.width
    assert (p.window_chunks + 1) * p.chunk_frames <= p.clip_latent_frames
    assert p.schedule().student_times(p.student_timesteps)[0] == 1.0


def test_tiny_preset_end_to_end_shapes() -> None:
    p = get_preset("tiny")
    assert p.text_dim == 384 and p.vae.spatial_factor == 4 and p.chunk_frames == 3
    torch.manual_seed(0)
    dit, vae = p.build_dit(), p.build_vae()
    f, c, h, w = p.latent_shape()
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, p.clip_frames, 3, p.height, p.width))
        assert z.shape == (1, f, c, h, w)
        v = dit(z, torch.rand(1, f), torch.randn(1, p.text_len, p.text_dim), torch.ones(1, p.text_len, dtype=torch.bool))
    assert v.shape == z.shape
    assert 0.5e6 < dit.num_parameters() < 3e6


def test_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="tiny"):
        get_preset("huge")


def test_chunks_cover_the_requested_seconds() -> None:
    tiny = get_preset("tiny")
    frames = lambda c: 1 + 4 * (3 * c - 1)  # noqa: E731  pixel frames of c chunks of 3 latent frames
    for seconds in (0.5, 1.0, 2.5, 10.0, 30.0):
        n = tiny.chunks_for(seconds)
        assert tiny.frames_for(seconds) == round(seconds * tiny.fps)
        assert frames(n) >= seconds * tiny.fps > frames(n - 1)
    # after an encoded image (one latent frame, one pixel frame) every chunk adds 12 frames
    assert [tiny.chunks_for(s, given_latent_frames=1) for s in (1 / 12, 1.0, 1.5, 2.0)] == [0, 1, 2, 2]
