from pathlib import Path

import numpy as np
import pytest

from evaluation import drift


def test_slope_and_window_ratio() -> None:
    rising = [1.0 + 0.1 * s for s in range(30)]
    assert drift.slope(rising) == pytest.approx(0.1)
    assert drift.window_ratio(rising) == pytest.approx(np.mean(rising[-5:]) / np.mean(rising[:5]))
    assert drift.window_ratio([0.5] * 30) == pytest.approx(1.0)
    assert drift.window_ratio([0.0] * 10) == 1.0
    assert drift.window_ratio([0.0] * 5 + [1.0] * 5) is None
    assert drift.window_ratio([2.0, 1.0]) == pytest.approx(0.5), "short rollouts use half their length"
    assert drift.slope([3.0]) == 0.0


def test_ratio_interval_resamples_whole_rollouts() -> None:
    # 16 rollouts of 30 s: 12 keep the object throughout, 4 lose it after 20 s -> mean curve's ratio 0.75
    kept, lost = [1.0] * 30, [1.0] * 20 + [0.0] * 10
    curves = [kept] * 12 + [lost] * 4
    mean_curve = np.mean(curves, axis=0)
    assert drift.window_ratio(mean_curve) == pytest.approx(0.75)
    # resampled, the lost count is Binomial(16, 1/4): its 2.5 and 97.5 % points are 1 and 8 -> ratios 15/16, 1/2
    low, high = drift.ratio_interval(curves)
    assert low == pytest.approx(0.5, abs=0.07) and high == pytest.approx(15 / 16, abs=0.07)
    # a drift every rollout shares is certain; the interval narrows as rollouts are added
    assert drift.ratio_interval([lost] * 8) == [0.0, 0.0]
    wide, narrow = drift.ratio_interval(curves), drift.ratio_interval(curves * 4)
    assert narrow[1] - narrow[0] < 0.6 * (wide[1] - wide[0])
    assert drift.ratio_interval(curves) == drift.ratio_interval(curves), "seeded"
    # cut to the shortest rollout, as the mean curve is; undefined for one rollout or a zero first window
    assert drift.ratio_interval([kept, lost[:25], kept]) == drift.ratio_interval([kept[:25], lost[:25], kept[:25]])
    assert drift.ratio_interval([lost]) is None
    assert drift.ratio_interval([[0.0] * 10] * 3) == [1.0, 1.0]
    assert drift.ratio_interval([[0.0] * 5 + [1.0] * 5] * 3) is None
    assert drift.ratio_interval([[0.0] * 5 + [1.0] * 5] * 3 + [[1.0] * 10]) is None, "a resample of the first three"


def test_summary_table_groups_the_papers_columns() -> None:
    summary = {"dmd_student": {"color_acc": 1.0, "shape_acc": 0.5, "motion_acc": 0.0, "temporal_flickering": 0.9,
                               "motion_smoothness": 0.7, "persistence": 0.8, "crispness": 0.6}}
    [row] = drift.summary_rows(summary)
    assert row == {"model": "dmd_student", "temporal quality": pytest.approx(0.8), "frame quality": pytest.approx(0.6),
                   "text alignment": pytest.approx(0.5)}
    table = drift.markdown_table([row])
    assert table.splitlines()[2] == "| dmd_student | 0.800 | 0.600 | 0.500 |"


def test_plots_and_dashboard(tmp_path: Path) -> None:
    per_second = {"teacher": {"sharpness": [5.0, 4.0, 3.0]}, "dmd_student": {"sharpness": [5.0, 5.0, 5.0]}}
    [plot] = drift.plot_all(per_second, tmp_path / "plots")
    assert plot.name == "sharpness.png" and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    video = tmp_path / "dmd_student_0.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    summary = {"models": {"dmd_student": {"color_acc": 0.75, "drift_ratio": {"sharpness": 1.0}}}}
    page = drift.write_dashboard([{"name": "eval-1", "summary": summary, "plots": [plot], "videos": [video]}],
                                 tmp_path / "report" / "index.html").read_text()
    assert "<h2>eval-1</h2>" in page and "<td>0.750</td>" in page
    assert page.count("data:image/png;base64,") == 1 and page.count("data:video/mp4;base64,") == 1
