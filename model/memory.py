"""Training memory of a preset's DiT, computed on the meta device (no weights, no accelerator needed).

Model states follow ZeRO's accounting for bf16 mixed precision with Adam: 2 bytes of bf16 weights, 2 of gradients
and 12 of fp32 master weights and moments per parameter, of which stage 1 shards the 12 over the data-parallel
ranks, stage 2 the gradients too, and stage 3 everything. Activations are the bytes autograd saves for backward in
one bf16 forward of a training clip, traced on meta tensors (each storage counted once); the attention matrices the
meta device's math kernel would keep are counted as the logsumexp a flash kernel keeps instead.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from torch import Tensor

from model.dit import DiT
from model.presets import Preset, get_preset

GIB = 2**30
BYTES_PER_PARAMETER = {"weights": 2, "gradients": 2, "optimizer": 12}


def model_state_bytes(parameters: int, zero_stage: int, ranks: int) -> int:
    """Bytes of weights, gradients and Adam states per rank under a ZeRO stage (0 = plain data parallel)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    b = BYTES_PER_PARAMETER
    sharded = {0: (), 1: ("optimizer",), 2: ("optimizer", "gradients"), 3: ("optimizer", "gradients", "weights")}
    per_parameter = sum(size / ranks if part in sharded[zero_stage] else size for part, size in b.items())
    return math.ceil(parameters * per_parameter)


def saved_activation_bytes(dit: DiT, latent_frames: int, preset: Preset, *, checkpointing: bool) -> int:
    """Bytes saved for backward by one bf16 training forward of one clip (batch 1) of a meta-device DiT."""
    f, c, h, w = preset.latent_shape(latent_frames)
    tokens = f * (h // dit.cfg.patch[1]) * (w // dit.cfg.patch[2])
    meta = {"device": "meta", "dtype": torch.bfloat16}
    x, t = torch.empty(1, f, c, h, w, **meta), torch.empty(1, f, **meta)
    text = torch.empty(1, preset.text_len, preset.text_dim, **meta)
    mask = torch.ones(1, preset.text_len, dtype=torch.bool, device="meta")
    saved: dict[Any, int] = {}

    def keep(tensor: Tensor) -> Tensor:
        if tensor.dim() >= 2 and tensor.shape[-2:] == (tokens, tokens):
            saved[("logsumexp", len(saved))] = math.prod(tensor.shape[:-1]) * 4
        else:
            storage = tensor.untyped_storage()
            saved[storage._cdata] = storage.nbytes()
        return tensor

    dit.gradient_checkpointing = checkpointing
    dit.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        dit(x, t, text, mask)
    return sum(saved.values())


def training_memory(preset_name: str, ranks: int = 8) -> dict[str, Any]:
    """Parameters, model states per ZeRO stage and rank, and activations per clip, with and without checkpointing.

    With block checkpointing the peak adds one block's activations (recomputed in backward) to the saved inputs.
    """
    preset = get_preset(preset_name)
    dit = preset.build_dit("meta").to(torch.bfloat16)
    parameters = dit.num_parameters()
    whole = saved_activation_bytes(dit, preset.clip_latent_frames, preset, checkpointing=False)
    inputs = saved_activation_bytes(dit, preset.clip_latent_frames, preset, checkpointing=True)
    return {
        "preset": preset_name,
        "parameters": parameters,
        "trainable_parameters": sum(p.numel() for p in dit.parameters() if p.requires_grad),
        "ranks": ranks,
        "model_states_gib_per_rank": {
            f"zero{stage}": round(model_state_bytes(parameters, stage, ranks) / GIB, 2) for stage in range(4)
        },
        "activations_gib_per_clip": round(whole / GIB, 2),
        "activations_gib_per_clip_checkpointed": round((inputs + whole / preset.dit.depth) / GIB, 2),
        "clip_latent_frames": preset.clip_latent_frames,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="causvid bench memory", description=__doc__)
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
    parser.add_argument("--ranks", type=int, default=8, help="data-parallel ranks that ZeRO shards over")
    args = parser.parse_args(list(argv or []))
    return training_memory(args.preset, args.ranks)
