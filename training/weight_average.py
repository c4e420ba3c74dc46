"""An exponential moving average of a network's weights, kept inside a stage's training module.

Living in the trained module, the average is in every DeepSpeed checkpoint (a resumed run continues the same
average) and in the plain copies the harness scores and exports, where it stands in for the raw weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage(nn.Module):
    """A frozen copy (``module``) of a network that follows its weights: ``module <- d * module + (1 - d) * net``.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (diffusers' ``EMAModel``), so a
    short run's average is not mostly its initial weights (a flat 0.99 keeps 37 % of them after 100 updates).
    """

    def __init__(self, network: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"a weight average's decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(network).requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def step_decay(self) -> float:
        """The decay of the next update."""
        n = int(self.updates)
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        """Move the average towards ``network``'s weights (under ZeRO-3, inside a gather: :func:`update_gathered`)."""
        weight = 1.0 - self.step_decay()
        for average, current in zip(self.module.parameters(), network.parameters()):
            average.lerp_(current.detach().to(average.dtype), weight)
        self.updates += 1


def update_gathered(average: WeightAverage, network: nn.Module, zero_stage: int) -> None:
    """:meth:`WeightAverage.update` on an engine's module: ZeRO-3 partitions both, so gather them first."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([*network.parameters(), *average.module.parameters()], modifier_rank=0):
            average.update(network)
    else:
        average.update(network)
