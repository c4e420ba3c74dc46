"""Which precision inference runs in: bf16 where the device computes it natively (AMX / AVX512-BF16 CPUs, GPUs
with bf16 tensor cores), fp32 elsewhere and as the reference of every equivalence test.

Inference in bf16 casts the weights (not autocast): no per-call casts of the weights, half the memory traffic. The
networks read inputs in their weights' dtype and hand results back in the caller's, so latents, the schedule's
arithmetic and the pixels stay fp32 around a bf16 network.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")
PrecisionChoice = Literal["auto", "fp32", "bf16"]
"""What a config asks for: ``auto`` is bf16 where the device computes it natively, fp32 elsewhere."""
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def has_native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls and convolutions run in hardware here rather than emulated through fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def default_precision(device: torch.device) -> Precision:
    """bf16 where it is native: on this kind of CPU the student's chunk runs about twice as fast and the VAE decode
    about nine times (fp32 convolutions this small fall back to a slow kernel), within the tested tolerances."""
    return "bf16" if has_native_bf16(device) else "fp32"


def resolve_precision(choice: PrecisionChoice, device: torch.device) -> Precision:
    """The precision a config's ``choice`` runs in on ``device``: ``auto`` follows :func:`default_precision`."""
    if choice == "auto":
        return default_precision(device)
    dtype_of(choice)
    return choice


def precision_note(choice: PrecisionChoice, device: torch.device) -> str:
    """One line for the console: what ``choice`` resolved to, and a warning where bf16 would be emulated."""
    precision = resolve_precision(choice, device)
    if precision == "bf16" and not has_native_bf16(device):
        return "precision bf16, emulated on this device (no AVX512-BF16 or AMX): many times slower than fp32; set precision: auto"
    return f"precision {precision}" + (" (auto)" if choice == "auto" else "")


def dtype_of(precision: Precision) -> torch.dtype:
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return DTYPES[precision]


def for_inference(module: nn.Module, precision: Precision) -> nn.Module:
    """The module in eval mode with its weights cast to ``precision``."""
    return module.to(dtype_of(precision)).eval()


def in_precision(module: nn.Module, precision: Precision) -> nn.Module:
    """``module`` itself when its weights already are in ``precision``, else a cast copy in eval mode: the caller's
    module (weights still training, a frozen VAE that also encodes) keeps its dtype."""
    if weights_dtype(module) == dtype_of(precision):
        return module
    return for_inference(copy.deepcopy(module), precision)


def weights_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
