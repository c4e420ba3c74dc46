"""`causvid sweep`: ablation rows of the workflow, one table of their scores (the paper's Table 4) and one plot per
metric of their long rollouts (its Figure 8).

A sweep file names a base config, overrides shared by every row and the rows, each a list of ``--set``
overrides (see ``configs/sweep_table4.yaml``). Rows share every upstream output whose fingerprint they share, so
the teachers, trajectories and ODE initialisation are computed once; per row only `dmd` runs, then `evaluate` on
that row's student alone. The many-step teachers' rollouts are rendered once, by the base config's `evaluate`.

Each row holds the oracle's accuracies on the held-out prompts (the stage's own scoring, with its bootstrap
interval over prompts) and, from the row's rollouts, the temporal and frame quality groups and the drift ratio
(last 5 s over first 5 s) of shape and colour accuracy. A sweep file's ``reference`` names the row every other
row is compared with prompt by prompt: the paired difference of each accuracy and its bootstrap interval over
the same prompts, far tighter than two separate intervals, so an ordering of rows is a measured claim.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evaluation import drift
from infra import storage
from infra.cluster import ensure_ray
from infra.config import ConfigError, PipelineConfig, load_config
from pipelines.oracle import ORACLE_KEYS, bootstrap_interval
from pipelines.shapes_world import BACKGROUND_COLORS, MOTIONS, OBJECT_COLORS, SHAPES, ShapeClip
from pipelines.workflow import plan, run_stages, select_stages
from training.scoreboard import model_row

TABLE_KEYS = tuple(f"oracle_{key}_accuracy" for key in ORACLE_KEYS)
DIFFERENCE_KEYS = tuple(f"oracle_{key}_difference" for key in ORACLE_KEYS)
"""Paired differences to the sweep's reference row, one per oracle attribute."""
ROLLOUT_KEYS = ("persistence", "temporal_quality", "frame_quality", "shape_drift", "color_drift")
"""Rollout figures: the drift keys are the last-5-s over first-5-s ratios of shape and colour accuracy (each with
its bootstrap interval over the row's rollouts)."""
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
    rows, curves, alignments = [], {}, {}
    for row, config in configs:
        ensure_ray(config)
        outputs = run_stages(config, select_stages(config, start=start, until="evaluate"), parent_run_name=f"sweep:{row['name']}")
        name = row["name"]
        entry, curves[name], alignments[name] = _row(name, row.get("set", []), outputs["dmd"], outputs["evaluate"], STUDENT)
        rows.append(entry)
    ensure_ray(reference)
    evaluation = run_stages(reference, select_stages(reference, start=start, until="evaluate"), parent_run_name="sweep:many-step")
    the_plan = plan(reference)
    many_step = []
    for model, stage in MANY_STEP.items():
        name = f"{model} (many-step)"
        entry, curves[name], alignments[name] = _row(name, [], the_plan.output_uri(stage), evaluation["evaluate"], model)
        many_step.append(entry)
    rows = many_step + rows
    if sweep.get("reference"):
        add_paired_differences(rows, alignments, sweep["reference"])
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
    names = [row["name"] for row in sweep["rows"]]
    if sweep.get("reference") and sweep["reference"] not in names:
        raise ConfigError(f"sweep reference {sweep['reference']!r} is not a row of {sweep_path} (rows: {', '.join(names)})")
    base = config_path or sweep.get("config")
    shared = [*sweep.get("set", []), *overrides]
    configs = [
        (row, load_config(base, [*shared, *row.get("set", []), f"evaluate.models=[{STUDENT}]", NO_APPLICATIONS]))
        for row in sweep["rows"]
    ]
    reference = load_config(base, [*shared, f"evaluate.models=[{','.join(MANY_STEP)}]", NO_APPLICATIONS])
    return sweep, configs, reference


def _row(
    name: str, sets: list[str], model_uri: str, evaluation_uri: str, model: str
) -> tuple[dict[str, Any], dict, dict[str, Any]]:
    """A table row (oracle accuracies with intervals from the model's own scoring, rollout figures from the
    evaluation), the model's per-second rollout curves and its oracle scoring (empty when it has none)."""
    alignment_uri = storage.join(model_uri, "eval", "alignment.json")
    alignment = storage.read_json(alignment_uri) if storage.exists(alignment_uri) else {}
    scores = model_row(alignment)
    summary = storage.read_json(storage.join(evaluation_uri, "summary.json"))["models"][model]
    groups = drift.summary_rows({model: summary})[0]
    rollout = {
        "persistence": summary.get("persistence"),
        "temporal_quality": groups["temporal quality"],
        "frame_quality": groups["frame quality"],
        "shape_drift": summary["drift_ratio"].get("shape_acc"),
        "shape_drift_interval": summary.get("drift_ratio_interval", {}).get("shape_acc"),
        "color_drift": summary["drift_ratio"].get("color_acc"),
        "color_drift_interval": summary.get("drift_ratio_interval", {}).get("color_acc"),
    }
    row = {"name": name, "set": sets, "output": model_uri, "evaluation": evaluation_uri}
    row.update({f"oracle_{k}": v for k, v in scores.items()})
    row.update(rollout)
    per_second = storage.read_json(storage.join(evaluation_uri, "per_second.json"))[model]
    return row, per_second, alignment


