"""The moving average of a network's weights: its warm-up and exact update, and the teacher stage's use of it
(updated with every optimiser step, carried in the engine's state, and what the stage samples and exports)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from infra.config import TeacherConfig
from tests.training.engines import engines_of
from training.flow_matching import TeacherTask
from training.weight_average import WeightAverage

BATCH = 2


def test_the_decay_warms_up_and_each_update_is_exact() -> None:
    network = nn.Linear(3, 2)
    average = WeightAverage(network, 0.75)
    decays = []
    for _ in range(30):
        decays.append(average.step_decay())
        average.update(network)
    assert decays[:3] == [1 / 10, 2 / 11, 3 / 12] and decays[25] == 26 / 35 and decays[26:] == [0.75] * 4
    assert int(average.updates) == 30 and "updates" in average.state_dict()
    with torch.no_grad():
        for p in network.parameters():
            p.fill_(6.0)
        for p in average.module.parameters():
            p.fill_(2.0)
    average.update(network)
    assert all(torch.equal(p, torch.full_like(p, 3.0)) for p in average.module.parameters())
    assert not any(p.requires_grad for p in average.module.parameters())


def test_a_decay_outside_zero_one_is_refused() -> None:
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(nn.Linear(2, 2), 1.0)


def test_the_teacher_updates_its_average_each_step_and_exports_it(single_process_group) -> None:
    section = TeacherConfig(batch_size=BATCH, warmup_steps=0, zero_stage=0, ema_decay=0.9)
    task = TeacherTask(
        preset="tiny", mode="bidirectional", lr=1e-3, weight_decay=0.0, text_dropout=0.1, vae_uri=None,
        sample_text=None, sample_steps=2, guidance_scale=2.0, ema_decay=section.ema_decay,
    )
    engines, frozen = engines_of(task, section)
    module = engines["dit"].module
    torch.manual_seed(1)
    batch = {
        "latents": torch.randn(BATCH, 9, 8, 16, 16),
        "text_emb": torch.randn(BATCH, 32, 384),
        "text_mask": torch.ones(BATCH, 32, dtype=torch.bool),
    }
    start = {k: v.clone() for k, v in module.dit.state_dict().items()}
    for step in range(2):
        before = {k: v.clone() for k, v in module.ema.module.state_dict().items()}
        task.train_step(step, batch, engines, frozen)
        first = 1 / 10 if step == 0 else 2 / 11
        for (k, average), current in zip(module.ema.module.state_dict().items(), module.dit.state_dict().values()):
            torch.testing.assert_close(average, first * before[k] + (1 - first) * current, rtol=0, atol=1e-6)
    assert int(module.ema.updates) == 2 and int(module.state_dict()["ema.updates"]) == 2
    moved = [k for k, v in module.dit.state_dict().items() if not torch.equal(v, start[k])]
    assert moved and any(not torch.equal(module.ema.module.state_dict()[k], module.dit.state_dict()[k]) for k in moved)
    assert task.export.unwrap(module) is module.ema.module
