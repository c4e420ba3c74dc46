"""MLflow: one parent run per workflow run, one child run per stage.

The embedded default is a SQLite store with artifacts under the storage root; `tracking.uri` or
$MLFLOW_TRACKING_URI point at a server instead. Ray workers log into the stage's child run by id
(`log_to_run`), so a distributed stage still ends up as one run.
"""

from __future__ import annotations

import os
import socket
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.tracking import MlflowClient

from infra import storage
from infra.config import ConfigError, PipelineConfig
from infra.redact import redact



def tracking_uri(config: PipelineConfig) -> str:
    if config.tracking.uri:
        return config.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = config.storage.root
    if storage.is_s3(root):
        raise ConfigError(
            "storage.root is on S3 but no MLflow server is set: export MLFLOW_TRACKING_URI or set tracking.uri"
        )
    path = Path(storage.normalize(root))
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def artifact_location(config: PipelineConfig) -> str | None:
    """Artifacts beside a SQLite store (MLflow would put them under the working directory); a server decides its own."""
    uri = tracking_uri(config)
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts").as_uri()
    return None


def configure(config: PipelineConfig) -> str:
    """Point MLflow at the store and experiment of this config; returns the experiment id."""
    uri = tracking_uri(config)
    _set_tracking_uri_keeping_env(uri)
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        experiment_id = mlflow.create_experiment(config.tracking.experiment, artifact_location=artifact_location(config))
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _set_tracking_uri_keeping_env(uri: str) -> None:
    """mlflow.set_tracking_uri also exports $MLFLOW_TRACKING_URI, which would then outrank the next config."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config as flat `a.b` params, with secrets redacted (secret-looking keys, secret values)."""
    flat: dict[str, str] = {}
    for key, value in redact(dict(params)).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def _process_tags() -> dict[str, str]:
    """Which process owns a run, so that the next run can tell a killed one from one still going."""
    return {"causvid.host": socket.gethostname(), "causvid.pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_orphaned_runs(experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs of this host whose process is gone (a `kill -9`); returns their ids."""
    client = MlflowClient()
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`causvid.host` = '{host}'"
    )
    orphans = [run.info.run_id for run in runs if not _alive(int(run.data.tags.get("causvid.pid", "0") or 0))]
    for run_id in orphans:
        client.set_terminated(run_id, status="FAILED")
    return orphans


@contextmanager
def workflow_run(config: PipelineConfig, name: str, tags: Mapping[str, str]) -> Iterator[str]:
    fail_orphaned_runs(configure(config))
    with mlflow.start_run(run_name=name, tags=redact({"causvid.kind": "workflow", **_process_tags(), **tags})) as run:
        mlflow.log_params(flatten({"storage": {"root": config.storage.root}, "model": config.model.model_dump()}))
        yield run.info.run_id


@contextmanager
def stage_run(
    config: PipelineConfig,
    stage: str,
    params: Mapping[str, Any],
    inputs: Mapping[str, str],
    output_uri: str,
    parent_run_id: str,
) -> Iterator[str]:
    """A child run for one stage: config as params, inputs and output as tags and datasets."""
    tags = {
        **_process_tags(),
        "causvid.kind": "stage",
        "causvid.stage": stage,
        "causvid.output": output_uri,
        **{f"causvid.input.{dep}": uri for dep, uri in inputs.items()},
    }
    with mlflow.start_run(run_name=stage, nested=True, parent_run_id=parent_run_id, tags=redact(tags)) as run:
        mlflow.log_params(flatten({stage: dict(params)}))
        for dep, uri in inputs.items():
            log_dataset(uri, dep, context="input")
        yield run.info.run_id


def log_dataset(uri: str, name: str, context: str, fingerprint: str | None = None) -> None:
    """Register a stage output as an MLflow dataset (its lineage), without copying any data."""
    if fingerprint is None and storage.is_complete(uri):
        fingerprint = str(storage.read_manifest(uri).get("fingerprint", ""))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(uri)
    dataset = MetaDataset(source=source, name=name, digest=fingerprint or None)
    mlflow.log_input(dataset, context=context)


def log_stage_result(manifest: Mapping[str, Any]) -> None:
    """Counts, summary numbers, the manifest and the output dataset of a finished stage, into its run."""
    numbers = {f"count.{k}": float(v) for k, v in manifest.get("counts", {}).items() if isinstance(v, (int, float))}
    numbers.update({k: float(v) for k, v in manifest.get("summary", {}).items() if isinstance(v, (int, float))})
    numbers["stage_seconds"] = float(manifest["seconds"])
    mlflow.log_metrics(numbers)
    mlflow.set_tag("causvid.fingerprint", manifest["fingerprint"])
    mlflow.set_tags({f"causvid.code.{key}": str(value) for key, value in manifest.get("code", {}).items()})
    mlflow.log_dict(redact(dict(manifest)), "manifest.json")
    output = mlflow.get_run(mlflow.active_run().info.run_id).data.tags["causvid.output"]
    log_dataset(output, manifest["stage"], context="output", fingerprint=manifest["fingerprint"])


def log_to_run(tracking: str, run_id: str) -> MlflowClient:
    """A client for logging into an existing run from another process (a Ray worker)."""
    _set_tracking_uri_keeping_env(tracking)
    return MlflowClient(tracking_uri=tracking)


def log_file_artifact(tracking: str | None, run_id: str | None, file_uri: str, artifact_path: str) -> None:
    """Log one stored file (local or S3) as an artifact of an existing run; a later call replaces the same name."""
    if not (tracking and run_id):
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp, Path(file_uri).name)
        local.write_bytes(storage.read_bytes(file_uri))
        log_to_run(tracking, run_id).log_artifact(run_id, str(local), artifact_path)
