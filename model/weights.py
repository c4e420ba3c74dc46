"""Plain-PyTorch weight files: what a training stage exports and what inference loads with one call.

A stage output that holds a network keeps it in one file, :data:`MODEL_FILE`. The file holds the preset name, the
kind of network (``dit``, ``vae``, or ``wan_vae`` for an imported Wan VAE), the attention mode a DiT was trained in,
the network's config as plain data and its fp32 state dict, so ``load_model(uri)`` rebuilds the exact network
without Ray or DeepSpeed. An imported network is kept as safetensors instead (:data:`SAFETENSORS_FILE` with the
rest of the payload in :data:`SAFETENSORS_META`, beside it): a ``model.pt`` URI whose folder holds those reads the
same. Files live on any URI that :mod:`infra.storage` reaches (local or s3://).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import Any

import torch
from torch import nn

from infra import storage
from model.dit import DiT, DiTConfig
from model.vae import VAE, VAEConfig

FORMAT = "causvid-weights/1"
MODEL_FILE = "model.pt"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_META = "model.json"
KINDS = ("dit", "vae", "wan_vae")


def model_config(module: nn.Module) -> dict[str, Any]:
    """The network's config as plain data (tuples stay tuples, so it round-trips); a Wan VAE's is diffusers'."""
    if hasattr(module.cfg, "diffusers"):
        return dict(module.cfg.diffusers)
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


def safetensors_files(payload: dict[str, Any]) -> tuple[bytes, bytes]:
    """A payload as the bytes of :data:`SAFETENSORS_FILE` (its state dict) and :data:`SAFETENSORS_META` (the rest)."""
    from safetensors.torch import save

    weights = save({k: v.contiguous() for k, v in payload["state_dict"].items()})
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return weights, json.dumps(meta, indent=1).encode()


def weights_digest(weights: bytes) -> str:
    return hashlib.sha256(weights).hexdigest()


def write_safetensors(folder_uri: str, files: tuple[bytes, bytes]) -> None:
    """Write :func:`safetensors_files` into a folder, the weights first (each file atomically)."""
    storage.write_bytes(storage.join(folder_uri, SAFETENSORS_FILE), files[0])
    storage.write_bytes(storage.join(folder_uri, SAFETENSORS_META), files[1])


def _read_safetensors(folder_uri: str) -> dict[str, Any]:
    from safetensors.torch import load

    meta = json.loads(storage.read_bytes(storage.join(folder_uri, SAFETENSORS_META)))
    if meta.get("kind") == "dit":
        meta["config"]["patch"] = tuple(meta["config"]["patch"])
    return {**meta, "state_dict": load(storage.read_bytes(storage.join(folder_uri, SAFETENSORS_FILE)))}


def _safetensors_folder(uri: str) -> str | None:
    """The folder of an imported network that a ``model.pt`` URI stands for, if that is what it holds."""
    folder = uri.rsplit("/", 1)[0]
    if uri.endswith(MODEL_FILE) and not storage.exists(uri) and storage.exists(storage.join(folder, SAFETENSORS_FILE)):
        return folder
    return None


def model_exists(uri: str) -> bool:
    """Whether a ``model.pt`` URI holds a network, in either format."""
    return storage.exists(uri) or _safetensors_folder(uri) is not None


def read_payload(uri: str) -> dict[str, Any]:
    folder = _safetensors_folder(uri)
    if folder is not None:
        return _read_safetensors(folder)
    payload = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{uri} is not a causvid weights file (format {payload.get('format')!r})")
    return payload


def build_from_payload(payload: dict[str, Any], mode: str | None = None) -> nn.Module:
    """The plain network of a payload in eval mode; ``mode`` overrides a DiT's attention mode."""
    cfg = dict(payload["config"])
    if payload["kind"] == "wan_vae":
        from model.wan import wan_vae_from_state

        return wan_vae_from_state(cfg, payload["state_dict"])
    if payload["kind"] == "dit":
        cfg["attention_mode"] = mode or payload.get("mode", cfg["attention_mode"])
        module: nn.Module = DiT(DiTConfig(**cfg))
    else:
        module = VAE(VAEConfig(**cfg))
    module.load_state_dict(payload["state_dict"])
    if cfg.get("architecture") == "wan2.1":
        module.null_text_embedding.requires_grad_(False)
    return module.eval()


def load_model(uri: str, mode: str | None = None) -> nn.Module:
    """Load an exported ``model.pt`` into the plain DiT or VAE for inference (eval mode, fp32, CPU)."""
    return build_from_payload(read_payload(uri), mode)
