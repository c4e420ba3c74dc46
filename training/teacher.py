"""The `teacher` stage: train the bidirectional DiT with flow matching on latents, with text dropout for CFG.

The training and the oracle evaluation of its CFG samples are :func:`training.flow_matching.train_teacher`'s.
Output: ``model.pt`` (the plain DiT), ``checkpoints/`` (DeepSpeed, via Ray Train), ``eval/alignment.json``; in
MLflow: losses, throughput, samples as MP4, the weights, the alignment figures.
"""

from __future__ import annotations

from typing import Any

from pipelines.workflow import StageContext
from training.flow_matching import train_teacher


def run(ctx: StageContext) -> dict[str, Any]:
    return train_teacher(ctx, ctx.config.teacher, "bidirectional", init_uri=None, independent_chunks=False)
