"""`causvid sweep`: ablation rows of the workflow, one table of their scores (the paper's Table 4) and one plot per
metric of their long rollouts (its Figure 8).

A sweep file names a base config, overrides shared by every row and the rows, each a list of ``--set``
overrides (see ``configs/sweep_table4.yaml``). Rows share every upstream output whose fingerprint they share, so
the teachers, trajectories and ODE initialisation are computed once; per row only `dmd` runs, then `evaluate` on
that row's student alone. The many-step teachers' rollouts are rendered once, by the base config's `evaluate`.

Each row holds the oracle's accuracies on the held-out prompts (the stage's own scoring, with its bootstrap
interval over prompts) and, from the row's rollouts, the temporal and frame quality groups and the drift ratio
(last 5 s over first 5 s) of shape and colour accuracy.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from evaluation import drift
from infra import storage
from infra.cluster import ensure_ray
from infra.config import ConfigError, PipelineConfig, load_config
from pipelines.oracle import ORACLE_KEYS
from pipelines.workflow import plan, run_stages, select_stages
from training.scoreboard import model_row

TABLE_KEYS = tuple(f"oracle_{key}_accuracy" for key in ORACLE_KEYS)
ROLLOUT_KEYS = ("persistence", "temporal_quality", "frame_quality", "shape_drift", "color_drift")
"""Rollout figures: the drift keys are the last-5-s over first-5-s ratios of shape and colour accuracy."""
MANY_STEP = {"teacher": "teacher", "causal_teacher": "causal_teacher"}
"""The many-step rows: `evaluate.models` name -> the stage whose output holds the model."""
STUDENT = "dmd_student"
NO_APPLICATIONS = "evaluate.applications=false"


def run_sweep(
    sweep_path: str, config_path: str | None, overrides: Sequence[str], start: str | None = None
) -> list[dict[str, Any]]:
    """Run every row of a sweep file through `evaluate` (from stage ``start`` on, when the stages before it are
    already complete): the many-step teachers' rows, then one row per sweep row.

    The table goes to ``<root>/sweeps/<name>.json`` and ``<name>.md``, the rollouts' mean per-second curves of every
    row to ``<name>/per_second.json`` and one plot per metric to ``<name>/plots/``.
    """
    sweep, configs, reference = sweep_configs(sweep_path, config_path, overrides)
    rows, curves = [], {}
    for row, config in configs:
        ensure_ray(config)
        outputs = run_stages(config, select_stages(config, start=start, until="evaluate"), parent_run_name=f"sweep:{row['name']}")
        entry, curves[row["name"]] = _row(row["name"], row.get("set", []), outputs["dmd"], outputs["evaluate"], STUDENT)
        rows.append(entry)
    ensure_ray(reference)
    evaluation = run_stages(reference, select_stages(reference, start=start, until="evaluate"), parent_run_name="sweep:many-step")
    the_plan = plan(reference)
    many_step = []
    for model, stage in MANY_STEP.items():
        name = f"{model} (many-step)"
        entry, curves[name] = _row(name, [], the_plan.output_uri(stage), evaluation["evaluate"], model)
        many_step.append(entry)
    rows = many_step + rows
    _publish(reference, sweep.get("name", "sweep"), rows, {row["name"]: curves[row["name"]] for row in rows})
    return rows


def sweep_configs(
    sweep_path: str, config_path: str | None, overrides: Sequence[str]
) -> tuple[dict[str, Any], list[tuple[dict[str, Any], PipelineConfig]], PipelineConfig]:
    """The sweep file, each row with its config (its student evaluated alone) and the many-step teachers' config;
    a missing file or a bad override is a one-line ``ConfigError``."""
    if not Path(sweep_path).is_file():
        raise ConfigError(f"sweep file not found: {sweep_path} (pass an existing YAML file, e.g. configs/sweep_table4.yaml)")
    sweep = yaml.safe_load(Path(sweep_path).read_text())
    base = config_path or sweep.get("config")
    shared = [*sweep.get("set", []), *overrides]
    configs = [
        (row, load_config(base, [*shared, *row.get("set", []), f"evaluate.models=[{STUDENT}]", NO_APPLICATIONS]))
        for row in sweep["rows"]
    ]
    reference = load_config(base, [*shared, f"evaluate.models=[{','.join(MANY_STEP)}]", NO_APPLICATIONS])
    return sweep, configs, reference


def _row(name: str, sets: list[str], model_uri: str, evaluation_uri: str, model: str) -> tuple[dict[str, Any], dict]:
    """A table row (oracle accuracies with intervals from the model's own scoring, rollout figures from the
    evaluation) and the model's per-second rollout curves."""
    alignment_uri = storage.join(model_uri, "eval", "alignment.json")
    scores = model_row(storage.read_json(alignment_uri)) if storage.exists(alignment_uri) else model_row({})
    summary = storage.read_json(storage.join(evaluation_uri, "summary.json"))["models"][model]
    groups = drift.summary_rows({model: summary})[0]
    rollout = {
        "persistence": summary.get("persistence"),
        "temporal_quality": groups["temporal quality"],
        "frame_quality": groups["frame quality"],
        "shape_drift": summary["drift_ratio"].get("shape_acc"),
        "color_drift": summary["drift_ratio"].get("color_acc"),
    }
    row = {"name": name, "set": sets, "output": model_uri, "evaluation": evaluation_uri}
    row.update({f"oracle_{k}": v for k, v in scores.items()})
    row.update(rollout)
    per_second = storage.read_json(storage.join(evaluation_uri, "per_second.json"))[model]
    return row, per_second


def _publish(config: PipelineConfig, name: str, rows: list[dict[str, Any]], curves: Mapping[str, Any]) -> None:
    out = storage.join(storage.normalize(config.storage.root), "sweeps")
    storage.write_json(storage.join(out, f"{name}.json"), rows)
    storage.write_bytes(storage.join(out, f"{name}.md"), (markdown_table(rows) + "\n").encode())
    storage.write_json(storage.join(out, name, "per_second.json"), curves)
    with tempfile.TemporaryDirectory() as tmp:
        for plot in drift.plot_all(curves, Path(tmp)):
            storage.upload_file(plot, storage.join(out, name, "plots", plot.name))


def _cell(value: Any, interval: Sequence[float] | None = None) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.3f}" + (f" ({interval[0]:.2f}-{interval[1]:.2f})" if interval else "")


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a Markdown table (the evaluation's table writer): oracle accuracies with their 95 % intervals,
    then the rollout figures."""
    cells = [
        {
            "row": row["name"],
            **{k.split("_")[1]: _cell(row.get(k), row.get(f"{k}_interval")) for k in TABLE_KEYS},
            **{k.replace("_", " "): _cell(row.get(k)) for k in ROLLOUT_KEYS},
        }
        for row in rows
    ]
    return drift.markdown_table(cells)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a fixed-width text table: one column per oracle attribute, then the rollout figures."""
    header = f"{'row':58s} " + " ".join(f"{k.split('_')[1]:>10s}" for k in TABLE_KEYS) + " " + " ".join(
        f"{k:>16s}" for k in ROLLOUT_KEYS
    )
    lines = [header]
    for row in rows:
        cells = " ".join(f"{row[k]:10.3f}" if isinstance(row.get(k), (int, float)) else f"{'-':>10s}" for k in TABLE_KEYS)
        rollout = " ".join(f"{row[k]:16.3f}" if isinstance(row.get(k), (int, float)) else f"{'-':>16s}" for k in ROLLOUT_KEYS)
        lines.append(f"{row['name'][:58]:58s} {cells} {rollout}")
    return "\n".join(lines)
