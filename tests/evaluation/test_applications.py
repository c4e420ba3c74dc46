"""Application figures: exact on constructed shapes-world videos, and the evaluate stage's applications section
end to end (Ray task, applications.json, MLflow) on the student that the micro pipeline trained."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

from evaluation.applications import (
    follow_curves,
    follow_summary,
    image_keeping,
    log_figures,
    recoloured,
    recolouring,
    run_applications,
    switched,
)
from evaluation.generate import Frames, timing
from infra import storage, tracking
from pipelines.shapes_world import ShapeClip, object_radius, render
from pipelines.workflow import StageContext

FPS = 12
CLIP = ShapeClip("circle", "red", "black", "bouncing left and right", 1.5, 0.2)


def test_follow_rate_is_one_from_the_switch_on_and_zero_before() -> None:
    new = switched(CLIP)
    assert (new.color, new.shape, new.motion) != (CLIP.color, CLIP.shape, CLIP.motion)
    switch = 2
    video = np.concatenate([render(CLIP, fps=FPS, seconds=5.0)[: switch * FPS], render(new, fps=FPS, seconds=5.0)[switch * FPS :]])
    after = follow_curves(video, FPS, switch, new.attributes(), CLIP.attributes())
    assert after == {"follow": [1.0] * 3, "color": [1.0] * 3, "shape": [1.0] * 3, "motion": [1.0] * 3, "old_color": [0.0] * 3}
    whole = follow_curves(video, FPS, 0, new.attributes(), CLIP.attributes())
    assert whole["follow"] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert whole["old_color"] == [1.0, 1.0, 0.0, 0.0, 0.0]
    halfway = follow_curves(video, FPS, 1.5, new.attributes(), CLIP.attributes())
    assert halfway["color"] == [0.5, 1.0, 1.0]
    assert follow_summary(whole) == {"follow_mean": 0.6, "seconds_to_follow": 2.0, "old_color_after_follow": 0.0}
    late = follow_summary({"follow": [0.0, 0.75, 0.25], "old_color": [1.0, 0.0, 0.5]})
    assert late == {"follow_mean": pytest.approx(1 / 3), "seconds_to_follow": 1.0, "old_color_after_follow": 0.5}
    never = follow_summary({"follow": [0.0, 0.25], "old_color": [1.0, 1.0]})
    assert never == {"follow_mean": 0.125, "seconds_to_follow": None, "old_color_after_follow": None}


def test_image_keeping_on_the_rendered_clip_and_a_recoloured_one() -> None:
    frames = render(CLIP, fps=FPS, seconds=2.0)
    kept = image_keeping(frames, FPS, frames[0], CLIP.attributes())
    assert kept["color_keep"] == kept["shape_keep"] == kept["present"] == 1.0
    assert kept["first_frame_error_px"] < 0.05
    speed = 2 * (64 - 2 * (1.6 * object_radius(64) + 1.0)) / CLIP.period / FPS  # bounce: two widths per period
    assert kept["next_frame_error_px"] == pytest.approx(speed, abs=0.3)
    assert kept["max_step_px"] == pytest.approx(speed, abs=0.3)
    other = image_keeping(render(recoloured(CLIP), fps=FPS, seconds=2.0), FPS, frames[0], CLIP.attributes())
    assert other["color_keep"] == 0.0 and other["shape_keep"] == 1.0 and other["first_frame_error_px"] < 0.05


def test_recolouring_measures_track_error_in_pixels_and_the_new_colour() -> None:
    source = render(CLIP, fps=FPS, seconds=2.0)
    target = recoloured(CLIP)
    good = recolouring(source, render(target, fps=FPS, seconds=2.0), target.color, target.shape)
    assert good["centroid_error_px"] < 0.05 and good["recolor_rate"] == good["shape_keep"] == good["tracked"] == 1.0
    unchanged = recolouring(source, source, target.color, target.shape)
    assert unchanged["recolor_rate"] == 0.0 and unchanged["centroid_error_px"] == 0.0
    shifted = np.roll(source, 3, axis=1)
    assert recolouring(source, shifted, CLIP.color, CLIP.shape)["centroid_error_px"] == pytest.approx(3.0, abs=0.05)


def test_timing_is_latency_to_the_first_frame_and_frames_per_wall_second() -> None:
    empty = np.zeros((0, 64, 64, 3), np.uint8)
    chunks = [
        Frames(0, 0, empty[:0], None, True, "a", 0.5),
        Frames(1, 0, np.zeros((9, 64, 64, 3), np.uint8), None, False, "a", 1.5),
        Frames(2, 9, np.zeros((12, 64, 64, 3), np.uint8), None, False, "a", 3.5),
    ]
    assert timing(chunks) == {"latency_s": 1.5, "fps": 6.0, "frames": 21.0}


def test_applications_figures_go_to_mlflow_with_curves_per_second(make_config) -> None:
    figures = {
        "prompts": 1,
        "dynamic_prompting": {"switch_second": 2.0, "follow": [0.25, 1.0]},
        "image_to_video": {"color_keep": 1.0, "first_frame_error_px": float("nan")},
        "speed": {"text_to_video": {"latency_s": 0.5, "fps": 20.0}},
    }
    config = make_config()
    tracking.configure(config)
    with mlflow.start_run() as run:
        log_figures(figures)
    client = mlflow.MlflowClient()
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics == {
        "applications/dynamic_prompting/switch_second": 2.0,
        "applications/dynamic_prompting/follow": 1.0,
        "applications/image_to_video/color_keep": 1.0,
        "applications/speed/text_to_video/latency_s": 0.5,
        "applications/speed/text_to_video/fps": 20.0,
    }
    history = client.get_metric_history(run.info.run_id, "applications/dynamic_prompting/follow")
    assert [(m.step, m.value) for m in history] == [(0, 0.25), (1, 1.0)]


def test_evaluate_applications_section_on_the_trained_student(
    trained_pipeline: dict[str, str], make_config, tmp_path: Path
) -> None:
    config = make_config("evaluate.applications_prompts=1", "evaluate.applications_seconds=2")
    output = str(tmp_path / "evaluate")
    inputs = {"dmd": trained_pipeline["dmd"], "vae": trained_pipeline["vae"]}
    ctx = StageContext("evaluate", config, inputs, output, "fp", "run")
    tracking.configure(config)
    with mlflow.start_run() as run:
        figures = run_applications(ctx)
    assert storage.read_json(storage.join(output, "applications.json")) == figures
    assert set(figures) >= {"dynamic_prompting", "image_to_video", "video_to_video", "speed"}
    for mode in ("text_to_video", "dynamic_prompting", "image_to_video", "video_to_video"):
        assert figures["speed"][mode]["latency_s"] > 0 and figures["speed"][mode]["fps"] > 0
        assert figures["speed"][mode]["frames"] == 24
    assert len(figures["dynamic_prompting"]["follow"]) == 1
    assert figures["dynamic_prompting"]["follow_mean"] == figures["dynamic_prompting"]["follow"][0]
    assert 0.0 <= figures["video_to_video"]["recolor_rate"] <= 1.0
    metrics = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
    assert metrics["applications/speed/video_to_video/fps"] == figures["speed"]["video_to_video"]["fps"]
