import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from pipelines.oracle import classify_motion, count_components, describe, detect_frames, score_video, summarize
from pipelines.shapes_world import ShapeClip, render, sample_clip
from pipelines.video import decode_video, encode_mp4
from tests.paths import REPO

ATTRIBUTES = ("background", "color", "shape", "motion")


def round_trip(clip: ShapeClip, seconds: float = 3.0) -> np.ndarray:
    return decode_video(encode_mp4(render(clip, 64, 12, seconds), 12))


def test_attribute_accuracy_on_mp4_round_trips() -> None:
    clips = [sample_clip(2024, i) for i in range(40)]
    correct: Counter[str] = Counter()
    split_frames = 0
    for clip in clips:
        det = detect_frames(round_trip(clip))
        found = summarize(det)
        correct.update(a for a in ATTRIBUTES if found[a] == getattr(clip, a))
        assert found["present"] == 1.0
        split_frames += int((det.present & ~det.persistent).sum())
    accuracy = {a: correct[a] / len(clips) for a in ATTRIBUTES}
    assert min(accuracy.values()) >= 0.98, accuracy
    # An edge row drawn at half coverage sits on the mask's threshold; after yuv420p it can fall under it and cut
    # the object in two for a frame: 2 of these 1,440 frames (one triangle) with the encoder's settings.
    assert split_frames <= 2, split_frames


def test_score_per_second() -> None:
    clip = ShapeClip("diamond", "orange", "gray", "circling counter-clockwise", 1.7, 0.4)
    frames = round_trip(clip, 5.0)
    rows = score_video(frames, 12, clip.attributes())
    assert [r["second"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["color_ok"] and r["shape_ok"] and r["motion_ok"] and r["background_ok"] for r in rows)
    assert all(r["present"] == 1.0 and r["persistence"] == 1.0 and r["crispness"] > 0.4 for r in rows)
    wrong = score_video(frames, 12, {**clip.attributes(), "color": "blue", "motion": "circling clockwise"})
    assert not any(r["color_ok"] or r["motion_ok"] for r in wrong)


TIED_COLOURS = """
import numpy as np
from pipelines.oracle import describe
from pipelines.shapes_world import ShapeClip, render

red = render(ShapeClip("square", "red", "black", "bouncing left and right", 1.5, 0.0), 64, 12, 8 / 12)
blue = render(ShapeClip("square", "blue", "black", "bouncing left and right", 1.5, 0.0), 64, 12, 8 / 12)
print(describe(np.concatenate([red[:4], blue[4:]]))["color"])
"""


def test_a_tied_majority_reads_the_same_in_every_process() -> None:
    """Half the frames red, half blue: the reading is the first seen, whatever the process's string-hash seed
    (Ray workers and the driver score the same video)."""
    readings = {
        subprocess.run(
            [sys.executable, "-c", TIED_COLOURS], cwd=REPO, capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout.strip()
        for seed in range(6)
    }
    assert readings == {"red"}


def box_blur(frames: np.ndarray, radius: int) -> np.ndarray:
    out = frames.astype(np.float32)
    for axis in (1, 2):
        out = sum(np.roll(out, k, axis=axis) for k in range(-radius, radius + 1)) / (2 * radius + 1)
    return out.round().astype(np.uint8)


def test_crispness_drops_with_blur() -> None:
    frames = round_trip(ShapeClip("square", "yellow", "dark blue", "bouncing up and down", 1.2, 0.0))
    sharp = describe(frames)["crispness"]
    blurred = describe(box_blur(frames, 1))["crispness"]
    very = describe(box_blur(frames, 2))["crispness"]
    assert sharp > 0.45 and very < blurred < 0.75 * sharp


def test_persistence_absence_and_split() -> None:
    clip = ShapeClip("circle", "green", "black", "bouncing left and right", 1.5, 0.0)
    frames = render(clip, 64, 12, 1.0)
    frames[3] = frames[3, 0, 0]  # object gone
    frames[5, :, 30:34] = frames[5, 0, 0]  # a black bar cuts the object in two...
    frames[5, 20:44, 10:54] = frames[5, 0, 0]
    frames[5, 28:36, 14:22] = (30, 200, 50)  # ...and two pieces are left
    frames[5, 28:36, 40:48] = (30, 200, 50)
    det = detect_frames(frames)
    assert not det.present[3] and det.components[3] == 0
    assert det.components[5] == 2 and not det.persistent[5]
    assert det.persistent[[0, 1, 2, 4, 6]].all()


def flood_count(mask: np.ndarray, min_pixels: int = 3) -> int:
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        count += size >= min_pixels
    return count


def test_connected_components_match_flood_fill() -> None:
    masks = np.random.default_rng(0).random((12, 24, 31)) > 0.55
    assert count_components(masks).tolist() == [flood_count(m) for m in masks]


@pytest.mark.parametrize(
    ("motion", "track"),
    [
        ("bouncing left and right", lambda t: (10 + 30 * np.abs(np.sin(t)), 32 + 0 * t)),
        ("bouncing up and down", lambda t: (20 + 0 * t, 10 + 30 * np.abs(np.sin(t)))),
        ("bouncing diagonally", lambda t: (10 + 20 * np.abs(np.sin(t)), 12 + 20 * np.abs(np.sin(t)))),
        ("circling clockwise", lambda t: (32 + 10 * np.cos(t), 32 + 10 * np.sin(t))),
        ("circling counter-clockwise", lambda t: (32 + 10 * np.cos(t), 32 - 10 * np.sin(t))),
        ("static", lambda t: (32 + 0.1 * np.sin(t), 32 + 0 * t)),
    ],
)
def test_motion_from_track(motion: str, track) -> None:
    t = np.linspace(0, np.pi, 13)
    assert classify_motion(np.stack(track(t), axis=-1)) == motion
