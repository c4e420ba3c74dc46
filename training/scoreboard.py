"""One table of every model's oracle scores: the teacher, the causal teacher, the ODE-init and the DMD students.

Each stage scores its own samples of the held-out prompts (``eval/alignment.json``, with a bootstrap interval over
prompts per attribute); this table puts them side by side and says which rows were scored like for like with the
DMD student (the same captions and the same number of latent frames), so that a gap in the table is never an
artefact of a shorter clip or other prompts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from infra import storage, tracking
from pipelines.oracle import ORACLE_KEYS
from pipelines.workflow import StageContext, plan

SCOREBOARD_MODELS = ("teacher", "causal_teacher", "ode_init", "dmd")
REFERENCE = "dmd"


def model_row(scores: Mapping[str, Any]) -> dict[str, Any]:
    """A model's row: prompts, latent frames, sampling steps, and per attribute its accuracy and interval."""
    row: dict[str, Any] = {k: scores.get(k) for k in ("prompts", "latent_frames", "steps")}
    for key in ORACLE_KEYS:
        row[f"{key}_accuracy"] = scores.get(f"{key}_accuracy")
        row[f"{key}_accuracy_interval"] = scores.get(f"{key}_accuracy_interval")
    return row


def scoreboard(outputs: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Rows by model name from each output's ``eval/alignment.json`` (models without one are left out); each row's
    ``comparable`` says whether it was scored on the DMD student's captions and latent frames."""
    scores = {}
    for name, uri in outputs.items():
        path = storage.join(uri, "eval", "alignment.json")
        if storage.exists(path):
            scores[name] = storage.read_json(path)
    reference = scores.get(REFERENCE)
    table = {}
    for name, found in scores.items():
        row = model_row(found)
        row["comparable"] = reference is not None and (
            found.get("captions") == reference.get("captions") and found.get("latent_frames") == reference.get("latent_frames")
        )
        table[name] = row
    return table


def summary_figures(table: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The table's accuracies and interval bounds as flat numbers (``scoreboard_<model>_<key>_accuracy[_low|_high]``)."""
    out: dict[str, float] = {}
    for name, row in table.items():
        for key in ORACLE_KEYS:
            accuracy, interval = row[f"{key}_accuracy"], row[f"{key}_accuracy_interval"]
            if accuracy is None:
                continue
            out[f"scoreboard_{name}_{key}_accuracy"] = accuracy
            if interval:
                out[f"scoreboard_{name}_{key}_accuracy_low"], out[f"scoreboard_{name}_{key}_accuracy_high"] = interval
    return out


def publish_scoreboard(ctx: StageContext) -> dict[str, float]:
    """The `dmd` stage's table of every model: ``eval/scoreboard.json``, logged to the stage's MLflow run; returns
    its flat figures for the summary."""
    the_plan = plan(ctx.config)
    outputs = {name: ctx.inputs.get(name) or the_plan.output_uri(name) for name in SCOREBOARD_MODELS[:-1]}
    table = scoreboard({**outputs, REFERENCE: ctx.output_uri})
    uri = ctx.output("eval", "scoreboard.json")
    storage.write_json(uri, table)
    tracking.log_file_artifact(tracking.tracking_uri(ctx.config), ctx.run_id, uri, "eval")
    return summary_figures(table)
