"""The distillation math on hand-computed cases, and DMD on a 2-D mixture of Gaussians with an exact teacher score."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model import schedule as sch
from model.distillation import (
    bucket_means,
    chunk_timestep_indices,
    critic_loss,
    dmd_gradient,
    dmd_loss,
    per_timestep_errors,
    sample_dmd_times,
    select_states,
)


def test_dmd_gradient_and_loss_hand_computed() -> None:
    x0 = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    x0_real = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    x0_fake = torch.tensor([[2.0, 2.0], [0.0, 1.0]])
    grad = dmd_gradient(x0, x0_real, x0_fake)
    # sample 0: mean|x0 - real| = 1.5, (fake - real) = (2, 2); sample 1: mean = 1, (fake - real) = (-1, 2)
    expected = torch.tensor([[4 / 3, 4 / 3], [-1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(grad, expected)
    loss = dmd_loss(x0, grad)
    torch.testing.assert_close(loss, torch.tensor((16 / 9 * 2 + 1 + 4) / 4 * 0.5, dtype=torch.float64))
    loss.backward()
    torch.testing.assert_close(x0.grad, (expected / 4).float())


def test_dmd_gradient_of_a_perfect_generator_is_zero_and_never_nan() -> None:
    x0 = torch.randn(3, 2, 4, 8, 8)
    torch.testing.assert_close(dmd_gradient(x0, x0 * 0.5, x0 * 0.5), torch.zeros_like(x0, dtype=torch.float64))
    assert torch.isfinite(dmd_gradient(x0, x0, x0 + 1)).all()


def test_chunk_timesteps_select_states_and_per_timestep_errors() -> None:
    g = torch.Generator().manual_seed(0)
    idx = chunk_timestep_indices(64, 7, 3, 4, generator=g)
    assert idx.shape == (64, 7) and set(idx.unique().tolist()) == {0, 1, 2, 3}
    assert (idx[:, 0:3] == idx[:, :1]).all() and (idx[:, 3:6] == idx[:, 3:4]).all()
    assert (idx[:, 0] != idx[:, 3]).any() and (idx[:, 3] != idx[:, 6]).any()
    states = torch.arange(4.0)[None, :, None, None, None, None] + torch.zeros(64, 4, 7, 2, 3, 3)
    picked = select_states(states, idx)
    assert picked.shape == (64, 7, 2, 3, 3)
    torch.testing.assert_close(picked[..., 0, 0, 0], idx.float())
    errors = per_timestep_errors(picked, torch.zeros_like(picked), idx, 5)
    torch.testing.assert_close(errors[:4], torch.arange(4.0) ** 2)
    assert torch.isnan(errors[4])


def test_dmd_times_critic_loss_and_buckets() -> None:
    schedule = sch.FlowSchedule(shift=3.0)
    t = sample_dmd_times(10_000, schedule, 0.02, 0.98, generator=torch.Generator().manual_seed(0))
    lo, hi = float(sch.shift_time(0.02, 3.0)), float(sch.shift_time(0.98, 3.0))
    assert lo - 1e-6 <= float(t.min()) and float(t.max()) <= hi + 1e-6
    assert abs(float(t.median()) - float(sch.shift_time(0.5, 3.0))) < 0.02
    x0, eps = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    assert torch.allclose(critic_loss(eps - x0, x0, eps), torch.zeros(4))
    assert bucket_means(torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([0.1, 0.3, 0.9, 0.95]), [0, 0.5, 1]) == {
        0: (1.5, 2),
        1: (4.0, 2),
    }


MODES = torch.tensor([[1.5, 1.5], [-1.5, 1.5], [1.5, -1.5], [-1.5, -1.5]])
MODE_STD = 0.15


def exact_x0(x_t: Tensor, t: Tensor) -> Tensor:
    """E[x0 | x_t] of the equal-weight Gaussian mixture under ``x_t = (1 - t) x0 + t eps``.  x_t: [B, 2], t: [B]."""
    tt = t[:, None]
    means = (1 - tt)[:, None] * MODES[None]  # [B, K, 2]
    var = (1 - tt) ** 2 * MODE_STD**2 + tt**2  # [B, 1]
    weights = (-((x_t[:, None] - means) ** 2).sum(-1) / (2 * var)).softmax(-1)  # [B, K]
    posterior = MODES[None] + ((1 - tt) * MODE_STD**2 / var)[:, None] * (x_t[:, None] - means)
    return (weights[..., None] * posterior).sum(1)


def mlp(inputs: int, outputs: int, hidden: int = 64) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, outputs)
    )


class ToyCritic(nn.Module):
    """Fake score: velocity of noised 2-D points at time t, ``(x_t [B, 2], t [B]) -> [B, 2]``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(2 + 16, 2)
        self.register_buffer("freqs", 3.0 * torch.arange(8.0))

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        angles = t[:, None] * self.freqs
        return self.net(torch.cat([x_t, angles.sin(), angles.cos()], -1))


def mmd(a: Tensor, b: Tensor, bandwidth: float = 0.5) -> float:
    def kernel(x: Tensor, y: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(x, y) ** 2 / (2 * bandwidth**2)).mean()

    return float(kernel(a, a) + kernel(b, b) - 2 * kernel(a, b))


def mode_shares(x: Tensor) -> tuple[float, list[float]]:
    """Fraction of points within 4 std of a mode, and the fraction near each mode."""
    distance = torch.cdist(x, MODES)
    near = distance.min(-1).values < 4 * MODE_STD
    which = distance.argmin(-1)
    return float(near.float().mean()), [float(((which == k) & near).float().mean()) for k in range(len(MODES))]


def test_dmd_moves_a_generator_onto_a_gaussian_mixture() -> None:
    """A one-step MLP generator from noise, an online flow-matching critic (5 updates per generator update)
    and the exact mixture score as the teacher: the generator lands on all four modes."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    schedule = sch.FlowSchedule(shift=1.0)
    generator, critic = mlp(2, 2), ToyCritic()
    opt_g = torch.optim.Adam(generator.parameters(), 2e-3)
    opt_c = torch.optim.Adam(critic.parameters(), 3e-3)
    z_eval = torch.randn(2000, 2)
    target = MODES[torch.randint(0, 4, (2000,))] + MODE_STD * torch.randn(2000, 2)
    with torch.no_grad():
        start = mmd(generator(z_eval), target)
    batch, critic_steps = 256, 5
    try:
        for _ in range(600):
            for _ in range(critic_steps):
                with torch.no_grad():
                    x = generator(torch.randn(batch, 2))
                t = sample_dmd_times(batch, schedule, 0.02, 0.98)
                eps = torch.randn_like(x)
                loss_c = critic_loss(critic(sch.add_noise(x, eps, t), t), x, eps).mean()
                opt_c.zero_grad()
                loss_c.backward()
                opt_c.step()
            x = generator(torch.randn(batch, 2))
            t = sample_dmd_times(batch, schedule, 0.02, 0.98)
            x_t = sch.add_noise(x.detach(), torch.randn_like(x), t)
            with torch.no_grad():
                grad = dmd_gradient(x, exact_x0(x_t, t), sch.velocity_to_x0(x_t, critic(x_t, t), t))
            opt_g.zero_grad()
            dmd_loss(x, grad).backward()
            opt_g.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        samples = generator(z_eval)
    end = mmd(samples, target)
    near, shares = mode_shares(samples)
    assert start > 1.0 and end < start / 15, (start, end)
    assert near > 0.55, near
    assert min(shares) > 0.1, shares
