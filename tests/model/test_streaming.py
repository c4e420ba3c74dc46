"""Streaming rollouts (Algorithm 2): cache vs recompute, streamed pixels, and the zero-shot hooks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from model import schedule as sch
from model.dit import DiT
from model.schedule import FlowSchedule
from model.streaming import Chunk, stream, teacher_sample
from model.vae import VAE

SCHEDULE = FlowSchedule(shift=3.0)
SHAPE = (4, 8, 8)


def _rollout(model: DiT, text: tuple, num_chunks: int = 4, seed: int = 0, **kwargs: object) -> list[Chunk]:
    g = torch.Generator().manual_seed(seed)
    return list(stream(model, text, num_chunks=num_chunks, latent_shape=SHAPE, schedule=SCHEDULE, generator=g, **kwargs))


def _latents(chunks: list[Chunk]) -> torch.Tensor:
    return torch.cat([c.latents for c in chunks], dim=1)


@pytest.mark.parametrize("window", [None, 1, 2])
def test_kv_cache_rollout_equals_recompute_reference(dit: DiT, text: tuple, window: int | None) -> None:
    cached = _rollout(dit, text, window_chunks=window)
    reference = _rollout(dit, text, window_chunks=window, use_cache=False)
    assert _latents(cached).shape == (2, 8, *SHAPE)
    assert torch.allclose(_latents(cached), _latents(reference), atol=1e-4)


def test_window_changes_late_chunks_only(dit: DiT, text: tuple) -> None:
    full, windowed = _latents(_rollout(dit, text)), _latents(_rollout(dit, text, window_chunks=1))
    assert torch.allclose(full[:, :4], windowed[:, :4], atol=1e-5)
    assert (full[:, 4:] - windowed[:, 4:]).abs().max() > 1e-4


def test_streamed_pixels_equal_decoding_the_whole_rollout(dit: DiT, text: tuple, tiny_vae: VAE) -> None:
    chunks = _rollout(dit, text, num_chunks=3, vae=tiny_vae)
    assert [c.video.shape[1] for c in chunks] == [5, 8, 8]
    with torch.no_grad():
        whole = tiny_vae.decode(_latents(chunks)).clamp(-1, 1)
    assert torch.allclose(torch.cat([c.video for c in chunks], 1), whole, atol=1e-5)
    assert all(not c.given and c.seconds > 0 for c in chunks) and [c.index for c in chunks] == [0, 1, 2]


def test_first_frame_alone_yields_it_before_the_rest_of_its_chunk(dit: DiT, text: tuple, tiny_vae: VAE) -> None:
    whole = _rollout(dit, text, num_chunks=3, vae=tiny_vae)
    parts = _rollout(dit, text, num_chunks=3, vae=tiny_vae, first_frame_alone=True)
    assert [(c.index, c.latents.shape[1], c.video.shape[1]) for c in parts] == [(0, 1, 1), (0, 1, 4), (1, 2, 8), (2, 2, 8)]
    assert torch.equal(_latents(parts), _latents(whole))
    assert torch.allclose(torch.cat([c.video for c in parts], 1), torch.cat([c.video for c in whole], 1), atol=1e-5)
    assert parts[0].seconds < parts[1].seconds, "both parts are timed from the chunk's start"


def test_student_steps_renoise_with_fresh_noise(dit: DiT, text: tuple) -> None:
    a, b = _latents(_rollout(dit, text, seed=0)), _latents(_rollout(dit, text, seed=1))
    one_step_a = _latents(_rollout(dit, text, seed=0, timesteps=(1000,)))
    assert (a - b).abs().max() > 1e-3 and (a - one_step_a).abs().max() > 1e-3


def test_dynamic_prompt_changes_only_later_chunks(dit: DiT, text: tuple, make_text: Callable) -> None:
    other = make_text(seed=9)
    fixed = _latents(_rollout(dit, text))
    switched = _latents(_rollout(dit, lambda i: text if i < 2 else other))
    assert torch.allclose(fixed[:, :4], switched[:, :4], atol=1e-6)
    assert (fixed[:, 4:] - switched[:, 4:]).abs().max() > 1e-3


def test_image_to_video_context_is_given_then_continued(dit: DiT, text: tuple) -> None:
    image = torch.randn(2, 1, *SHAPE, generator=torch.Generator().manual_seed(4))
    chunks = _rollout(dit, text, num_chunks=2, context=image)
    assert [c.given for c in chunks] == [True, False, False]
    assert torch.equal(chunks[0].latents, image)
    plain = _rollout(dit, text, num_chunks=2)
    assert (chunks[1].latents - plain[0].latents).abs().max() > 1e-3


def test_video_to_video_from_full_noise_is_plain_generation(dit: DiT, text: tuple) -> None:
    inputs = [torch.randn(2, 2, *SHAPE, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    from_noise = _rollout(dit, text, num_chunks=5, inputs=inputs, input_timestep=1000)
    assert len(from_noise) == 3
    assert torch.allclose(_latents(from_noise), _latents(_rollout(dit, text, num_chunks=3)), atol=1e-6)
    edited = _rollout(dit, text, num_chunks=3, inputs=inputs, input_timestep=500)
    assert (_latents(edited) - _latents(from_noise)).abs().max() > 1e-3


def test_video_to_video_one_step_is_the_x0_prediction_of_the_noised_input(dit: DiT, text: tuple) -> None:
    source = torch.randn(2, 2, *SHAPE, generator=torch.Generator().manual_seed(5))
    out = _rollout(dit, text, num_chunks=1, inputs=[source], input_timestep=250, seed=3)[0].latents
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 2, *SHAPE, generator=g)
    t = SCHEDULE.time_of(250)
    x_t = sch.add_noise(source, noise, t)
    with torch.no_grad():
        expected = dit.predict_x0(x_t, torch.full((2, 2), float(t)), *text, mode="block_causal")
    assert torch.allclose(out, expected, atol=1e-5)


def test_many_step_causal_sampler_with_guidance_matches_reference(text: tuple, make_dit: Callable) -> None:
    model = make_dit()
    kwargs = {"sampler": "euler", "num_steps": 4, "guidance_scale": 3.0, "num_chunks": 2}
    cached, reference = _rollout(model, text, **kwargs), _rollout(model, text, use_cache=False, **kwargs)
    assert torch.allclose(_latents(cached), _latents(reference), atol=1e-4)


def test_teacher_sample_records_the_student_timesteps(dit: DiT, text: tuple) -> None:
    noise = torch.randn(2, 4, *SHAPE, generator=torch.Generator().manual_seed(0))
    traj = teacher_sample(dit, text, noise, SCHEDULE, num_steps=6, guidance_scale=2.0, record_timesteps=(1000, 500))
    assert traj.states.shape == (2, *noise.shape) and torch.equal(traj.states[0], noise)
    assert torch.allclose(traj.times, SCHEDULE.time_of([1000, 500]))
    grid = SCHEDULE.sampling_times(6)
    rest = grid[(grid - traj.times[1]).abs().argmin() :]
    emb, mask = text
    x = traj.states[1]
    with torch.no_grad():
        for t, t_next in zip(rest[:-1], rest[1:]):
            v = dit.guided_velocity(x, torch.full((2, 4), float(t)), emb, mask, 2.0, mode="bidirectional")
            x = sch.euler_step(x, v, t, t_next)
    assert torch.allclose(x, traj.x0, atol=1e-5)
