"""The `causal_teacher` stage: fine-tune a copy of the teacher with the block-causal mask.

Each chunk of ``chunk_frames`` latent frames draws its own flow time (the diffusion-forcing style signal a
chunk-by-chunk generator needs); the weights start from the teacher's ``model.pt``. The result is a many-step
causal teacher, the `dmd` stage's alternative real score (``dmd.teacher = causal``). Outputs as for `teacher`,
with the oracle alignment measured on block-causal samples.
"""

from __future__ import annotations

from typing import Any

from infra import storage
from model.weights import MODEL_FILE
from pipelines.workflow import StageContext
from training.flow_matching import train_teacher


def run(ctx: StageContext) -> dict[str, Any]:
    init = storage.join(ctx.inputs["teacher"], MODEL_FILE)
    return train_teacher(ctx, ctx.config.causal_teacher, "block_causal", init_uri=init, independent_chunks=True)
