"""Which precision inference runs in: bf16 where the device computes it natively (AMX / AVX512-BF16 CPUs, GPUs
with bf16 tensor cores), fp32 elsewhere and as the reference of every equivalence test."""

from __future__ import annotations

import torch


def has_native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls and convolutions run in hardware here rather than emulated through fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
