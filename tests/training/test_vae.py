"""The VAE objective and round trip on rendered shapes-world clips (in process, tiny preset, 32x32)."""

from __future__ import annotations

import numpy as np
import torch

from model.presets import get_preset
from model.vae import pixels_to_video
from pipelines.shapes_world import render, sample_clip
from training.vae import VaeLoss, psnr_from_mse, roundtrip


def clips(count: int, frames: int, size: int) -> np.ndarray:
    return np.stack([render(sample_clip(0, i), size=size, fps=12, seconds=frames / 12) for i in range(count)])


def psnr(vae: torch.nn.Module, pixels: np.ndarray) -> float:
    recon = roundtrip(vae.eval(), pixels)
    return psnr_from_mse(float(np.mean((recon / 255.0 - pixels / 255.0) ** 2)))


def test_roundtrip_shape_and_psnr_after_short_training() -> None:
    torch.manual_seed(0)
    pixels = clips(4, 5, 32)  # [B, T, H, W, 3], T = 1 + 4
    objective = VaeLoss(get_preset("tiny").build_vae(), kl_weight=1e-6, edge_weight=0.5)
    assert roundtrip(objective.vae, pixels).shape == pixels.shape
    with torch.no_grad():
        assert objective.vae.encode(pixels_to_video(torch.from_numpy(pixels))).shape == (4, 2, 8, 8, 8)
    before = psnr(objective.vae, pixels)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    video = pixels_to_video(torch.from_numpy(pixels))
    objective.train()
    for _ in range(50):
        loss, recon, kl, edge = objective(video)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = psnr(objective.vae, pixels)
    # The average-pool initialisation already reconstructs flat colours (22 dB here); training sharpens edges.
    assert before > 20.0 and after > before + 0.8, (before, after)


def test_psnr_of_known_error() -> None:
    assert psnr_from_mse(0.01) == 20.0
    assert abs(psnr_from_mse(1e-4) - 40.0) < 1e-9
