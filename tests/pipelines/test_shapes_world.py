import numpy as np

from pipelines.shapes_world import (
    BACKGROUND_COLORS,
    MOTIONS,
    OBJECT_COLORS,
    SHAPES,
    ShapeClip,
    heldout_prompts,
    render,
    sample_clip,
    trajectory,
)


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
