"""The distillation math of CausVid: per-chunk student timesteps, ODE regression, and the DMD generator gradient.

Pure torch over tensors whose first axis is the batch (``[B, F, C, H, W]`` latents, or ``[B, D]`` points in the
toy tests); every noising and conversion goes through :mod:`model.schedule`. The stages in ``training/`` wrap
these functions in DeepSpeed engines.

Distribution matching (DMD, Yin et al. 2024): the generator's sample x0 is noised to a random t; the real score
(the teacher) and the fake score (a critic trained online on the generator's samples) each predict x0 from x_t.
Their difference, normalised per sample by ``mean |x0 - x0_real|``, is the gradient of the reverse KL between the
generator's and the data's noised distributions; it reaches the generator through the surrogate loss
``0.5 * ||x0 - stopgrad(x0 - grad)||^2``, whose gradient with respect to x0 is ``grad / numel``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor

from model import schedule as sch


def chunk_timestep_indices(
    batch: int,
    num_frames: int,
    chunk_frames: int,
    num_steps: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Index into the student's timestep list for every frame, ``[B, F]`` long, constant within each chunk."""
    chunks = -(-num_frames // chunk_frames)
    idx = torch.randint(0, num_steps, (batch, chunks), generator=generator, device=device)
    return repeat(idx, "b n -> b (n k)", k=chunk_frames)[:, :num_frames]


def select_states(states: Tensor, idx: Tensor) -> Tensor:
    """Per frame, the stored trajectory state at that frame's timestep.

    ``states: [B, S, F, C, H, W]`` (S student timesteps), ``idx: [B, F]`` -> ``x_t: [B, F, C, H, W]``.
    """
    index = idx[:, None, :, None, None, None].expand(-1, 1, -1, *states.shape[3:])
    return states.gather(1, index).squeeze(1)


def ode_regression_loss(x0_pred: Tensor, x0: Tensor) -> Tensor:
    """``L_init = ||G(x_t) - x0||^2``, averaged over every element."""
    return F.mse_loss(x0_pred.float(), x0.float())


def per_timestep_errors(x0_pred: Tensor, x0: Tensor, idx: Tensor, num_steps: int) -> Tensor:
    """Mean squared error of the frames at each student timestep, ``[S]`` (NaN where no frame drew it).

    ``x0_pred, x0: [B, F, C, H, W]``, ``idx: [B, F]``.
    """
    frame_err = (x0_pred.detach().float() - x0.float()).pow(2).flatten(2).mean(-1)
    sums = torch.zeros(num_steps, dtype=frame_err.dtype, device=frame_err.device).index_add_(
        0, idx.flatten(), frame_err.flatten()
    )
    counts = torch.bincount(idx.flatten(), minlength=num_steps).to(frame_err.dtype)
    return sums / counts


def sample_dmd_times(
    batch: int,
    schedule: sch.FlowSchedule,
    t_min: float,
    t_max: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """One flow time per sample, ``[B]``: uniform in [t_min, t_max] on the unshifted scale, then shifted."""
    u = t_min + (t_max - t_min) * torch.rand(batch, generator=generator, device=device)
    return sch.shift_time(u, schedule.shift).float()


def dmd_gradient(x0: Tensor, x0_real: Tensor, x0_fake: Tensor, frame_mask: Tensor | None = None) -> Tensor:
    """``(x0_fake - x0_real) / mean|x0 - x0_real|``, the mean taken per sample over all but the batch axis.

    With ``frame_mask [B, F]`` (bool) the mean runs over the kept frames and the others' gradient is zero.
    """
    dims = tuple(range(1, x0.dim()))
    x0, x0_real, x0_fake = x0.detach().double(), x0_real.double(), x0_fake.double()
    if frame_mask is None:
        normalizer = (x0 - x0_real).abs().mean(dim=dims, keepdim=True)
        return torch.nan_to_num((x0_fake - x0_real) / normalizer)
    keep = _frame_weights(frame_mask, x0)
    normalizer = ((x0 - x0_real).abs() * keep).sum(dim=dims, keepdim=True) / keep.sum(dim=dims, keepdim=True)
    return torch.nan_to_num((x0_fake - x0_real) * keep / normalizer)


def _frame_weights(frame_mask: Tensor, like: Tensor) -> Tensor:
    """``frame_mask [B, F]`` as 0/1 weights broadcast to ``like [B, F, ...]`` (float64)."""
    return frame_mask.reshape(*frame_mask.shape, *[1] * (like.dim() - 2)).expand_as(like).double()


def dmd_loss(x0: Tensor, grad: Tensor, frame_mask: Tensor | None = None) -> Tensor:
    """``0.5 * mean((x0 - stopgrad(x0 - grad))^2)``: a loss whose gradient w.r.t. ``x0`` is ``grad / x0.numel()``.

    With ``frame_mask [B, F]`` (bool) the mean runs over the kept frames only: the others (clean context chunks)
    get exactly zero gradient, the kept ones ``grad / (kept elements)``.
    """
    target = (x0.double() - grad.double()).detach()
    if frame_mask is None:
        return 0.5 * F.mse_loss(x0.double(), target)
    keep = _frame_weights(frame_mask, x0)
    return 0.5 * ((x0.double() - target).pow(2) * keep).sum() / keep.sum().clamp(min=1)


def critic_loss(velocity: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
    """The fake score's flow-matching loss per sample, ``[B]``: ``mean((v - (eps - x0))^2)`` over each sample."""
    target = sch.velocity_target(x0.detach().float(), eps.float())
    return (velocity.float() - target).pow(2).flatten(1).mean(-1)


def bucket_means(values: Tensor, t: Tensor, edges: Sequence[float]) -> dict[int, tuple[float, int]]:
    """Mean of ``values [B]`` per bucket of ``t [B]`` between consecutive ``edges``: ``{bucket: (mean, count)}``."""
    bounds = torch.as_tensor(list(edges), dtype=t.dtype, device=t.device)
    which = torch.bucketize(t, bounds[1:-1], right=True)
    out: dict[int, tuple[float, int]] = {}
    for bucket in range(len(edges) - 1):
        chosen = values[which == bucket]
        if chosen.numel():
            out[bucket] = (float(chosen.float().mean()), int(chosen.numel()))
    return out
