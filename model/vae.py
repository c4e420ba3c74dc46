"""Causal 3D convolutional VAE: the first frame alone, then every 4 frames into one latent frame.

Layout everywhere in this project: ``video: [B, T, 3, H, W]`` with pixels in [-1, 1] and
``latents: [B, F, C, H / s, W / s]`` with ``F = 1 + (T - 1) / 4``. Every temporal convolution is causal (padded
with zeros on the past side only) and every normalisation is per position (RMS over channels), so a latent
frame's pixels depend only on it and earlier latent frames. Decoding can therefore stream: a
:class:`StreamingDecoder` keeps the last inputs of each causal convolution and turns latent frames into pixel
frames as they arrive (1 pixel frame for latent frame 0, then 4 per latent frame), equal to a whole-clip decode;
its twin, the :class:`StreamingEncoder`, encodes pixel frames as they arrive. Frames in files and on screens are
``[..., H, W, 3]`` uint8: :func:`pixels_to_video` and :func:`video_to_pixels` convert between the two layouts.

Latents leave ``encode`` normalised per channel, ``(z - latent_mean) / latent_std``, and ``decode`` undoes it, as
Wan2.1's VAE does: the diffusion models noise them with unit-variance noise, so raw latents whose channels spread
0.02 to 0.3 would drown in it. The statistics are buffers measured once on training clips after the VAE is
trained (:meth:`VAE.set_latent_stats`) and travel with its weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from model.precision import weights_dtype

ConvCache = dict[nn.Module, Tensor]
"""Per-module streaming state: the trailing input frames of each causal convolution, ``[B, C, k-1, H, W]``."""


def pixels_to_video(frames: np.ndarray | Tensor) -> Tensor:
    """uint8 frames ``[..., H, W, 3]`` -> float pixels ``[..., 3, H, W]`` in [-1, 1], the layout the VAE reads."""
    return torch.as_tensor(frames).movedim(-1, -3).float() / 127.5 - 1.0


def video_to_pixels(video: Tensor) -> np.ndarray:
    """Decoded pixels ``[..., 3, H, W]`` in [-1, 1] -> uint8 frames ``[..., H, W, 3]`` (clamped and rounded)."""
    pixels = video.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return pixels.movedim(-3, -1).cpu().numpy()


class CausalFrames:
    """Frame counts of a causal video VAE: the first frame alone, then ``temporal_factor`` frames per latent frame."""

    temporal_factor: int

    def latent_frames(self, frames: int) -> int:
        if (frames - 1) % self.temporal_factor:
            raise ValueError(f"clip length {frames} is not 1 + {self.temporal_factor} n")
        return 1 + (frames - 1) // self.temporal_factor

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.temporal_factor


@dataclass(frozen=True)
class VAEConfig(CausalFrames):
    """Channel widths per resolution level; each level but the last halves space, ``temporal_down`` says which
    also halve time (two of them for x4). ``kl`` adds a Gaussian posterior."""

    latent_channels: int = 16
    channels: tuple[int, ...] = (96, 192, 384, 384)
    temporal_down: tuple[bool, ...] = (False, True, True)
    res_blocks: int = 1
    kl: bool = True

    def __post_init__(self) -> None:
        if len(self.temporal_down) != len(self.channels) - 1:
            raise ValueError("temporal_down needs one entry per downsampling (len(channels) - 1)")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_down)


class CausalConv3d(nn.Conv3d):
    """3D convolution over ``[B, C, T, H, W]`` padded causally in time; with a cache it continues a stream."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int] = (3, 3, 3)) -> None:
        kt, kh, kw = kernel
        super().__init__(cin, cout, kernel, padding=(0, kh // 2, kw // 2))
        self.time_pad = kt - 1

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        if self.time_pad:
            past = None if cache is None else cache.get(self)
            if past is None:
                past = x.new_zeros(x.shape[0], x.shape[1], self.time_pad, *x.shape[3:])
            x = torch.cat([past, x], dim=2)
            if cache is not None:
                cache[self] = x[:, :, -self.time_pad :].detach()
        return super().forward(x)


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels of ``[B, C, T, H, W]``: per position, so it never mixes frames."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps) * self.weight


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = ChannelRMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = ChannelRMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()
        self.gain = nn.Parameter(torch.zeros(cout, 1, 1, 1))

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return self.skip(x) + self.gain * h


class Downsample(nn.Module):
    """Halve space (stride-2 conv) and optionally time: frames ``1 + 2n -> 1 + n``, output j sees inputs <= 2j."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.spatial = nn.Conv3d(channels, channels, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.temporal = nn.Conv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.spatial(x)
        if self.temporal is not None:
            x = self.temporal(torch.cat([x[:, :, :1], x[:, :, :1], x], dim=2))
        return x


class Upsample(nn.Module):
    """Double space (nearest + conv) and optionally time: each frame becomes two, except the clip's first frame."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = CausalConv3d(channels, 2 * channels, (3, 1, 1)) if temporal else None
        self.spatial = nn.Conv3d(channels, channels, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        if self.temporal is not None:
            started = cache is not None and self in cache
            x = rearrange(self.temporal(x, cache), "b (two c) t h w -> b c (t two) h w", two=2)
            if not started:
                x = x[:, :, 1:]
            if cache is not None:
                cache[self] = x.new_empty(0)
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return self.spatial(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch = cfg.channels
        self.conv_in = CausalConv3d(3, ch[0])
        self.levels = nn.ModuleList()
        for i, c in enumerate(ch):
            blocks: list[nn.Module] = [ResBlock(ch[i - 1] if (i and j == 0) else c, c) for j in range(cfg.res_blocks)]
            level = nn.ModuleDict({"blocks": nn.ModuleList(blocks)})
            if i < len(ch) - 1:
                level["down"] = Downsample(c, cfg.temporal_down[i])
            self.levels.append(level)
        self.mid = ResBlock(ch[-1], ch[-1])
        self.conv_out = CausalConv3d(ch[-1], cfg.latent_channels * (2 if cfg.kl else 1))

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            for block in level["blocks"]:
                h = block(h)
            if "down" in level:
                h = level["down"](h)
        return self.conv_out(self.mid(h))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch = cfg.channels[::-1]
        ups = cfg.temporal_down[::-1]
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0])
        self.mid = ResBlock(ch[0], ch[0])
        self.levels = nn.ModuleList()
        for i, c in enumerate(ch):
            blocks: list[nn.Module] = [ResBlock(ch[i - 1] if (i and j == 0) else c, c) for j in range(cfg.res_blocks)]
            level = nn.ModuleDict({"blocks": nn.ModuleList(blocks)})
            if i < len(ch) - 1:
                level["up"] = Upsample(c, ups[i])
            self.levels.append(level)
        self.conv_out = CausalConv3d(ch[-1], 3)

    def forward(self, z: Tensor, cache: ConvCache | None = None) -> Tensor:
        h = self.mid(self.conv_in(z, cache), cache)
        for level in self.levels:
            for block in level["blocks"]:
                h = block(h, cache)
            if "up" in level:
                h = level["up"](h, cache)
        return self.conv_out(h, cache)


class LatentNormalization:
    """Per-channel latent statistics of a VAE (its ``latent_mean`` and ``latent_std`` buffers, ``[C]``): every other
    model sees ``(z - latent_mean) / latent_std``."""

    latent_mean: Tensor
    latent_std: Tensor

    def _channels(self, stat: Tensor, like: Tensor) -> Tensor:
        return stat.to(like).reshape(1, 1, -1, 1, 1)

    def normalize(self, raw: Tensor) -> Tensor:
        """Raw latents ``[B, F, C, h, w]`` -> the normalised latents every other model sees."""
        return (raw - self._channels(self.latent_mean, raw)) / self._channels(self.latent_std, raw)

    def denormalize(self, latents: Tensor) -> Tensor:
        return latents * self._channels(self.latent_std, latents) + self._channels(self.latent_mean, latents)


class VAE(LatentNormalization, nn.Module):
    """``encode(video [B, T, 3, H, W]) -> latents [B, F, C, h, w]`` and back; see the module docstring."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))
        self.decoder_compiled = False
        self.initialize()

    def initialize(self, noise: float = 0.02) -> None:
        """Start as an average-pool autoencoder: residual branches gated by per-channel gains at zero, and the main
        path (linear at init) carrying RGB in its first channels through mean-pooling down and copying up.

        Flat colours then reconstruct almost exactly from step 0 and training only has to learn the detail; the
        zero gains (rather than zero weights) let the branches open smoothly under Adam's first steps.
        """
        for m in self.modules():
            if isinstance(m, ResBlock):
                for conv in (m.conv1, m.conv2):
                    nn.init.normal_(conv.weight, std=conv.weight[0].numel() ** -0.5)
                    nn.init.zeros_(conv.bias)
                nn.init.zeros_(m.gain)
                if isinstance(m.skip, nn.Conv3d):
                    _identity_(m.skip, noise)
            elif isinstance(m, Downsample):
                _identity_(m.spatial, noise, taps=(slice(None), slice(1, 3), slice(1, 3)))
                if m.temporal is not None:
                    _identity_(m.temporal, noise, taps=(slice(1, 3), slice(None), slice(None)))
            elif isinstance(m, Upsample):
                _identity_(m.spatial, noise)
                if m.temporal is not None:
                    _identity_(m.temporal, noise, copies=2)
        for conv in (self.encoder.conv_in, self.encoder.conv_out, self.decoder.conv_in, self.decoder.conv_out):
            _identity_(conv, noise)
        if self.cfg.kl:
            logvar = self.encoder.conv_out
            nn.init.zeros_(logvar.weight[self.cfg.latent_channels :])
            nn.init.constant_(logvar.bias[self.cfg.latent_channels :], -6.0)

    def _posterior(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """Raw (unnormalised) posterior ``(mean, logvar)``, each ``[B, F, C, h, w]`` (logvar = -inf without KL)."""
        self.cfg.latent_frames(video.shape[1])
        x = rearrange(video.to(weights_dtype(self)), "b t c h w -> b c t h w")
        h = rearrange(self.encoder(x), "b c f h w -> b f c h w")
        if not self.cfg.kl:
            return h, torch.full_like(h, float("-inf"))
        mean, logvar = h.chunk(2, dim=2)
        return mean, logvar.clamp(-30.0, 20.0)

    @torch.no_grad()
    def set_latent_stats(self, raw: Tensor) -> None:
        """Per-channel mean and std of raw posterior means ``[N, F, C, h, w]`` (see the module docstring)."""
        per_channel = rearrange(raw.double(), "n f c h w -> c (n f h w)")
        self.latent_mean.copy_(per_channel.mean(dim=1))
        self.latent_std.copy_(per_channel.std(dim=1).clamp_min(1e-6))

    def encode_distribution(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior ``(mean, logvar)`` of normalised latents, each ``[B, F, C, h, w]`` in the video's dtype."""
        mean, logvar = (p.to(video.dtype) for p in self._posterior(video))
        return self.normalize(mean), logvar - 2 * torch.log(self._channels(self.latent_std, logvar))

    def encode(self, video: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Normalised latents ``[B, F, C, h, w]``: the posterior mean, or a sample when ``sample`` (KL only)."""
        mean, logvar = self.encode_distribution(video)
        if not sample or not self.cfg.kl:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + (0.5 * logvar).exp() * noise

    def encode_raw(self, video: Tensor) -> Tensor:
        """Unnormalised posterior means ``[B, F, C, h, w]``, for :meth:`set_latent_stats`."""
        return self._posterior(video)[0]

    def _decode_raw(self, raw: Tensor, cache: ConvCache | None = None) -> Tensor:
        z = rearrange(raw.to(weights_dtype(self)), "b f c h w -> b c f h w")
        if self.decoder_compiled:
            z = z.contiguous(memory_format=torch.channels_last_3d)
        return rearrange(self.decoder(z, cache), "b c t h w -> b t c h w")

    def compile_decoder(self) -> None:
        """Compile the decoder (one graph per input shape) with channels-last 3D convolutions, oneDNN's fast layout
        for them: the compiled graph fuses the norms, activations and concatenations at full resolution around
        the convolutions, which is where eager mode loses what the layout wins. For inference copies only."""
        for module in self.decoder.modules():
            if isinstance(module, nn.Conv3d):
                module.to(memory_format=torch.channels_last_3d)
        self.decoder.compile(dynamic=False)
        self.decoder_compiled = True

    def decode(self, latents: Tensor) -> Tensor:
        """Whole-clip decode of normalised latents: ``[B, F, C, h, w] -> video [B, 1 + 4(F - 1), 3, H, W]``
        (unclamped, in the latents' dtype)."""
        return self._decode_raw(self.denormalize(latents)).to(latents.dtype)

    def stream_decoder(self) -> StreamingDecoder:
        return StreamingDecoder(self)

    def stream_encoder(self) -> StreamingEncoder:
        return StreamingEncoder(self)

    def forward(self, video: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Training losses on ``video [B, T, 3, H, W]``: ``recon`` (mean squared error), ``kl`` (per element)."""
        mean, logvar = self._posterior(video)
        z = mean
        if self.cfg.kl:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + (0.5 * logvar).exp() * noise
        recon = self._decode_raw(z)
        out = {"recon": F.mse_loss(recon, video), "video": recon}
        if self.cfg.kl:
            out["kl"] = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        else:
            out["kl"] = mean.new_zeros(())
        return out


def _identity_(
    conv: nn.Conv3d,
    noise: float,
    taps: tuple[slice, slice, slice] | None = None,
    copies: int = 1,
) -> None:
    """Map channel i to channel i (the first min(in, out) of them, ``copies`` times over the outputs), averaging
    over ``taps`` (default: the current frame, centre pixel); small random weights elsewhere, zero bias."""
    w = conv.weight
    with torch.no_grad():
        nn.init.normal_(w, std=noise * w[0].numel() ** -0.5)
        nn.init.zeros_(conv.bias)
        kt, kh, kw = w.shape[2:]
        st, sh, sw = taps or (slice(kt - 1, kt), slice(kh // 2, kh // 2 + 1), slice(kw // 2, kw // 2 + 1))
        region = w[0, 0, st, sh, sw]
        per_copy = w.shape[0] // copies
        for c in range(copies):
            for i in range(min(w.shape[1], per_copy)):
                w[c * per_copy + i, i, st, sh, sw] += 1.0 / region.numel()


class StreamingDecoder:
    """Decode latent frames as they arrive: ``push(latents [B, n, C, h, w]) -> video [B, T_n, 3, H, W]``.

    The first push's first latent frame yields one pixel frame, every other latent frame four.
    """

    def __init__(self, vae: VAE) -> None:
        self.vae = vae
        self.cache: ConvCache = {}

    def push(self, latents: Tensor) -> Tensor:
        return self.vae._decode_raw(self.vae.denormalize(latents), self.cache).to(latents.dtype)


class StreamingEncoder:
    """Encode pixel frames as they arrive, equal to a whole-clip :meth:`VAE.encode` (the posterior mean).

    Causal convolutions continue from their cached trailing inputs, as in :class:`StreamingDecoder`; each temporal
    downsampling keeps the last frame it saw, so the first push must hold ``1 + 4n`` frames and every later push a
    multiple of 4.  ``push(video [B, T, 3, H, W]) -> latents [B, T', C, h, w]``.
    """

    def __init__(self, vae: VAE) -> None:
        self.vae = vae
        self.cache: ConvCache = {}

    def _down(self, down: Downsample, x: Tensor) -> Tensor:
        x = down.spatial(x)
        if down.temporal is None:
            return x
        past = self.cache.get(down)
        pad = torch.cat([x[:, :, :1], x[:, :, :1]], dim=2) if past is None else past
        self.cache[down] = x[:, :, -1:]
        return down.temporal(torch.cat([pad, x], dim=2))

    @torch.no_grad()
    def push(self, video: Tensor) -> Tensor:
        encoder, cfg = self.vae.encoder, self.vae.cfg
        h = encoder.conv_in(rearrange(video.to(weights_dtype(encoder)), "b t c h w -> b c t h w"), self.cache)
        for level in encoder.levels:
            for block in level["blocks"]:
                h = block(h, self.cache)
            if "down" in level:
                h = self._down(level["down"], h)
        h = encoder.conv_out(encoder.mid(h, self.cache), self.cache)
        mean = h[:, : cfg.latent_channels] if cfg.kl else h
        return self.vae.normalize(rearrange(mean.to(video.dtype), "b c f h w -> b f c h w"))
