"""The `ode_init` stage: the block-causal student regresses the teacher's ODE end points (CausVid stage 1).

The student starts from the teacher's weights (see :mod:`training.regression`). Afterwards the exported student is
scored by the pixel oracle on 4-step streaming samples of the teacher's held-out prompts (decoded by the VAE), and
its regression loss is measured per timestep. Output: ``model.pt`` (the plain block-causal DiT), ``checkpoints/``,
``eval/alignment.json``, ``eval/regression.json``.
"""

from __future__ import annotations

from typing import Any

from infra import storage
from model.weights import MODEL_FILE
from pipelines.workflow import StageContext, vae_of
from training.regression import train_regression


def run(ctx: StageContext) -> dict[str, Any]:
    teacher_uri = ctx.inputs["teacher"]
    init = storage.join(teacher_uri, MODEL_FILE)
    return train_regression(ctx, ctx.config.ode_init, ctx.inputs["trajectories"], init, vae_of(teacher_uri))