@lru_cache(maxsize=1)
def _caption_attributes() -> dict[str, dict[str, str]]:
    """Every shapes-world caption -> the attributes it asks for."""
    return {
        ShapeClip(shape, color, background, motion, 0.0, 0.0).caption: {
            "shape": shape, "color": color, "background": background, "motion": motion
        }
        for shape, color, background, motion in itertools.product(SHAPES, OBJECT_COLORS, BACKGROUND_COLORS, MOTIONS)
    }


def prompt_hits(alignment: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Per oracle attribute, 1 or 0 per scored prompt: whether the oracle read what the caption asks for. Empty
    when the scoring holds no readings or a caption is not of the shapes world."""
    truth = _caption_attributes()
    captions, detected = alignment.get("captions", []), alignment.get("detected", [])
    if not captions or len(captions) != len(detected) or any(c not in truth for c in captions):
        return {}
    return {
        key: np.array([found[key] == truth[caption][key] for caption, found in zip(captions, detected)], np.float64)
        for key in ORACLE_KEYS
    }


def add_paired_differences(
    rows: Sequence[dict[str, Any]], alignments: Mapping[str, Mapping[str, Any]], reference: str
) -> None:
    """Per row and attribute, ``oracle_<key>_difference`` (row minus ``reference``, over the prompts both scored)
    and its percentile bootstrap interval over those prompts (``..._difference_interval``); ``None`` where the two
    were not scored on the same captions at the same clip length."""
    base = alignments[reference]
    base_hits = prompt_hits(base)
    for row in rows:
        found = alignments[row["name"]]
        alike = all(found.get(k) == base.get(k) for k in ("captions", "latent_frames"))
        hits = prompt_hits(found) if alike else {}
        for key in ORACLE_KEYS:
            difference = hits[key] - base_hits[key] if hits and base_hits else None
            row[f"oracle_{key}_difference"] = None if difference is None else float(difference.mean())
            row[f"oracle_{key}_difference_interval"] = None if difference is None else bootstrap_interval(difference)
        row["reference"] = reference


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


def _difference_cell(value: Any, interval: Sequence[float] | None) -> str:
    if not isinstance(value, (int, float)) or not interval:
        return "-"
    return f"{value:+.3f} ({interval[0]:+.2f}..{interval[1]:+.2f})"


def _differences(rows: Sequence[Mapping[str, Any]]) -> tuple[str | None, list[dict[str, str]]]:
    """The reference row's name and, per row, its formatted paired differences (no reference: ``None, []``)."""
    reference = next((row["reference"] for row in rows if row.get("reference")), None)
    if reference is None:
        return None, []
    cells = [
        {"row": row["name"], **{k.split("_")[1]: _difference_cell(row.get(k), row.get(f"{k}_interval")) for k in DIFFERENCE_KEYS}}
        for row in rows
    ]
    return reference, cells


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a Markdown table (the evaluation's table writer): oracle accuracies with their 95 % intervals,
    then the rollout figures; with a reference row, a second table of the paired differences to it."""
    cells = [
        {
            "row": row["name"],
            **{k.split("_")[1]: _cell(row.get(k), row.get(f"{k}_interval")) for k in TABLE_KEYS},
            **{k.replace("_", " "): _cell(row.get(k), row.get(f"{k}_interval")) for k in ROLLOUT_KEYS},
        }
        for row in rows
    ]
    table = drift.markdown_table(cells)
    reference, differences = _differences(rows)
    if reference is None:
        return table
    title = f"Paired difference to \"{reference}\" on the same prompts (95 % bootstrap interval over prompts):"
    return f"{table}\n\n{title}\n\n{drift.markdown_table(differences)}"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a fixed-width text table: one column per oracle attribute, then the rollout figures; with a
    reference row, a second block of the paired differences to it."""
    header = f"{'row':58s} " + " ".join(f"{k.split('_')[1]:>10s}" for k in TABLE_KEYS) + " " + " ".join(
        f"{k:>16s}" for k in ROLLOUT_KEYS
    )
    lines = [header]
    for row in rows:
        cells = " ".join(f"{row[k]:10.3f}" if isinstance(row.get(k), (int, float)) else f"{'-':>10s}" for k in TABLE_KEYS)
        rollout = " ".join(f"{row[k]:16.3f}" if isinstance(row.get(k), (int, float)) else f"{'-':>16s}" for k in ROLLOUT_KEYS)
        lines.append(f"{row['name'][:58]:58s} {cells} {rollout}")
    reference, differences = _differences(rows)
    if reference is not None:
        lines += ["", f"paired difference to: {reference}", f"{'row':58s} " + " ".join(f"{k.split('_')[1]:>22s}" for k in TABLE_KEYS)]
        for cell in differences:
            lines.append(f"{cell['row'][:58]:58s} " + " ".join(f"{v:>22s}" for k, v in cell.items() if k != "row"))
    return "\n".join(lines)
