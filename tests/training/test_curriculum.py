"""The teacher's curriculum: which latent frames each step trains on, and how a config spells it."""

from __future__ import annotations

import pytest

from infra.config import ConfigError, CurriculumPhase, load_config
from training.flow_matching import curriculum_frames


def phases(*spec: tuple[int, int, int]) -> tuple[CurriculumPhase, ...]:
    return tuple(CurriculumPhase(latent_frames=f, steps=n, image_every=e) for f, n, e in spec)


def test_phases_run_in_order_then_whole_clips() -> None:
    two = phases((1, 3, 0), (3, 2, 0))
    assert [curriculum_frames(two, step, 9) for step in range(7)] == [1, 1, 1, 3, 3, 9, 9]
    assert curriculum_frames((), 0, 9) == 9
    assert curriculum_frames(phases((12, 5, 0)), 0, 9) == 9


def test_a_video_phase_trains_on_images_every_nth_step() -> None:
    three = phases((1, 2, 0), (3, 6, 3), (9, 4, 2))
    assert [curriculum_frames(three, step, 9) for step in range(13)] == [1, 1, 3, 3, 1, 3, 3, 1, 9, 1, 9, 1, 9]


def test_curriculum_from_an_override_and_a_bad_phase_in_one_line() -> None:
    cfg = load_config(
        None, ["teacher.curriculum=[{latent_frames: 1, steps: 100}, {latent_frames: 3, steps: 50, image_every: 2}]"]
    )
    assert [(p.latent_frames, p.steps, p.image_every) for p in cfg.teacher.curriculum] == [(1, 100, 0), (3, 50, 2)]
    with pytest.raises(ConfigError) as err:
        load_config(None, ["teacher.curriculum=[{latent_frames: 0, steps: 100}]"])
    assert "curriculum" in str(err.value) and "\n" not in str(err.value)
