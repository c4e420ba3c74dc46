"""The inference benchmark runs end to end on the tiny preset and reports its headline ratios."""

from __future__ import annotations

import json

from model import bench
from model.presets import get_preset


def test_benchmark_reports_every_figure() -> None:
    result = bench.main(["--teacher-steps", "2", "--seconds", "1", "2", "--reference-seconds", "1", "--threads", "1"])
    json.dumps(result)
    for key in ("latency_ratio", "throughput_ratio", "chunk_time_growth", "matmul_fraction"):
        assert result[key] > 0
    rollouts = result["student"]["rollouts"]
    assert set(rollouts) == {"1s", "2s"} and rollouts["2s"]["frames"] == 33
    assert len(result["reference_no_cache"]["chunk_seconds"]) == 2  # 1 s = 12 frames needs two chunks
    assert result["teacher"]["clip_frames"] == get_preset("tiny").clip_frames
    assert 0 < result["dit_forward"]["flops"] and result["dit_forward"]["matmul_flops_per_s"] > 0
