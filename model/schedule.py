"""Flow-matching noise schedule: the one place for noising, conversions, time grids and the Euler solver.

Conventions (shared by every stage):
  * ``t`` is the flow time in [0, 1]: ``x_t = (1 - t) * x0 + t * eps``; t = 1 is pure noise, t = 0 is data.
  * The network predicts the velocity ``v = dx_t/dt = eps - x0``.
  * Timesteps are *named* on a 0..1000 scale (``1000, 750, 500, 250``); a name ``n`` means the shifted time
    ``t = shift_time(n / 1000, shift)``, so student steps, training times and ODE grids all shift the same way.
  * Latents are ``[B, F, C, H, W]``; ``t`` is a per-frame tensor ``[B, F]`` (or ``[B]`` / a float, broadcast).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""``velocity_fn(x_t [B, F, C, H, W], t [B, F]) -> v [B, F, C, H, W]``."""

TIMESTEP_SCALE = 1000.0


def shift_time(u: Tensor | float, shift: float) -> Tensor:
    """Map an unshifted time u in [0, 1] to ``shift * u / (1 + (shift - 1) * u)``; shift > 1 spends more time near noise."""
    u = torch.as_tensor(u, dtype=torch.float64 if not isinstance(u, Tensor) else None)
    return shift * u / (1 + (shift - 1) * u)


def unshift_time(t: Tensor | float, shift: float) -> Tensor:
    """Inverse of :func:`shift_time`."""
    t = torch.as_tensor(t, dtype=torch.float64 if not isinstance(t, Tensor) else None)
    return t / (shift - (shift - 1) * t)


def _expand_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast t (float, [B] or [B, F]) against ``x: [B, F, ...]``."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    if t.dim() == 0:
        return t
    if t.dim() == 1:
        t = t[:, None]
    return t.reshape(*t.shape, *([1] * (x.dim() - t.dim())))


