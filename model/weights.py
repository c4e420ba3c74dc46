"""Plain-PyTorch weight files: what a training stage exports and what inference loads with one call.

A stage output that holds a network keeps it in one file, :data:`MODEL_FILE`. The file holds the preset name, the
kind of network (``dit`` or ``vae``), the attention mode a DiT was trained in, the network's config as plain data
and its fp32 state dict, so ``load_model(uri)`` rebuilds the exact network without Ray or DeepSpeed. Files live
on any URI that :mod:`infra.storage` reaches (local or s3://).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import torch
from torch import nn

from infra import storage
from model.dit import DiT, DiTConfig
from model.vae import VAE, VAEConfig

FORMAT = "causvid-weights/1"
MODEL_FILE = "model.pt"
KINDS = ("dit", "vae")


def model_config(module: nn.Module) -> dict[str, Any]:
    """The network's dataclass config as plain data (tuples stay tuples, so it round-trips)."""
    return dataclasses.asdict(module.cfg)


def weights_payload(module: nn.Module, *, kind: str, preset: str, step: int, extra: dict[str, Any] | None = None) -> dict:
    """Everything ``load_model`` needs, with the state dict detached to fp32 CPU tensors."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    payload: dict[str, Any] = {
        "format": FORMAT,
        "kind": kind,
        "preset": preset,
        "config": model_config(module),
        "step": int(step),
        "state_dict": {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()},
        "extra": dict(extra or {}),
    }
    if kind == "dit":
        payload["mode"] = module.attention_mode
    return payload


def save_model(uri: str, module: nn.Module, *, kind: str, preset: str, step: int, extra: dict | None = None) -> None:
    """Write one weights file atomically (see ``infra.storage.write_bytes``)."""
    save_payload(uri, weights_payload(module, kind=kind, preset=preset, step=step, extra=extra))


def save_payload(uri: str, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    storage.write_bytes(uri, buffer.getvalue())


def read_payload(uri: str) -> dict[str, Any]:
    payload = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{uri} is not a causvid weights file (format {payload.get('format')!r})")
    return payload


def build_from_payload(payload: dict[str, Any], mode: str | None = None) -> nn.Module:
    """The plain network of a payload in eval mode; ``mode`` overrides a DiT's attention mode."""
    cfg = dict(payload["config"])
    if payload["kind"] == "dit":
        cfg["attention_mode"] = mode or payload.get("mode", cfg["attention_mode"])
        module: nn.Module = DiT(DiTConfig(**cfg))
    else:
        module = VAE(VAEConfig(**cfg))
    module.load_state_dict(payload["state_dict"])
    return module.eval()


def load_model(uri: str, mode: str | None = None) -> nn.Module:
    """Load an exported ``model.pt`` into the plain DiT or VAE for inference (eval mode, fp32, CPU)."""
    return build_from_payload(read_payload(uri), mode)
