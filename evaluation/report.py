"""What `causvid report` and `causvid dashboard` read: finished evaluations, from storage and from MLflow."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run

from evaluation import drift
from infra import storage, tracking
from infra.config import PipelineConfig
from infra.errors import UserError
from infra.storage import IncompleteOutputError


def latest_evaluation(config: PipelineConfig) -> str:
    """The complete `evaluate` output under the storage root that finished last."""
    base = storage.join(storage.normalize(config.storage.root), "evaluate")
    finished = [uri for uri in (storage.list_dirs(base) if storage.exists(base) else []) if storage.is_complete(uri)]
    if not finished:
        raise IncompleteOutputError(f"no finished evaluation under {base}; run `causvid run` or `causvid stage evaluate` first")
    return max(finished, key=lambda uri: storage.read_manifest(uri)["finished_at"])


def latest_summary(config: PipelineConfig) -> dict[str, Any]:
    """`summary.json` of the latest evaluation: ``{"models": {name: {metric: value, "drift_ratio": {...}}}}``."""
    return storage.read_json(storage.join(latest_evaluation(config), "summary.json"))


def evaluation_runs(config: PipelineConfig, run_ids: Sequence[str] = (), limit: int = 5) -> list[Run]:
    """The given evaluation runs, or the latest ``limit`` finished ones of the config's experiment."""
    experiment_id = tracking.configure(config)
    client = mlflow.MlflowClient()
    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                run = client.get_run(run_id)
            except mlflow.exceptions.MlflowException:
                raise UserError(f"run '{run_id}' is not in {tracking.tracking_uri(config)}") from None
            if run.data.tags.get("causvid.stage") != "evaluate":
                raise UserError(f"run '{run_id}' is not an evaluation run (its stage is {run.data.tags.get('causvid.stage')})")
            runs.append(run)
        return runs
    runs = client.search_runs(
        [experiment_id],
        filter_string="tags.`causvid.stage` = 'evaluate' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=limit,
    )
    if not runs:
        raise IncompleteOutputError(f"no finished evaluation run in {tracking.tracking_uri(config)}; run `causvid run` first")
    return runs


def write_dashboard(config: PipelineConfig, out: Path, run_ids: Sequence[str] = (), videos_per_model: int = 2) -> Path:
    """The static HTML report comparing evaluation runs, built from their MLflow artifacts."""
    evaluations = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in evaluation_runs(config, run_ids):
            run_id = run.info.run_id
            local = Path(tmp) / run_id
            summary = drift.load_summary(
                Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="summary.json", dst_path=str(local)))
            )
            plots = sorted(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="plots", dst_path=str(local))).glob("*.png"))
            videos = []
            for model in summary.get("models", {}):
                for index in range(videos_per_model):
                    name = f"videos/{model}_{index:03d}.mp4"
                    try:
                        videos.append(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=str(local))))
                    except (OSError, mlflow.exceptions.MlflowException):
                        break
            started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(run.info.start_time / 1000))
            name = f"evaluation {run_id[:8]}, {started}, output {run.data.tags.get('causvid.output', '?')}"
            evaluations.append({"name": name, "summary": summary, "plots": plots, "videos": videos})
        return drift.write_dashboard(evaluations, out)
