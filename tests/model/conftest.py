"""Small random-weight models for the model tests (no adaLN-Zero, so every gate is active)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from model.dit import DiT, DiTConfig
from model.vae import VAE, VAEConfig

SMALL_DIT = DiTConfig(in_channels=4, dim=64, depth=2, heads=4, ffn_dim=128, text_dim=16, freq_dim=32, chunk_frames=2)


def build_dit(seed: int = 0, **overrides: object) -> DiT:
    torch.manual_seed(seed)
    model = DiT(DiTConfig(**{**SMALL_DIT.__dict__, **overrides}))
    model.initialize(adaln_zero=False)
    return model.eval()


def build_text(batch: int = 2, length: int = 5, dim: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, length, dim, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[-1, length - 2 :] = False
    return emb, mask


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """These models are far too small to gain from intra-op threads; one thread avoids spin-waits on a busy host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_dit() -> Callable[..., DiT]:
    """``make_dit(seed=0, **config_overrides)``: a random small DiT in eval mode."""
    return build_dit


@pytest.fixture
def make_text() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``make_text(batch=2, length=5, dim=16, seed=1)``: caption embeddings and a mask with padding."""
    return build_text


@pytest.fixture
def dit() -> DiT:
    return build_dit()


@pytest.fixture
def text() -> tuple[torch.Tensor, torch.Tensor]:
    return build_text()


@pytest.fixture(scope="module")
def tiny_vae() -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(latent_channels=4, channels=(8, 16, 16), temporal_down=(True, True))).eval()
