"""`causvid sweep`: the table of a sweep's rows, and one-line errors before anything runs."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from infra import storage
from infra.cli import main
from pipelines.oracle import ORACLE_KEYS, bootstrap_interval
from pipelines.shapes_world import heldout_prompts
from tests.paths import REPO
from tests.world import FAST
from pipelines.workflow import plan
from training.sweep import (
    DIFFERENCE_KEYS,
    ROLLOUT_KEYS,
    TABLE_KEYS,
    add_paired_differences,
    format_table,
    markdown_table,
    prompt_hits,
    run_sweep,
    sweep_configs,
)

CONFIGS = REPO / "configs"
TABLE4 = str(CONFIGS / "sweep_table4.yaml")


@pytest.mark.parametrize("sweep_file", sorted(p.name for p in CONFIGS.glob("sweep_*.yaml")))
def test_every_shipped_sweep_shares_its_teachers_and_runs_a_distinct_dmd_per_row(
    sweep_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(CONFIGS.parent)
    _, configs, reference = sweep_configs(str(CONFIGS / sweep_file), None, [f"storage.root={tmp_path}"])
    shared = plan(reference).fingerprints
    dmd = [plan(config).fingerprints["dmd"] for _, config in configs]
    assert len(set(dmd)) == len(configs) >= 2, "two rows would train the same student"
    for _, config in configs:
        fingerprints = plan(config).fingerprints
        assert all(fingerprints[s] == shared[s] for s in ("vae", "teacher", "causal_teacher", "trajectories", "ode_init"))
        assert config.evaluate.models == ["dmd_student"] and not config.evaluate.applications


def test_table_has_a_column_per_oracle_attribute_and_rollout_figure_and_dashes_for_missing_scores() -> None:
    rows = [
        {"name": "few-step, DMD", **dict.fromkeys(TABLE_KEYS, 0.25), **dict.fromkeys(ROLLOUT_KEYS, 0.5),
         "oracle_shape_accuracy_interval": [0.125, 0.375]},
        {"name": "teacher (many-step)", **dict.fromkeys(TABLE_KEYS), "oracle_color_accuracy": 1.0},
    ]
    header, dmd, teacher = format_table(rows).splitlines()
    assert header.split() == ["row", "color", "shape", "motion", "background", *ROLLOUT_KEYS]
    assert dmd.split()[-9:] == ["0.250"] * 4 + ["0.500"] * 5
    assert teacher.split()[-9:] == ["1.000"] + ["-"] * 8
    _, _, dmd_md, teacher_md = markdown_table(rows).splitlines()
    assert dmd_md.split(" | ")[1:4] == ["0.250", "0.250 (0.12-0.38)", "0.250"]
    assert teacher_md.split(" | ")[1:3] == ["1.000", "-"]


def _alignment(prompts: list[dict], wrong: dict[int, dict[str, str]]) -> dict:
    """An oracle scoring of ``prompts`` that reads every attribute right except ``wrong[prompt index]``."""
    detected = [{**{k: p[k] for k in ORACLE_KEYS}, **wrong.get(i, {})} for i, p in enumerate(prompts)]
    return {"captions": [p["caption"] for p in prompts], "detected": detected}


def test_paired_differences_count_each_prompt_once_against_the_reference_row() -> None:
    prompts = heldout_prompts(8)
    alignments = {
        "reference": _alignment(prompts, {0: {"shape": "blob"}, 3: {"shape": "blob"}, 5: {"motion": "still"}}),
        "better": _alignment(prompts, {5: {"motion": "still"}, 6: {"color": "beige"}}),
        "other prompts": _alignment(heldout_prompts(9)[1:], {}),
        "shorter clips": {**_alignment(prompts, {}), "latent_frames": 3},
    }
    assert prompt_hits(alignments["reference"])["shape"].tolist() == [0, 1, 1, 0, 1, 1, 1, 1]
    assert prompt_hits({"captions": ["a cat on a sofa"], "detected": [{}]}) == {}
    rows = [{"name": name} for name in alignments]
    add_paired_differences(rows, alignments, "reference")
    reference, better, other, shorter = rows
    assert [reference[k] for k in DIFFERENCE_KEYS] == [0.0] * 4
    assert reference["oracle_shape_difference_interval"] == [0.0, 0.0]
    assert (better["oracle_shape_difference"], better["oracle_color_difference"], better["oracle_motion_difference"]) == (
        0.25, -0.125, 0.0
    )
    assert better["oracle_shape_difference_interval"] == bootstrap_interval(np.array([1.0, 0, 0, 1, 0, 0, 0, 0]))
    low, high = better["oracle_shape_difference_interval"]
    assert 0.0 <= low < 0.25 < high <= 0.5
    assert all(row[k] is None and row[f"{k}_interval"] is None for row in (other, shorter) for k in DIFFERENCE_KEYS)
    assert {row["reference"] for row in rows} == {"reference"}


def test_tables_add_the_paired_differences_to_the_reference_row() -> None:
    rows = [
        {"name": "CausVid", **dict.fromkeys(TABLE_KEYS, 0.5), **dict.fromkeys(DIFFERENCE_KEYS, 0.0),
         **{f"{k}_interval": [0.0, 0.0] for k in DIFFERENCE_KEYS}, "reference": "CausVid"},
        {"name": "no ODE init", **dict.fromkeys(TABLE_KEYS, 0.25), **dict.fromkeys(DIFFERENCE_KEYS, -0.25),
         **{f"{k}_interval": [-0.375, -0.125] for k in DIFFERENCE_KEYS}, "oracle_motion_difference": None,
         "reference": "CausVid"},
    ]
    lines = markdown_table(rows).splitlines()
    assert lines[5] == 'Paired difference to "CausVid" on the same prompts (95 % bootstrap interval over prompts):'
    assert lines[7].split(" | ")[0] == "| row" and lines[7].split(" | ")[1:] == ["color", "shape", "motion", "background |"]
    assert lines[10].split(" | ")[1:] == ["-0.250 (-0.38..-0.12)", "-0.250 (-0.38..-0.12)", "-", "-0.250 (-0.38..-0.12) |"]
    text = format_table(rows).splitlines()
    assert text[4] == "paired difference to: CausVid"
    assert text[6].split()[1:3] == ["+0.000", "(+0.00..+0.00)"] and text[7].split()[-2:] == ["-0.250", "(-0.38..-0.12)"]


@pytest.mark.parametrize("case", ["missing", "bad-row", "bad-reference"])
def test_cli_sweep_mistakes_are_one_line_errors(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "sweep.yaml"
    if case == "bad-row":
        sweep.write_text("name: t\nrows:\n  - name: typo\n    set: [dmd.teacher=teachr]\n")
    if case == "bad-reference":
        sweep.write_text("name: t\nreference: CausVid\nrows:\n  - name: causvid\n    set: []\n")
    assert main(["sweep", str(sweep), "--set", f"storage.root={tmp_path / 'root'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("causvid: error: "), err
    expected = {"missing": "sweep file not found", "bad-row": "dmd.teacher", "bad-reference": "'CausVid' is not a row"}
    assert expected[case] in err


@pytest.mark.usefixtures("ray_local")
def test_table4_sweep_on_the_tiny_world_writes_every_row(world, world_root: Path, tmp_path: Path) -> None:
    """Micro settings: the rows share the world's teachers, trajectories and ODE init; `dmd` and the student's
    `evaluate` run per row, the teachers' `evaluate` once."""
    world()
    sweep = yaml.safe_load(Path(TABLE4).read_text())
    del sweep["config"]  # the world is built on the embedded default
    sweep_file = tmp_path / "table4.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep))
    # two scored prompts per student, so each row has its paired difference to the CausVid row
    rows = run_sweep(str(sweep_file), None, [f"storage.root={world_root}", *FAST, "dmd.eval_prompts=2"], start="trajectories")
    assert [row["name"] for row in rows] == [
        "teacher (many-step)",
        "causal_teacher (many-step)",
        "few-step, DMD bidirectional teacher, no ODE init",
        "few-step, ODE init only (no DMD)",
        "few-step, DMD causal teacher, ODE init",
        "few-step, DMD bidirectional teacher, ODE init (CausVid)",
        "few-step, DMD bidirectional teacher, ODE init, self-rollout (Self-Forcing)",
    ]
    students = [storage.read_manifest(row["output"])["summary"] for row in rows[2:]]
    assert [(s["teacher"], s["ode_init"], s.get("rollout")) for s in students] == [
        ("bidirectional", False, "data"),
        ("none", True, None),
        ("causal", True, "data"),
        ("bidirectional", True, "data"),
        ("bidirectional", True, "self"),
    ]
    assert len({row["output"] for row in rows}) == len(rows)
    # every student row is scored on its own rollouts, the many-step rows on one evaluation of both teachers
    evaluations = [row["evaluation"] for row in rows]
    assert evaluations[0] == evaluations[1] and len(set(evaluations[1:])) == len(rows) - 1
    for row, model in zip(rows, ["teacher", "causal_teacher", *["dmd_student"] * 5]):
        summary = storage.read_json(storage.join(row["evaluation"], "summary.json"))["models"]
        assert list(summary) == ([model] if model == "dmd_student" else ["causal_teacher", "teacher"])
        assert (row["persistence"], row["shape_drift"]) == (summary[model]["persistence"], summary[model]["drift_ratio"]["shape_acc"])
        assert row["shape_drift_interval"] == summary[model]["drift_ratio_interval"]["shape_acc"]
    sweeps = storage.join(storage.normalize(str(world_root)), "sweeps")
    assert storage.read_json(storage.join(sweeps, "table4.json")) == rows
    curves = storage.read_json(storage.join(sweeps, "table4", "per_second.json"))
    assert sorted(curves) == sorted(row["name"] for row in rows)
    assert all(len(c["shape_acc"]) == 2 for c in curves.values())  # evaluate.seconds=2: one value per second
    plots = {Path(name).name for name in storage.list_files(storage.join(sweeps, "table4", "plots"))}
    assert {"shape_acc.png", "color_acc.png", "crispness.png"} <= plots
    # the paired differences to the CausVid row: zero for itself, a figure for every student scored on its prompts
    causvid = rows[5]
    assert causvid["reference"] == causvid["name"] and [causvid[k] for k in DIFFERENCE_KEYS] == [0.0] * 4
    assert all(isinstance(row[k], float) for row in rows[2:] for k in DIFFERENCE_KEYS)
    assert len(format_table(rows).splitlines()) == 1 + len(rows) + 3 + len(rows)
    assert len(storage.read_bytes(storage.join(sweeps, "table4.md")).decode().splitlines()) == 2 + len(rows) + 5 + len(rows)
