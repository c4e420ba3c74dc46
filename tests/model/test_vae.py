"""Causal VAE: shapes for 1 + 4n frames, causality, streaming decode and encode equal to whole-clip ones, and the
uint8 pixel conversions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.vae import VAE, ResBlock, VAEConfig, pixels_to_video, video_to_pixels


def _video(frames: int, size: int = 16, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, frames, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("frames", [1, 5, 9, 17])
def test_encode_decode_shapes(tiny_vae: VAE, frames: int) -> None:
    with torch.no_grad():
        z = tiny_vae.encode(_video(frames))
        assert z.shape == (2, 1 + (frames - 1) // 4, 4, 4, 4)
        assert tiny_vae.decode(z).shape == (2, frames, 3, 16, 16)


def test_spatial_factor_eight_shapes() -> None:
    cfg = VAEConfig(latent_channels=4, channels=(8, 8, 16, 16), temporal_down=(False, True, True))
    vae = VAE(cfg).eval()
    assert (cfg.spatial_factor, cfg.temporal_factor) == (8, 4)
    with torch.no_grad():
        z = vae.encode(_video(9, size=32, batch=1))
        assert z.shape == (1, 3, 4, 4, 4)
        assert vae.decode(z).shape == (1, 9, 3, 32, 32)


def test_rejects_lengths_not_one_plus_four_n(tiny_vae: VAE) -> None:
    with pytest.raises(ValueError):
        tiny_vae.encode(_video(8))


def test_streaming_decode_equals_whole_clip(tiny_vae: VAE) -> None:
    z = torch.randn(2, 6, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = tiny_vae.decode(z)
        per_frame = tiny_vae.stream_decoder()
        pieces = [per_frame.push(z[:, i : i + 1]) for i in range(6)]
        uneven = tiny_vae.stream_decoder()
        chunks = [uneven.push(z[:, :1]), uneven.push(z[:, 1:4]), uneven.push(z[:, 4:])]
    assert [p.shape[1] for p in pieces] == [1, 4, 4, 4, 4, 4]
    assert torch.allclose(torch.cat(pieces, 1), whole, atol=1e-5)
    assert [c.shape[1] for c in chunks] == [1, 12, 8]
    assert torch.allclose(torch.cat(chunks, 1), whole, atol=1e-5)


def test_streaming_encode_equals_whole_clip() -> None:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(latent_channels=4, channels=(8, 16, 16), temporal_down=(True, True))).eval()
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, ResBlock):
                module.gain.normal_()  # open the residual branches, whose causal convolutions stream too
    video = _video(1 + 4 * 8, batch=1)
    vae.set_latent_stats(vae.encode_raw(video))
    encoder = vae.stream_encoder()
    parts = [encoder.push(video[:, :9]), encoder.push(video[:, 9:21]), encoder.push(video[:, 21:])]
    assert [p.shape[1] for p in parts] == [3, 3, 3]
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(parts, dim=1), vae.encode(video), atol=1e-5, rtol=1e-5)


def test_pixel_conversions_round_trip_and_clamp() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (2, 3, 5, 7, 3), dtype=np.uint8)
    video = pixels_to_video(frames)
    assert video.shape == (2, 3, 3, 5, 7) and video.dtype == torch.float32
    assert video.min() >= -1.0 and video.max() <= 1.0
    assert np.array_equal(video_to_pixels(video), frames)
    assert np.array_equal(video_to_pixels(video[0, 0]), frames[0, 0])
    assert video_to_pixels(torch.tensor([[[2.0]], [[-3.0]], [[0.0]]])).tolist() == [[[255, 0, 128]]]


def test_encoder_and_decoder_are_causal(tiny_vae: VAE) -> None:
    video = _video(13)
    later = video.clone()
    later[:, 6:] = -video[:, 6:]
    z = torch.randn(2, 4, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    z_later = z.clone()
    z_later[:, 2:] += 1.0
    with torch.no_grad():
        a, b = tiny_vae.encode(video), tiny_vae.encode(later)
        pa, pb = tiny_vae.decode(z), tiny_vae.decode(z_later)
    assert torch.allclose(a[:, :2], b[:, :2], atol=1e-6)  # latent 1 covers pixel frames 1..4
    assert (a[:, 2:] - b[:, 2:]).abs().max() > 1e-4
    assert torch.allclose(pa[:, :5], pb[:, :5], atol=1e-6)  # latent 2 first shows at pixel frame 5
    assert (pa[:, 5:] - pb[:, 5:]).abs().max() > 1e-4


def _moving_square(frames: int = 5, size: int = 16) -> torch.Tensor:
    """``[1, T, 3, H, W]``: a 4x4 square of one colour sliding right over a flat background of another."""
    video = torch.tensor([-0.6, 0.2, 0.8])[None, None, :, None, None].repeat(1, frames, 1, size, size)
    for t in range(frames):
        video[0, t, :, 6:10, 2 + 2 * t : 6 + 2 * t] = torch.tensor([0.9, -0.7, -0.2])[:, None, None]
    return video


def test_kl_and_plain_losses_train() -> None:
    video = _moving_square()
    for kl in (True, False):
        torch.manual_seed(0)
        vae = VAE(VAEConfig(latent_channels=4, channels=(8, 16), temporal_down=(True,), kl=kl))
        opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
        losses = []
        for _ in range(30):
            out = vae(video, generator=torch.Generator().manual_seed(1))
            loss = out["recon"] + 1e-4 * out["kl"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert out["video"].shape == video.shape and torch.isfinite(out["kl"])
        assert (out["kl"].item() > 0) == kl
        assert losses[-1] < 0.85 * losses[0]


def test_initial_vae_reconstructs_flat_colours() -> None:
    """The average-pool initialisation: training starts from exact flat colours, not from noise."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(latent_channels=8, channels=(16, 32, 64), temporal_down=(True, True))).eval()
    colours = torch.rand(3, 1, 3, 1, 1, generator=torch.Generator().manual_seed(2)) * 2 - 1
    video = colours.expand(3, 9, 3, 16, 16)
    with torch.no_grad():
        assert ((vae.decode(vae.encode(video)) - video) ** 2).mean() < 1e-3


def test_latent_normalisation_whitens_channels_and_keeps_the_round_trip() -> None:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(latent_channels=4, channels=(8, 16), temporal_down=(True,))).eval()
    video = _video(5, batch=3)
    with torch.no_grad():
        before = vae.decode(vae.encode(video))
        raw = vae.encode_raw(video)
        vae.set_latent_stats(raw)
        z = vae.encode(video)
        per_channel = z.transpose(0, 2).reshape(4, -1)
        assert torch.allclose(per_channel.mean(dim=1), torch.zeros(4), atol=1e-5)
        assert torch.allclose(per_channel.std(dim=1), torch.ones(4), atol=1e-4)
        assert torch.allclose(vae.denormalize(z), raw, atol=1e-5)
        assert torch.allclose(vae.decode(z), before, atol=1e-5)
        streamed = vae.stream_decoder().push(z[:, :1])
        assert torch.allclose(streamed, before[:, :1], atol=1e-5)
    restored = VAE(vae.cfg)
    restored.load_state_dict(vae.state_dict())
    assert torch.equal(restored.latent_std, vae.latent_std) and torch.equal(restored.latent_mean, vae.latent_mean)
