"""The DMD recipe on real DeepSpeed engines in this process: fresh critic batches, critic warm-up, clean-context
chunks masked from the loss, the generator's EMA, the ODE-regression anchor, and self-rollout's single exit step."""

from __future__ import annotations

import pytest
import torch

from infra import storage
from infra.config import DmdConfig
from model.distillation import dmd_gradient, dmd_loss
from model.presets import get_preset
from model.self_rollout import self_rollout
from model.weights import MODEL_FILE
from pipelines.workflow import plan
from training.dmd import DmdTask, Generator, split_rows
from tests.training.engines import engines_of

PRESET = get_preset("tiny")
BATCH = 2


@pytest.fixture(scope="module")
def weights(world) -> tuple[str, str]:
    """The tiny world's teacher weights: the real score, and the generator's start (as with ``ode_init = false``)."""
    teacher = storage.join(plan(world()).output_uri("teacher"), MODEL_FILE)
    return teacher, teacher


class RecordingTask(DmdTask):
    """The real task, noting which rows (by their first latent value) each update saw."""

    seen: list[tuple[str, list[float]]]

    def critic_update(self, batch, engines):
        self.seen.append(("critic", self.clean_latents(batch)[:, 0, 0, 0, 0].tolist()))
        return super().critic_update(batch, engines)

    def generator_update(self, step, batch, engines, frozen):
        self.seen.append(("generator", self.clean_latents(batch)[:, 0, 0, 0, 0].tolist()))
        return super().generator_update(step, batch, engines, frozen)


def task_with(weights: tuple[str, str], **settings) -> RecordingTask:
    generator_init, real = weights
    section = DmdConfig(**{"batch_size": BATCH, "warmup_steps": 0, "zero_stage": 0, "critic_steps": 3, **settings})
    task = RecordingTask(
        preset="tiny", teacher_mode="bidirectional", generator_init=generator_init, real_uri=real, vae_uri=None,
        section=section, guidance_scale=2.0, sample_text=None,
    )
    task.seen = []
    return task


