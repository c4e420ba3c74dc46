"""`causvid sweep`: the table of a sweep's rows, and one-line errors before anything runs."""

from pathlib import Path

import pytest
import yaml

from infra import storage
from infra.cli import main
from tests.world import FAST
from training.sweep import TABLE_KEYS, format_table, run_sweep

TABLE4 = str(Path(__file__).parents[2] / "configs" / "sweep_table4.yaml")


def test_table_has_a_column_per_oracle_attribute_and_dashes_for_missing_scores() -> None:
    rows = [
        {"name": "few-step, DMD", **dict.fromkeys(TABLE_KEYS, 0.25)},
        {"name": "teacher (many-step)", **dict.fromkeys(TABLE_KEYS), "oracle_color_accuracy": 1.0},
    ]
    header, dmd, teacher = format_table(rows).splitlines()
    assert header.split() == ["row", "color", "shape", "motion", "background"]
    assert dmd.split()[-4:] == ["0.250"] * 4
    assert teacher.split()[-4:] == ["1.000", "-", "-", "-"]


@pytest.mark.parametrize("case", ["missing", "bad-row"])
def test_cli_sweep_mistakes_are_one_line_errors(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "sweep.yaml"
    if case == "bad-row":
        sweep.write_text("name: t\nrows:\n  - name: typo\n    set: [dmd.teacher=teachr]\n")
    assert main(["sweep", str(sweep), "--set", f"storage.root={tmp_path / 'root'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("causvid: error: "), err
    assert ("sweep file not found" if case == "missing" else "dmd.teacher") in err


@pytest.mark.usefixtures("ray_local")
def test_table4_sweep_on_the_tiny_world_writes_every_row(world, world_root: Path, tmp_path: Path) -> None:
    """Micro settings: the rows share the world's teachers, trajectories and ODE init; `dmd` runs per row."""
    world()
    sweep = yaml.safe_load(Path(TABLE4).read_text())
    del sweep["config"]  # the world is built on the embedded default
    sweep_file = tmp_path / "table4.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep))
    rows = run_sweep(str(sweep_file), None, [f"storage.root={world_root}", *FAST], start="trajectories")
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
    assert storage.read_json(storage.join(storage.normalize(str(world_root)), "sweeps", "table4.json")) == rows
    assert len(format_table(rows).splitlines()) == 1 + len(rows)
