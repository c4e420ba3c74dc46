"""`causvid sweep`: the table of a sweep's rows, and one-line errors before anything runs."""

from pathlib import Path

import pytest

from infra.cli import main
from training.sweep import TABLE_KEYS, format_table


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
