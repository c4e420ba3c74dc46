"""Which student to generate from: a stage output folder, a ``model.pt`` URI, the MLflow run id of the stage that
wrote it or a ``models:/`` URI of a model logged in such a run, resolved to its weights and the VAE found through the
manifests of its inputs."""

from __future__ import annotations

import re
from dataclasses import dataclass

from infra import storage, tracking
from infra.config import PipelineConfig
from infra.errors import UserError
from model.weights import MODEL_FILE, model_exists
from pipelines.workflow import vae_of

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Checkpoint:
    """Where a student's weights and its VAE live; ``output_uri`` is the stage output when known."""

    model_uri: str
    vae_uri: str
    output_uri: str | None = None


def resolve_checkpoint(checkpoint: str, *, vae: str | None = None, config: PipelineConfig | None = None) -> Checkpoint:
    """A stage output folder, a ``model.pt`` URI, or an MLflow run id (its ``causvid.output`` tag) -> weights + VAE."""
    output: str | None
    if checkpoint.endswith(".pt") and storage.exists(checkpoint):
        model_uri = storage.normalize(checkpoint)
        parent = model_uri.rsplit("/", 1)[0]
        output = parent if storage.is_complete(parent) else None
    elif storage.exists(checkpoint):
        output = storage.normalize(checkpoint)
        if not storage.is_complete(output):
            raise UserError(f"checkpoint {checkpoint} is not a complete stage output (no {storage.MANIFEST})")
        model_uri = storage.join(output, MODEL_FILE)
        if not model_exists(model_uri):
            raise UserError(f"checkpoint {checkpoint} holds no {MODEL_FILE}")
    elif RUN_ID.match(checkpoint) or checkpoint.startswith("models:/"):
        output = _run_output(checkpoint, config or PipelineConfig())
        model_uri = storage.join(output, MODEL_FILE)
        if not model_exists(model_uri):
            raise UserError(f"MLflow run {checkpoint} wrote no {MODEL_FILE} (output {output})")
    else:
        raise UserError(
            f"unknown checkpoint {checkpoint!r}: not a stage output, a {MODEL_FILE}, an MLflow run id or a models:/ URI"
        )
    vae_uri = vae or (vae_of(output) if output else None)
    if not vae_uri:
        raise UserError(f"no VAE is recorded for checkpoint {checkpoint}; pass --vae PATH/model.pt")
    if not model_exists(vae_uri):
        raise UserError(f"VAE weights not found: {vae_uri}")
    return Checkpoint(model_uri, vae_uri, output)


def _run_output(reference: str, config: PipelineConfig) -> str:
    """The ``causvid.output`` of a run, given its id or a ``models:/`` URI of a model it logged."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking.tracking_uri(config)
    run_id = reference
    try:
        if reference.startswith("models:/"):
            tracking.configure(config)
            run_id = str(mlflow.models.get_model_info(reference).run_id)
        tags = MlflowClient(tracking_uri=uri).get_run(run_id).data.tags
    except MlflowException:
        raise UserError(f"unknown checkpoint {reference!r}: no such MLflow run or model in {uri}") from None
    output = tags.get("causvid.output")
    if not output or not storage.is_complete(output):
        raise UserError(f"MLflow run {run_id} has no complete stage output (tag causvid.output={output!r})")
    return output
