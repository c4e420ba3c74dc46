"""The inference benchmark runs end to end on the tiny preset and reports its headline ratios."""

from __future__ import annotations

import json

from model import bench

# eager: compiling costs more than this run (the compiled networks' equivalence is tested in test_precision.py)
ARGS = ["--teacher-steps", "2", "--video-seconds", "1", "--long-seconds", "3", "--reference-seconds", "1", "--compile", "false"]


def test_benchmark_reports_every_figure() -> None:
    result = bench.main([*ARGS, "--repeats", "1", "--threads", "1"])
    json.dumps(result)
    for key in ("latency_ratio", "throughput_ratio", "chunk_time_growth", "matmul_fraction", "student_fps"):
        assert result[key] > 0
    assert 0 < result["vae_decode_fraction"] < 1
    # 1 s = 12 frames needs 2 chunks of 3 latent frames: 1 + 4 * 5 = 21 frames, the teacher's clip the same
    assert result["student"]["frames"] == result["teacher"]["frames"] == 21
    assert result["long_rollout"]["frames"] == 45 and len(result["reference_no_cache"]["chunk_seconds"]) == 2
    assert result["short_clip"]["teacher"]["frames"] == 33 and result["short_clip"]["latency_ratio"] > 0
    assert result["compiled"] is False and result["warmup_seconds"] > 0
    assert 0 < result["dit_forward"]["flops"] and result["dit_forward"]["matmul_flops_per_s"] > 0
