"""The table of every model's oracle scores, with bootstrap intervals over prompts and a like-for-like flag."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from infra import storage
from pipelines.oracle import ORACLE_KEYS, bootstrap_interval, oracle_alignment
from training.scoreboard import scoreboard, summary_figures


def test_bootstrap_interval_is_seeded_and_brackets_the_mean() -> None:
    assert bootstrap_interval(np.array([1.0, 1.0, 0.0, 1.0])) == [0.25, 1.0]
    assert bootstrap_interval(np.array([1.0, 0, 0, 1, 0, 1, 1, 1])) == [0.25, 0.875]
    assert bootstrap_interval(np.ones(5)) == [1.0, 1.0]
    assert bootstrap_interval(np.array([0.0])) == [0.0, 0.0]


def test_oracle_alignment_carries_an_interval_per_attribute() -> None:
    black = np.zeros((2, 5, 32, 32, 3), np.uint8)
    prompts = [{"background": "black"}, {"background": "white"}]
    scores = oracle_alignment(black, prompts)
    assert scores["background_accuracy"] == 0.5
    assert scores["background_accuracy_interval"] == [0.0, 1.0]


def write_alignment(root: Path, name: str, captions: list[str], frames: int, color_hits: list[bool]) -> str:
    uri = str(root / name)
    scores = {"prompts": len(captions), "captions": captions, "latent_frames": frames, "steps": 4}
    hits = np.array(color_hits, dtype=np.float64)
    scores.update({"color_accuracy": float(hits.mean()), "color_accuracy_interval": bootstrap_interval(hits)})
    storage.write_json(storage.join(uri, "eval", "alignment.json"), scores)
    return uri


def test_scoreboard_puts_every_model_side_by_side_and_flags_other_clips(tmp_path: Path) -> None:
    captions = ["a red circle", "a blue square", "a green star", "a red square"]
    outputs = {
        "teacher": write_alignment(tmp_path, "teacher", captions, 3, [True] * 4),
        "causal_teacher": str(tmp_path / "never-scored"),
        "ode_init": write_alignment(tmp_path, "ode_init", captions, 9, [True, True, False, True]),
        "dmd": write_alignment(tmp_path, "dmd", captions, 9, [True, False, False, True]),
    }
    table = scoreboard(outputs)
    assert list(table) == ["teacher", "ode_init", "dmd"]
    assert [table[m]["comparable"] for m in table] == [False, True, True]
    assert table["ode_init"]["color_accuracy"] == 0.75 and table["ode_init"]["color_accuracy_interval"] == [0.25, 1.0]
    assert table["dmd"]["latent_frames"] == 9 and table["dmd"]["shape_accuracy"] is None
    assert set(table["dmd"]) == {"prompts", "latent_frames", "steps", "comparable"} | {
        f"{k}_accuracy{suffix}" for k in ORACLE_KEYS for suffix in ("", "_interval")
    }
    figures = summary_figures(table)
    assert figures["scoreboard_dmd_color_accuracy"] == 0.5
    assert figures["scoreboard_teacher_color_accuracy_low"] == figures["scoreboard_teacher_color_accuracy_high"] == 1.0
    assert len(figures) == 9
