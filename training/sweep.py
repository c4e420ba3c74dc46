"""`causvid sweep`: ablation rows of the workflow up to `dmd`, one table of their oracle accuracies (Table 4).

A sweep file names a base config, overrides shared by every row and the rows, each a list of ``--set``
overrides (see ``configs/sweep_table4.yaml``). Rows share every upstream output whose fingerprint they share, so
the teachers, trajectories and ODE initialisation are computed once and only `dmd` runs per row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from infra import storage
from infra.cluster import ensure_ray
from infra.config import ConfigError, load_config
from pipelines.oracle import ORACLE_KEYS
from pipelines.workflow import plan, run_stages, select_stages

TABLE_KEYS = tuple(f"oracle_{key}_accuracy" for key in ORACLE_KEYS)


def run_sweep(
    sweep_path: str, config_path: str | None, overrides: Sequence[str], start: str | None = None
) -> list[dict[str, Any]]:
    """Run every row of a sweep file up to `dmd` (from stage ``start`` on, when the stages before it are already
    complete): the many-step teachers' rows, then one result row each.

    The table is written to ``<root>/sweeps/<name>.json``.
    """
    if not Path(sweep_path).is_file():
        raise ConfigError(f"sweep file not found: {sweep_path} (pass an existing YAML file, e.g. configs/sweep_table4.yaml)")
    sweep = yaml.safe_load(Path(sweep_path).read_text())
    base = config_path or sweep.get("config")
    rows = []
    for row in sweep["rows"]:
        config = load_config(base, [*sweep.get("set", []), *row.get("set", []), *overrides])
        ensure_ray(config)
        outputs = run_stages(config, select_stages(config, start=start, until="dmd"), parent_run_name=f"sweep:{row['name']}")
        summary = storage.read_manifest(outputs["dmd"])["summary"]
        rows.append({"name": row["name"], "set": row.get("set", []), "output": outputs["dmd"], **{k: summary.get(k) for k in TABLE_KEYS}})
    many_step = []
    for name in ("teacher", "causal_teacher"):
        uri = plan(config).output_uri(name)
        summary = storage.read_manifest(uri)["summary"] if storage.is_complete(uri) else {}
        many_step.append({"name": f"{name} (many-step)", "set": [], "output": uri, **{k: summary.get(k) for k in TABLE_KEYS}})
    rows = many_step + rows
    root = config.storage.root
    storage.write_json(storage.join(storage.normalize(root), "sweeps", f"{sweep.get('name', 'sweep')}.json"), rows)
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a fixed-width text table, one column per oracle attribute."""
    header = f"{'row':58s} " + " ".join(f"{k.split('_')[1]:>10s}" for k in TABLE_KEYS)
    lines = [header]
    for row in rows:
        cells = " ".join(f"{row[k]:10.3f}" if isinstance(row[k], (int, float)) else f"{'-':>10s}" for k in TABLE_KEYS)
        lines.append(f"{row['name'][:58]:58s} {cells}")
    return "\n".join(lines)
