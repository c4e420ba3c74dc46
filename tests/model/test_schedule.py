"""Schedule: noising and conversions invert each other; the Euler solver follows the exact flow of a Gaussian."""

from __future__ import annotations

import pytest
import torch

from model import schedule as sch
from model.schedule import FlowSchedule


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 3, 4, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 3, 4, 5, 5, generator=g, dtype=torch.float64)
    t = torch.rand(2, 3, generator=g, dtype=torch.float64) * 0.98 + 0.01
    return x0, eps, t


def test_noising_and_conversions_invert() -> None:
    x0, eps, t = _pair()
    x_t = sch.add_noise(x0, eps, t)
    v = sch.velocity_target(x0, eps)
    assert torch.allclose(sch.velocity_to_x0(x_t, v, t), x0)
    assert torch.allclose(sch.velocity_to_eps(x_t, v, t), eps)
    assert torch.allclose(sch.x0_to_velocity(x_t, x0, t), v)
    assert torch.allclose(sch.x0_to_eps(x_t, x0, t), eps)
    assert torch.allclose(sch.eps_to_x0(x_t, eps, t), x0)


def test_time_broadcasting_forms_agree() -> None:
    x0, eps, _ = _pair()
    full = sch.add_noise(x0, eps, torch.full((2, 3), 0.3, dtype=torch.float64))
    assert torch.allclose(sch.add_noise(x0, eps, 0.3), full)
    assert torch.allclose(sch.add_noise(x0, eps, torch.full((2,), 0.3, dtype=torch.float64)), full)


def test_euler_step_on_the_straight_path_is_exact() -> None:
    """The flow-matching path is straight, so its own velocity takes x_t to x_s in one step."""
    x0, eps, _ = _pair()
    v = sch.velocity_target(x0, eps)
    x_t = sch.add_noise(x0, eps, 0.8)
    assert torch.allclose(sch.euler_step(x_t, v, 0.8, 0.35), sch.add_noise(x0, eps, 0.35))
    assert torch.allclose(sch.euler_step(x_t, v, 0.8, 0.0), x0)


def test_shift_and_names() -> None:
    s = FlowSchedule(shift=3.0)
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(sch.unshift_time(sch.shift_time(u, 3.0), 3.0), u)
    assert torch.allclose(s.time_of([1000, 500, 0]), torch.tensor([1.0, 0.75, 0.0]))
    times = s.student_times()
    assert torch.allclose(times, sch.shift_time(torch.tensor([1.0, 0.75, 0.5, 0.25]), 3.0).float())
    assert torch.all(times[1:] < times[:-1])
    assert torch.allclose(FlowSchedule(shift=1.0).student_times(), torch.tensor([1.0, 0.75, 0.5, 0.25]))
    with pytest.raises(ValueError):
        s.student_times((250, 500))


def test_sampling_grid_contains_requested_times() -> None:
    s = FlowSchedule(shift=5.0)
    student = s.student_times()
    grid = s.sampling_times(50, include=student)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and torch.all(grid[1:] < grid[:-1])
    for t in student:
        assert (grid - t).abs().min() < 1e-6
    assert len(s.sampling_times(48, include=student)) == 49
    assert len(grid) == 51 + 2  # u = 0.5 is already on a 50-step grid; 0.75 and 0.25 are added


def test_training_times() -> None:
    s = FlowSchedule(shift=3.0)
    g = torch.Generator().manual_seed(0)
    for kind in ("uniform", "logit_normal"):
        t = s.sample_training_times((20000,), kind=kind, generator=g)
        assert t.min() >= 1e-3 and t.max() <= 1.0
        assert abs(float(t.median()) - 0.75) < 0.02
    with pytest.raises(ValueError):
        s.sample_training_times((3,), kind="cosine")


def test_euler_recovers_the_gaussian_flow_and_records_exact_states() -> None:
    """For x0 ~ N(mu, s^2) the marginal flow is affine: x_t = (1-t) mu + sqrt((1-t)^2 s^2 + t^2) z."""
    mu, sd = 0.7, 0.3

    def true_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = 1 - sch._expand_time(t, x), sch._expand_time(t, x)
        var = a**2 * sd**2 + b**2
        e_x0 = mu + a * sd**2 / var * (x - a * mu)
        e_eps = b / var * (x - a * mu)
        return e_eps - e_x0

    s = FlowSchedule(shift=3.0)
    noise = torch.randn(4, 3, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = []
    traj = s.solve(true_velocity, noise, 800, record_times=s.student_times(), callback=lambda i, t, x: seen.append(i))
    err = (traj.x0 - (mu + sd * noise)).abs().max()
    assert err < 1e-2
    coarse = s.solve(true_velocity, noise, 200)
    assert (coarse.x0 - (mu + sd * noise)).abs().max() > 3 * err  # first-order convergence
    assert traj.states.shape == (4, *noise.shape)
    assert torch.equal(traj.states[0], noise)
    for t, state in zip(traj.times.double(), traj.states):
        exact = (1 - t) * mu + torch.sqrt((1 - t) ** 2 * sd**2 + t**2) * noise
        assert torch.allclose(state, exact, atol=2e-3)
    assert seen == list(range(800))  # 800 steps already hit u = 0.75, 0.5, 0.25
