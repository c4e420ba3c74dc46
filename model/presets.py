"""Named model sizes: one table of configs from a two-core CPU toy to Wan2.1-T2V-1.3B.

``wan2.1-t2v-1.3b`` is the imported Wan teacher exactly (its architecture, UMT5 captions of 512 tokens, 480x832 at
16 fps); ``tiny-wan2.1`` is the same architecture at the tiny preset's size, for importing small random Wan models.

A preset fixes everything the network and the math need: DiT and VAE shapes, the text encoder and its width,
the pixel size and frame rate, the chunk size, the training clip length in latent frames, the sliding window,
the schedule's time shift and the student's timesteps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from model.dit import DiT, DiTConfig
from model.schedule import FlowSchedule
from model.text import TextEncoder, build_text_encoder
from model.vae import VAE, VAEConfig


@dataclass(frozen=True)
class Preset:
    name: str
    dit: DiTConfig
    vae: VAEConfig
    text_encoder: str
    text_len: int
    height: int
    width: int
    fps: int
    clip_latent_frames: int
    window_chunks: int
    shift: float
    student_timesteps: tuple[int, ...] = (1000, 750, 500, 250)
    teacher_steps: int = 50
    guidance_scale: float = 5.0

    def __post_init__(self) -> None:
        s = self.vae.spatial_factor * self.dit.patch[1]
        if self.height % s or self.width % s:
            raise ValueError(f"{self.name}: {self.height}x{self.width} is not divisible by {s}")
        if (self.window_chunks + 1) * self.chunk_frames > self.clip_latent_frames:
            raise ValueError(f"{self.name}: a window of {self.window_chunks} chunks + 1 exceeds the training clip")

    @property
    def chunk_frames(self) -> int:
        return self.dit.chunk_frames

    @property
    def text_dim(self) -> int:
        return self.dit.text_dim

    @property
    def clip_frames(self) -> int:
        """Training clip length in pixel frames (``1 + 4 (F - 1)``)."""
        return self.vae.pixel_frames(self.clip_latent_frames)

    def frames_for(self, seconds: float) -> int:
        """Pixel frames of ``seconds`` of video at the preset's frame rate (at least one)."""
        return max(1, round(seconds * self.fps))

    def chunks_for(self, seconds: float, given_latent_frames: int = 0) -> int:
        """Chunks to generate for ``seconds`` of video after ``given_latent_frames`` of context (an encoded image is
        one): latent frame 0 decodes to one pixel frame, every later one to the VAE's temporal factor."""
        tf = self.vae.temporal_factor
        latent_frames = 1 + math.ceil((self.frames_for(seconds) - 1) / tf)
        return math.ceil((latent_frames - given_latent_frames) / self.chunk_frames)

    def latent_shape(self, latent_frames: int | None = None) -> tuple[int, int, int, int]:
        """``(F, C, h, w)`` of one sample's latents (default: a training clip)."""
        f = self.clip_latent_frames if latent_frames is None else latent_frames
        s = self.vae.spatial_factor
        return f, self.vae.latent_channels, self.height // s, self.width // s

    def text_encoder_for(self, path: str | None = None, device: str | torch.device = "cpu") -> TextEncoder:
        """The preset's caption encoder at its caption length; ``path`` is the local folder of t5/umt5 weights."""
        return build_text_encoder(self.text_encoder, path=path, max_length=self.text_len, device=device)

    def schedule(self) -> FlowSchedule:
        return FlowSchedule(shift=self.shift)

    def build_dit(self, device: torch.device | str | None = None, **overrides: object) -> DiT:
        """The DiT of this preset (``device="meta"`` builds shapes only); ``overrides`` replace config fields."""
        cfg = DiTConfig(**{**self.dit.__dict__, **overrides})
        with torch.device(device or "cpu"):
            return DiT(cfg)

    def build_vae(self, device: torch.device | str | None = None) -> VAE:
        with torch.device(device or "cpu"):
            return VAE(self.vae)


TINY = Preset(
    name="tiny",
    dit=DiTConfig(
        in_channels=8, dim=128, depth=4, heads=4, ffn_dim=512, text_dim=384, freq_dim=128,
        pooled_text=True, absolute_positions=True,
    ),
    vae=VAEConfig(latent_channels=8, channels=(16, 32, 64), temporal_down=(True, True)),
    text_encoder="minilm",
    text_len=32,
    height=64,
    width=64,
    fps=12,
    clip_latent_frames=9,
    window_chunks=2,
    shift=3.0,
)
"""The embedded default's model: the shapes world at 64x64 on two CPU cores."""

WAN_SHAPE = Preset(
    name="wan1.3b-shape",
    dit=DiTConfig(),
    vae=VAEConfig(),
    text_encoder="umt5",
    text_len=512,
    height=480,
    width=832,
    fps=16,
    clip_latent_frames=21,
    window_chunks=6,
    shift=5.0,
)
"""Wan2.1-T2V-1.3B's shapes on our own DiT layout; ``wan2.1-t2v-1.3b`` is the same with Wan's layout exactly."""

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        TINY,
        Preset(
            name="small",
            dit=DiTConfig(in_channels=16, dim=384, depth=8, heads=6, ffn_dim=1536, text_dim=384),
            vae=VAEConfig(latent_channels=16, channels=(32, 64, 128, 128), temporal_down=(False, True, True)),
            text_encoder="minilm",
            text_len=32,
            height=128,
            width=128,
            fps=12,
            clip_latent_frames=12,
            window_chunks=3,
            shift=3.0,
        ),
        replace(
            TINY,
            name="tiny-wan2.1",
            dit=DiTConfig(
                in_channels=8, dim=64, depth=2, heads=2, ffn_dim=128, text_dim=384, freq_dim=64,
                null_text_len=32, architecture="wan2.1",
            ),
        ),
        replace(WAN_SHAPE, name="wan2.1-t2v-1.3b", dit=DiTConfig(null_text_len=512, architecture="wan2.1")),
        WAN_SHAPE,
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
