"""DeepSpeed engines of a training task built in this process (under the one-rank group of ``conftest``), as a
Ray Train worker of a one-worker run builds them."""

from __future__ import annotations

import torch

from infra.config import TrainConfig
from training.harness import EngineSet, TrainTask, deepspeed_config


def engines_of(task: TrainTask, section: TrainConfig) -> tuple[EngineSet, dict[str, torch.nn.Module]]:
    """The task's engines (seed 0) and its frozen models in eval mode."""
    import deepspeed

    torch.manual_seed(0)
    models = task.build()
    engines = {}
    for name, spec in models.engines.items():
        engines[name], *_ = deepspeed.initialize(
            model=spec.module,
            model_parameters=[p for p in spec.module.parameters() if p.requires_grad],
            config=deepspeed_config(section, spec, 1),
        )
    return EngineSet(engines, section.zero_stage), {k: m.eval().requires_grad_(False) for k, m in models.frozen.items()}
