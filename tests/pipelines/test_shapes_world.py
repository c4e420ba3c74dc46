import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipelines.shapes_world import (
    BACKGROUND_COLORS,
    MOTIONS,
    OBJECT_COLORS,
    SHAPES,
    ShapeClip,
    decode_video,
    encode_mp4,
    heldout_prompts,
    render,
    sample_clip,
    trajectory,
)

REPO = Path(__file__).resolve().parents[2]


def test_sampling_is_seeded_varied_and_independent() -> None:
    clips = [sample_clip(3, i) for i in range(400)]
    assert clips == [sample_clip(3, i) for i in range(400)]
    assert clips != [sample_clip(4, i) for i in range(400)]
    for name, values in (("shape", SHAPES), ("color", OBJECT_COLORS), ("background", BACKGROUND_COLORS), ("motion", MOTIONS)):
        drawn = [getattr(c, name) for c in clips]
        assert set(drawn) == set(values), f"every {name} appears"
    pairs = {(c.shape, c.motion) for c in clips}
    assert len(pairs) == len(SHAPES) * len(MOTIONS), "attributes are drawn independently"
    assert len({c.caption for c in clips}) > 300, "captions vary enough for text conditioning to matter"


def test_caption_says_everything() -> None:
    clip = ShapeClip("circle", "red", "dark blue", "circling clockwise", 1.5, 0.0)
    assert clip.caption == "a red circle circling clockwise on a dark blue background"


def test_heldout_prompts_are_disjoint_from_training() -> None:
    heldout = heldout_prompts(32, seed=0)
    assert heldout == heldout_prompts(32, seed=0)
    training = [sample_clip(0, i).attributes() for i in range(5000)]
    keys = ("shape", "color", "background", "motion", "period", "phase")
    assert not {tuple(p[k] for k in keys) for p in heldout} & {tuple(t[k] for k in keys) for t in training}
    assert all(p["caption"] == ShapeClip(**{k: p[k] for k in keys}).caption for p in heldout)


def test_motion_is_periodic_and_stays_inside_the_frame() -> None:
    times = np.linspace(0, 30, 301)
    for motion in MOTIONS:
        clip = ShapeClip("triangle", "white", "black", motion, 1.3, 0.2)
        track = trajectory(clip, times, 64)
        np.testing.assert_allclose(trajectory(clip, times + clip.period, 64), track, atol=1e-6)
        frames = render(clip, 64, 12, 30.0)
        border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
        assert (border == BACKGROUND_COLORS["black"]).all(), f"{motion} leaves the frame"
        assert frames.shape == (360, 64, 64, 3)


def test_mp4_round_trip_is_close() -> None:
    frames = render(sample_clip(0, 1), 64, 12, 2.0)
    decoded = decode_video(encode_mp4(frames, 12))
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 3.0


ENCODE_IN_A_FRESH_PROCESS = """
import hashlib
from pipelines.shapes_world import encode_mp4, render, sample_clip
print(*(hashlib.sha256(encode_mp4(render(sample_clip(11, i), 64, 12, 2.0), 12)).hexdigest() for i in range(4)))
"""


def test_mp4_bytes_do_not_depend_on_the_heap() -> None:
    """glibc fills fresh allocations with MALLOC_PERTURB_'s byte; an encoder reading memory it never wrote shows it."""
    digests = set()
    for fill in ("0", "85", "200"):
        env = {**os.environ, "MALLOC_PERTURB_": fill, "PYTHONPATH": str(REPO)}
        encoded = subprocess.run([sys.executable, "-c", ENCODE_IN_A_FRESH_PROCESS], env=env, capture_output=True, text=True)
        assert encoded.returncode == 0, encoded.stderr[-2000:]
        digests.add(encoded.stdout.strip())
    assert len(digests) == 1, digests
