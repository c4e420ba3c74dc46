"""bf16 autocast and torch.compile against the fp32 eager reference, on the tiny preset's DiT."""

from __future__ import annotations

import torch

from infra.config import load_config
from model.attention import attention
from model.dit import DiT
from model.presets import get_preset
from training.flow_matching import FlowMatchingLoss
from training.harness import autocast

BF16_LOSS_RTOL = 1e-3  # measured: 1.2e-5 on this batch


def active_dit() -> DiT:
    """The tiny DiT with every gate and the head randomly initialised, so every path carries signal."""
    torch.manual_seed(0)
    dit = get_preset("tiny").build_dit()
    dit.initialize(adaln_zero=False)
    for p in (dit.head.weight, dit.time_proj[-1].weight):
        torch.nn.init.normal_(p, std=0.02)
    return dit


def batch(b: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = get_preset("tiny")
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(b, *p.latent_shape(), generator=g)
    text = torch.randn(b, p.text_len, p.text_dim, generator=g)
    mask = torch.zeros(b, p.text_len, dtype=torch.bool)
    mask[:, :10] = True
    return latents, text, mask


def step_loss_and_grads(objective: FlowMatchingLoss, precision: str) -> tuple[float, torch.Tensor]:
    section = load_config(None, [f"teacher.precision={precision}"]).teacher
    objective.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    with autocast(section, torch.device("cpu")):
        loss = objective(*batch())
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in objective.dit.parameters() if p.grad is not None])
    return float(loss.detach()), grads


def test_bf16_step_matches_fp32_within_tolerance() -> None:
    p = get_preset("tiny")
    objective = FlowMatchingLoss(active_dit(), p.shift, text_dropout=0.25)
    loss32, grads32 = step_loss_and_grads(objective, "fp32")
    loss16, grads16 = step_loss_and_grads(objective, "bf16")
    assert abs(loss16 - loss32) <= BF16_LOSS_RTOL * loss32, (loss16, loss32)
    assert torch.nn.functional.cosine_similarity(grads16, grads32, dim=0) > 0.999
    assert objective.dit.head.weight.dtype == torch.float32  # the master weights stay fp32


def test_attention_trains_in_fp32_under_cpu_autocast_and_infers_in_bf16() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 64, 32, generator=g).bfloat16().requires_grad_() for _ in range(3))
    exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = attention(q, k, v)
        with torch.no_grad():
            inferred = attention(q, k, v)
    assert trained.dtype == inferred.dtype == torch.bfloat16
    assert torch.equal(trained, exact.bfloat16())  # fp32 scores, one rounding of the output
    assert torch.equal(inferred, torch.nn.functional.scaled_dot_product_attention(q, k, v).detach())
    trained.float().sum().backward()
    q32 = q.detach().float().requires_grad_()
    torch.nn.functional.scaled_dot_product_attention(q32, k.float(), v.float()).bfloat16().float().sum().backward()
    assert q.grad is not None and torch.equal(q.grad, q32.grad.bfloat16())  # the backward in fp32 too


def test_compiled_forward_equals_eager() -> None:
    dit = active_dit().eval()
    latents, text, mask = batch(2)
    t = torch.rand(2, latents.shape[1])
    with torch.no_grad():
        eager = dit(latents, t, text, mask)
        dit.compile()
        compiled = dit(latents, t, text, mask)
    assert eager.abs().mean() > 0.01
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
