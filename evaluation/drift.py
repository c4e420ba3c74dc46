"""Quality drift over a long rollout: per-metric summaries, Figure-8-style plots, the summary table and
the static HTML dashboard.

A rollout's metrics are curves `{model: {metric: [value per second]}}`. Drift is summarised per metric
by the least-squares slope per second and by the ratio of the last 5 s mean to the first 5 s mean
(1.0 = no drift), with a bootstrap interval over the rollouts behind the mean curve: on a few prompts one
rollout's miss in a second moves an accuracy's ratio by several points.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

WINDOW_S = 5

TABLE_COLUMNS = {
    "temporal quality": ("temporal_flickering", "motion_smoothness", "persistence"),
    "frame quality": ("crispness", "sharpness"),
    "text alignment": ("color_acc", "shape_acc", "motion_acc"),
}


def slope(values: Sequence[float]) -> float:
    """Least-squares change per second; 0 for fewer than two points."""
    finite = [(i, v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if len(finite) < 2:
        return 0.0
    x, y = np.array(finite, dtype=np.float64).T
    return float(np.polyfit(x, y, 1)[0])


def window_ratio(values: Sequence[float], window: int = WINDOW_S) -> float | None:
    """Mean of the last `window` seconds over the mean of the first; None when undefined."""
    if len(values) < 2:
        return None
    window = min(window, len(values) // 2)
    first, last = float(np.mean(values[:window])), float(np.mean(values[-window:]))
    if abs(first) < 1e-12:
        return None if abs(last) > 1e-12 else 1.0
    return last / first


def ratio_interval(
    curves: Sequence[Sequence[float]], window: int = WINDOW_S, confidence: float = 0.95, seed: int = 0
) -> list[float] | None:
    """Percentile bootstrap interval over rollouts of :func:`window_ratio` of their mean curve (each curve cut to
    the shortest, as the mean is): rollouts are resampled whole, so a rollout's first and last seconds stay
    paired. Seeded; ``None`` where the ratio is (a first window that is zero on average and a last one that is
    not), for fewer than two rollouts, and where the resampled ratios are unbounded (resamples whose first
    window is all zeros: an accuracy that barely starts)."""
    from scipy.stats import bootstrap

    from pipelines.oracle import BOOTSTRAP_RESAMPLES

    length = min((len(c) for c in curves), default=0)
    if len(curves) < 2 or length < 2:
        return None
    data = np.array([list(c[:length]) for c in curves], dtype=np.float64)
    point = window_ratio(data.mean(axis=0), window)
    window = min(window, length // 2)
    first, last = data[:, :window].mean(axis=1), data[:, -window:].mean(axis=1)
    if point is None or abs(first.mean()) < 1e-12 or (np.all(first == first[0]) and np.all(last == last[0])):
        return None if point is None else [point, point]

    def ratio(f: np.ndarray, l: np.ndarray, axis: int = -1) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return l.mean(axis=axis) / f.mean(axis=axis)

    with np.errstate(invalid="ignore"):  # unbounded resamples: reported as no interval below
        result = bootstrap(
            (first, last), ratio, paired=True, vectorized=True, confidence_level=confidence,
            n_resamples=BOOTSTRAP_RESAMPLES, method="percentile", rng=np.random.default_rng(seed),
        )
    bounds = [float(result.confidence_interval.low), float(result.confidence_interval.high)]
    return bounds if all(math.isfinite(b) for b in bounds) else None


def summarize_curves(curves: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float | None]]:
    """Per metric: mean, slope per second and last/first window ratio."""
    return {
        metric: {"mean": float(np.mean(values)) if len(values) else None, "slope": slope(values), "ratio": window_ratio(values)}
        for metric, values in curves.items()
    }


def plot_metric(metric: str, curves: Mapping[str, Sequence[float]], path: Path) -> Path:
    """One metric over seconds of video, every model on one axis (the paper's Figure 8 layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6 + 0.2 * len(curves)), dpi=100)
    for model, values in curves.items():
        ax.plot(np.arange(len(values)) + 1, values, marker="o", markersize=3, label=model)
    ax.set_xlabel("second of video")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"{metric.replace('_', ' ')} over the rollout")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1, frameon=False)  # below: no curve hidden
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_all(per_second: Mapping[str, Mapping[str, Sequence[float]]], out_dir: Path) -> list[Path]:
    """per_second: {model: {metric: values}} -> one PNG per metric."""
    metrics = sorted({metric for curves in per_second.values() for metric in curves})
    return [
        plot_metric(metric, {model: curves[metric] for model, curves in per_second.items() if metric in curves}, out_dir / f"{metric}.png")
        for metric in metrics
    ]


def summary_rows(summary: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The paper's table columns from our metrics: one row per model, averaged within each group."""
    rows = []
    for model, values in summary.items():
        row: dict[str, Any] = {"model": model}
        for group, keys in TABLE_COLUMNS.items():
            present = [float(values[k]) for k in keys if isinstance(values.get(k), (int, float)) and k != "sharpness"]
            row[group] = float(np.mean(present)) if present else None
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[k]) for k in keys) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "–" if value is None else str(value)


def _html_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "<p>no rows</p>"
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k)))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def write_dashboard(evaluations: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """A self-contained HTML report: per evaluation run its summary table, drift table, plots and videos.

    Each evaluation is `{"name", "summary": summary.json content, "plots": [png paths], "videos": [mp4 paths]}`.
    """
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>CausVid drift dashboard</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}"
        "img{max-width:48%;margin:4px}video{width:192px;margin:4px;image-rendering:pixelated}</style></head><body>",
        "<h1>CausVid drift dashboard</h1>",
    ]
    for evaluation in evaluations:
        models = evaluation["summary"].get("models", {})
        parts.append(f"<h2>{html.escape(str(evaluation['name']))}</h2>")
        parts.append("<h3>Summary</h3>" + _html_table(summary_rows(models)))
        score_rows = [{"model": m, **{k: v for k, v in vals.items() if not isinstance(v, dict)}} for m, vals in models.items()]
        parts.append("<h3>Scores</h3>" + _html_table(score_rows))
        drift_rows = [{"model": m, **vals.get("drift_ratio", {})} for m, vals in models.items()]
        parts.append("<h3>Drift: last 5 s / first 5 s</h3>" + _html_table(drift_rows))
        parts.append("<h3>Curves</h3>")
        parts.extend(f"<img src='{_data_uri(Path(p), 'image/png')}' alt='{html.escape(Path(p).stem)}'>" for p in evaluation.get("plots", []))
        videos = evaluation.get("videos", [])
        if videos:
            parts.append("<h3>Rollouts</h3>")
            parts.extend(
                f"<figure style='display:inline-block'><video controls loop muted src='{_data_uri(Path(v), 'video/mp4')}'></video>"
                f"<figcaption>{html.escape(Path(v).stem)}</figcaption></figure>"
                for v in videos
            )
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


def load_summary(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