def step_batch(rows: int, with_states: bool = False) -> dict[str, torch.Tensor]:
    """``rows`` distinct rows; row i's first latent value is i."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(rows, *PRESET.latent_shape(), generator=g)
    latents[:, 0, 0, 0, 0] = torch.arange(rows, dtype=latents.dtype)
    mask = torch.zeros(rows, PRESET.text_len, dtype=torch.bool)
    mask[:, :6] = True
    batch = {"latents": latents, "text_emb": torch.randn(rows, PRESET.text_len, PRESET.text_dim, generator=g), "text_mask": mask}
    if with_states:
        steps = len(PRESET.student_timesteps)
        batch = {"x0": latents, "states": torch.randn(rows, steps, *latents.shape[1:], generator=g), **batch}
        del batch["latents"]
    return batch


def test_each_critic_update_draws_its_own_batch_and_warmup_skips_the_generator(single_process_group, weights) -> None:
    task = task_with(weights, critic_warmup_steps=1)
    assert task.batches_per_step() == 4
    engines, frozen = engines_of(task, task.section)
    first = task.train_step(0, step_batch(4 * BATCH), engines, frozen)
    assert task.seen == [("critic", [2.0, 3.0]), ("critic", [4.0, 5.0]), ("critic", [6.0, 7.0])]
    assert "generator_loss" not in first and engines["generator"].global_steps == 0
    task.seen.clear()
    second = task.train_step(1, step_batch(4 * BATCH), engines, frozen)
    assert task.seen == [("critic", [2.0, 3.0]), ("critic", [4.0, 5.0]), ("critic", [6.0, 7.0]), ("generator", [0.0, 1.0])]
    assert (engines["critic"].global_steps, engines["generator"].global_steps) == (6, 1)
    assert float(second["generator_loss"]) > 0

    shared = task_with(weights, fresh_critic_batches=False)
    assert shared.batches_per_step() == 1
    assert [len(part["latents"]) for part in split_rows(step_batch(8), 4)] == [2, 2, 2, 2]


def test_clean_context_chunks_carry_no_loss() -> None:
    torch.manual_seed(0)
    dit = PRESET.build_dit(attention_mode="block_causal")
    dit.initialize(adaln_zero=False)
    times = PRESET.schedule().student_times(PRESET.student_timesteps)
    generator = Generator(dit, times, PRESET.chunk_frames, clean_context=True)
    batch = step_batch(4)
    torch.manual_seed(5)
    x0, loss_frames = generator(batch["latents"], batch["text_emb"], batch["text_mask"])
    assert loss_frames.any() and (~loss_frames).any()
    # A chunk drawn at t = 0 is the clean data itself: context for the chunks after it.
    torch.testing.assert_close(x0[~loss_frames], batch["latents"][~loss_frames], rtol=0, atol=0)

    def parameter_grads(x0_real: torch.Tensor, x0_fake: torch.Tensor) -> list[torch.Tensor]:
        generator.zero_grad()
        x0, frames = generator(batch["latents"], batch["text_emb"], batch["text_mask"])
        dmd_loss(x0, dmd_gradient(x0, x0_real, x0_fake, frames), frames).backward()
        return [p.grad.clone() for p in generator.parameters() if p.grad is not None]

    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    torch.manual_seed(5)
    reference = parameter_grads(real, fake)
    context = (~loss_frames)[..., None, None, None].expand_as(real)
    torch.manual_seed(5)
    changed = parameter_grads(torch.where(context, real + 100, real), torch.where(context, -fake, fake))
    assert all(torch.equal(a, b) for a, b in zip(reference, changed))
    assert sum(float(a.abs().sum()) for a in reference) > 0

    x = torch.zeros(2, 3, 4, requires_grad=True)
    frames = torch.tensor([[True, False, True], [False, False, True]])
    grad = torch.ones(2, 3, 4, dtype=torch.float64)
    dmd_loss(x, grad, frames).backward()
    torch.testing.assert_close(x.grad, frames[..., None].expand(2, 3, 4).float() / 12, rtol=0, atol=0)


def test_ema_follows_the_engine_and_the_anchor_adds_the_regression_loss(single_process_group, weights) -> None:
    task = task_with(weights, ema_decay=0.5, regression_weight=2.0, critic_steps=1)
    engines, frozen = engines_of(task, task.section)
    module = engines["generator"].module
    before = {k: v.clone() for k, v in module.ema.module.state_dict().items()}
    values = task.train_step(0, step_batch(2 * BATCH, with_states=True), engines, frozen)
    assert int(module.ema.updates) == 1
    for (k, e), w in zip(module.ema.module.state_dict().items(), module.dit.state_dict().values()):
        torch.testing.assert_close(e, 0.1 * before[k] + 0.9 * w, rtol=0, atol=1e-6)  # the warm-up's first decay
    assert float(values["regression_loss"]) > 0.1
    torch.testing.assert_close(
        float(values["generator_loss"]), float(values["dmd_loss"]) + 2.0 * float(values["regression_loss"]), rtol=1e-6, atol=0
    )


def test_self_rollout_carries_gradient_only_through_each_chunks_exit_step() -> None:
    torch.manual_seed(0)
    dit = PRESET.build_dit(attention_mode="block_causal")
    dit.initialize(adaln_zero=False)
    times = PRESET.schedule().student_times(PRESET.student_timesteps).tolist()
    calls: list[tuple[float, bool]] = []
    dit.register_forward_hook(lambda _m, args, _out: calls.append((round(float(args[1][0, 0]), 6), torch.is_grad_enabled())))
    batch = step_batch(2)
    noise = torch.randn_like(batch["latents"])
    exits = [2, 0, 3]
    x0 = self_rollout(dit, batch["text_emb"], batch["text_mask"].bool(), noise, times, PRESET.chunk_frames, exits)
    assert x0.shape == noise.shape and x0.requires_grad
    # Chunk n: steps 0..exit (only the exit with gradient), then the t = 0 pass into the cache.
    expected = []
    for exit_step in exits:
        expected += [(round(times[i], 6), i == exit_step) for i in range(exit_step + 1)] + [(0.0, False)]
    assert calls == expected
    x0.square().mean().backward()
    assert sum(float(p.grad.abs().sum()) for p in dit.parameters() if p.grad is not None) > 0


def test_self_rollout_step_on_the_engines(single_process_group, weights) -> None:
    task = task_with(weights, rollout="self", critic_steps=1)
    engines, frozen = engines_of(task, task.section)
    values = task.train_step(0, step_batch(2 * BATCH), engines, frozen)
    assert engines["generator"].global_steps == 1 and float(values["dmd_grad_norm"]) > 0
