"""Each metric against constructed videos whose answer is known."""

import dataclasses

import numpy as np
import pytest

from evaluation import metrics
from pipelines.oracle import score_video
from pipelines.shapes_world import ShapeClip, render

FPS = 12
CLIP = ShapeClip("circle", "red", "dark blue", "bouncing left and right", period=1.5, phase=0.25)


def test_static_video_is_steady_and_not_dynamic() -> None:
    frames = np.repeat(render(CLIP, seconds=1 / FPS), 5 * FPS, axis=0)
    assert metrics.temporal_flickering(frames, FPS) == [1.0] * 5
    assert metrics.motion_smoothness(frames, FPS) == [1.0] * 5
    assert metrics.dynamic_degree(frames, FPS) == [0.0] * 5
    assert metrics.color_drift(frames, FPS) == [0.0] * 5


def test_flickering_video_scores_low_and_moving_video_scores_high() -> None:
    flicker = np.zeros((3 * FPS, 16, 16, 3), np.uint8)
    flicker[1::2] = 255
    assert metrics.temporal_flickering(flicker, FPS) == pytest.approx([0.0] * 3)
    assert metrics.motion_smoothness(flicker, FPS) == pytest.approx([0.0] * 3)
    moving = render(CLIP, seconds=3)
    assert all(0.97 < v < 1.0 for v in metrics.temporal_flickering(moving, FPS))
    assert all(v > 0.98 for v in metrics.motion_smoothness(moving, FPS))
    # the object sits still for one frame pair at each bounce (every 0.75 s): 1 or 2 pairs in 11 per second
    assert metrics.dynamic_degree(moving, FPS) == pytest.approx([10 / 11, 9 / 11, 10 / 11])


def test_blurred_video_is_less_sharp() -> None:
    sharp = render(CLIP, seconds=2).astype(np.float32)
    blurred = sharp.copy()
    for axis in (1, 2):
        blurred = (np.roll(blurred, 1, axis) + blurred + np.roll(blurred, -1, axis)) / 3
    sharp_scores = metrics.sharpness(sharp.astype(np.uint8), FPS)
    blurred_scores = metrics.sharpness(np.rint(blurred).astype(np.uint8), FPS)
    assert all(b < 0.5 * s for s, b in zip(sharp_scores, blurred_scores, strict=True))


def test_object_that_changes_colour_at_10_s() -> None:
    first = render(CLIP, seconds=10)
    second = render(dataclasses.replace(CLIP, color="yellow"), seconds=20)[10 * FPS :]
    video = np.concatenate([first, second])
    rows = score_video(video, FPS, CLIP.attributes())
    assert [row["color_ok"] for row in rows] == [True] * 10 + [False] * 10
    assert all(row["shape_ok"] and row["background_ok"] for row in rows)
    drift = metrics.color_drift(video, FPS)
    assert max(drift[:10]) < 0.01 < min(drift[10:])
    assert metrics.temporal_flickering(video, FPS)[10] == pytest.approx(metrics.temporal_flickering(video, FPS)[9], abs=0.01)


def test_partial_seconds_are_dropped() -> None:
    frames = render(CLIP, seconds=2.5)
    assert all(len(values) == 2 for values in metrics.weight_free_metrics(frames, FPS).values())


def test_clip_scores_are_per_second_and_consistency_follows_the_first_frame() -> None:
    """Mechanics only: an untrained open_clip model (the stage refuses to score without real weights)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    scorer = metrics.ClipScorer(model, preprocess, open_clip.get_tokenizer("ViT-B-32"))
    steady = np.repeat(render(CLIP, seconds=1.0)[:1], 3 * FPS, axis=0)
    out = scorer.per_second(steady, FPS, CLIP.caption)
    assert out["clip_first_frame_consistency"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)
    assert len(out["clip_text_alignment"]) == 3 and len(set(np.round(out["clip_text_alignment"], 5))) == 1
    changed = steady.copy()
    changed[2 * FPS :] = 255 - changed[2 * FPS :]
    after = scorer.per_second(changed, FPS, CLIP.caption)["clip_first_frame_consistency"]
    assert after[:2] == pytest.approx([1.0, 1.0], abs=1e-4) and after[2] < 0.99