def add_noise(x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """Noise clean latents to time t: ``x_t = (1 - t) x0 + t eps``."""
    tt = _expand_time(t, x0)
    return (1 - tt) * x0 + tt * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """The velocity the network is trained to predict: ``eps - x0``."""
    return eps - x0


def velocity_to_x0(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    return x_t - _expand_time(t, x_t) * v


def velocity_to_eps(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    return x_t + (1 - _expand_time(t, x_t)) * v


def x0_to_velocity(x_t: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
    """Undefined at t = 0 (every velocity gives the same x0 there)."""
    return (x_t - x0) / _expand_time(t, x_t)


def x0_to_eps(x_t: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
    return (x_t - (1 - _expand_time(t, x_t)) * x0) / _expand_time(t, x_t)


def eps_to_x0(x_t: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """Undefined at t = 1."""
    tt = _expand_time(t, x_t)
    return (x_t - tt * eps) / (1 - tt)


def euler_step(x_t: Tensor, v: Tensor, t: Tensor | float, t_next: Tensor | float) -> Tensor:
    """One Euler step of dx/dt = v from t to t_next (t_next < t when sampling)."""
    return x_t + (_expand_time(t_next, x_t) - _expand_time(t, x_t)) * v


def guided_velocity(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ``v_uncond + scale * (v_cond - v_uncond)``."""
    return v_uncond + scale * (v_cond - v_uncond)


@dataclass
class Trajectory:
    """An ODE solution: ``x0 [B, F, C, H, W]``, and ``states [K, B, F, C, H, W]`` at ``times [K]`` (as requested)."""

    x0: Tensor
    times: Tensor
    states: Tensor


@dataclass(frozen=True)
class FlowSchedule:
    """Flow matching with a time shift; all time grids below are shifted by ``shift``."""

    shift: float = 5.0

    def time_of(self, names: Sequence[float] | Tensor | float) -> Tensor:
        """Flow time t of timestep names on the 0..1000 scale (e.g. 750 -> shift(0.75)); float32."""
        u = torch.as_tensor(names, dtype=torch.float64) / TIMESTEP_SCALE
        return shift_time(u, self.shift).float()

    def student_times(self, names: Sequence[int] = (1000, 750, 500, 250)) -> Tensor:
        """The student's fixed denoising times, noisiest first: ``[S]``."""
        if list(names) != sorted(names, reverse=True):
            raise ValueError(f"student timesteps must be decreasing, got {list(names)}")
        return self.time_of(list(names))

    def sampling_times(self, num_steps: int, include: Sequence[float] | Tensor = ()) -> Tensor:
        """Euler grid ``[N + 1]`` from 1 to 0: shifted uniform steps, with the times in ``include`` merged in.

        Merging makes the states at requested times (the student's) exact ODE states rather than interpolations.
        """
        u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        grid = shift_time(u, self.shift)
        extra = torch.as_tensor(include, dtype=torch.float64).reshape(-1)
        new = [e for e in extra if (grid - e).abs().min() > 1e-6]
        if new:
            grid = torch.cat([grid, torch.stack(new)]).sort(descending=True).values
        return grid.float()

    def sample_training_times(
        self,
        shape: Sequence[int],
        *,
        kind: str = "logit_normal",
        mean: float = 0.0,
        std: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        t_min: float = 1e-3,
    ) -> Tensor:
        """Random training times in [t_min, 1]: ``uniform`` or ``logit_normal(mean, std)`` draws, then shifted."""
        if kind == "uniform":
            u = torch.rand(tuple(shape), generator=generator, device=device)
        elif kind == "logit_normal":
            u = torch.sigmoid(mean + std * torch.randn(tuple(shape), generator=generator, device=device))
        else:
            raise ValueError(f"unknown timestep sampling {kind!r}; expected 'uniform' or 'logit_normal'")
        return shift_time(u, self.shift).clamp(t_min, 1.0)

    def solve(
        self,
        velocity_fn: VelocityFn,
        noise: Tensor,
        num_steps: int,
        *,
        record_times: Sequence[float] | Tensor = (),
        callback: Callable[[int, Tensor, Tensor], None] | None = None,
    ) -> Trajectory:
        """Euler ODE from ``noise`` (t = 1) to x0 (t = 0); see :func:`euler_solve`."""
        record = torch.as_tensor(record_times, dtype=torch.float32).reshape(-1)
        grid = self.sampling_times(num_steps, include=record.double())
        return euler_solve(velocity_fn, noise, grid, record_times=record, callback=callback)


def euler_solve(
    velocity_fn: VelocityFn,
    noise: Tensor,
    grid: Tensor,
    *,
    record_times: Tensor | Sequence[float] = (),
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Trajectory:
    """Integrate dx/dt = v over ``grid [N + 1]`` (decreasing, grid[0] = 1, grid[-1] = 0).

    ``noise: [B, F, C, H, W]``. States whose time equals an entry of ``record_times`` (t = 1 is the noise itself)
    are kept in request order; ``callback(step, t, x_t)`` sees every state before its step.
    """
    record = torch.as_tensor(record_times, dtype=torch.float32).reshape(-1)
    b, f = noise.shape[:2]
    kept: dict[int, Tensor] = {}
    x = noise
    for i in range(len(grid) - 1):
        t, t_next = grid[i], grid[i + 1]
        _keep(kept, record, t, x)
        if callback is not None:
            callback(i, t, x)
        t_frames = torch.full((b, f), float(t), device=x.device, dtype=x.dtype)
        v = velocity_fn(x, t_frames)
        x = euler_step(x, v, t, t_next)
    _keep(kept, record, grid[-1], x)
    missing = [float(record[j]) for j in range(len(record)) if j not in kept]
    if missing:
        raise ValueError(f"record times {missing} are not on the solver grid")
    states = torch.stack([kept[j] for j in range(len(record))]) if len(record) else noise.new_zeros((0, *noise.shape))
    return Trajectory(x0=x, times=record, states=states)


def _keep(kept: dict[int, Tensor], record: Tensor, t: Tensor, x: Tensor) -> None:
    for j in torch.nonzero((record - float(t)).abs() < 1e-6).flatten().tolist():
        kept[j] = x
