"""Generation API and `causvid generate` on the tiny student that the micro pipeline trained (the session's
`trained_pipeline`): the mechanics every mode must keep (streaming, the KV cache, the image in the cache, a growing
input video), and one-line errors."""

from __future__ import annotations

import logging

import os
import time
from pathlib import Path

import av
import mlflow
import numpy as np
import pytest
import torch

from evaluation.checkpoint import Checkpoint, resolve_checkpoint
from evaluation.generate import Generator, frames_to_video
from evaluation.request import Request
from infra import storage, tracking
from infra.cli import main
from model.presets import get_preset
from model.streaming import stream
from model.text import build_text_encoder
from model.vae import video_to_pixels
from model.weights import MODEL_FILE
from pipelines.shapes_world import ShapeClip, render
from pipelines.video import encode_mp4
from tests.live_mp4 import LiveMp4

A = "a red circle bouncing left and right on a black background"
B = "a blue square bouncing up and down on a black background"
CLIP = ShapeClip("circle", "red", "black", "bouncing left and right", 1.5, 0.2)


@pytest.fixture(scope="session")
def student_dir(trained_pipeline: dict[str, str]) -> str:
    """The `dmd` output folder of the micro pipeline: the trained student, its VAE reachable through manifests."""
    return trained_pipeline["dmd"]


@pytest.fixture(scope="session")
def generator(student_dir: str) -> Generator:
    torch.set_num_threads(1)
    preset = get_preset("tiny")
    encoder = build_text_encoder(preset.text_encoder, max_length=preset.text_len)
    return Generator.load(student_dir, device="cpu", text_encoder=encoder)


@pytest.fixture(scope="session")
def input_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "clip.mp4"
    path.write_bytes(encode_mp4(render(CLIP, size=64, fps=12, seconds=2.0), 12))
    return path


def test_checkpoint_resolves_from_folder_model_file_and_mlflow_run(
    student_dir: str, trained_pipeline: dict[str, str], make_config
) -> None:
    vae = storage.join(trained_pipeline["vae"], MODEL_FILE)
    expected = Checkpoint(str(Path(student_dir, MODEL_FILE)), vae, student_dir)
    assert resolve_checkpoint(student_dir) == expected
    assert resolve_checkpoint(str(Path(student_dir, MODEL_FILE))) == expected
    config = make_config()
    tracking.configure(config)
    with mlflow.start_run(tags={"causvid.output": student_dir}) as run:
        pass
    assert resolve_checkpoint(run.info.run_id, config=config) == expected


def test_text_to_video_streams_the_first_frame_then_each_chunk_as_it_completes(generator: Generator) -> None:
    calls: list[int] = []
    hook = generator.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        seen = [(len(calls), chunk) for chunk in generator.chunks(Request(A, seconds=2.5, seed=3))]
    finally:
        hook.remove()
    steps = len(get_preset("tiny").student_timesteps)  # each chunk's pixels come before its cache pass
    chunks = len(seen) - 1  # the first chunk comes in two parts: its first frame, then the rest
    assert [count for count, _ in seen] == [steps] + [steps + i * (steps + 1) for i in range(chunks)]
    assert len(calls) == chunks * (steps + 1) - 1  # the last chunk needs no cache pass
    assert [len(chunk.frames) for _, chunk in seen] == [1, 8, 12, 9]
    assert [chunk.start for _, chunk in seen] == [0, 1, 9, 21]
    assert [chunk.index for _, chunk in seen] == [0, 0, 1, 2]
    assert all(b.elapsed > a.elapsed for (_, a), (_, b) in zip(seen, seen[1:]))
    assert seen[0][1].frames.shape[1:] == (64, 64, 3) and seen[0][1].frames.dtype == np.uint8
    again = np.stack(list(generator.frames(Request(A, seconds=2.5, seed=3))))
    assert np.array_equal(again, np.concatenate([chunk.frames for _, chunk in seen]))


def test_dynamic_prompting_switches_text_from_that_chunk_on_and_keeps_the_cache(generator: Generator) -> None:
    preset = generator.preset
    dynamic = list(generator.chunks(Request(A, seconds=3.0, prompt_at=((1.5, B),), seed=7)))
    plain = list(generator.chunks(Request(A, seconds=3.0, seed=7)))
    switch = 1  # chunk 1 covers 0.75 s .. 1.75 s, so the caption changes there
    assert [c.prompt for c in dynamic] == [A, A, B, B, B]  # chunk 0 in two parts
    assert torch.equal(torch.cat([c.latents for c in dynamic[:2]], 1), torch.cat([c.latents for c in plain[:2]], 1))
    later = [c for c in dynamic if c.index >= switch]
    for ours, theirs in zip(later, [c for c in plain if c.index >= switch]):
        assert (ours.latents - theirs.latents).abs().max() > 1e-3

    emb, mask = generator.text_encoder.encode([A, B])
    texts = [(emb[0:1], mask[0:1]), (emb[1:2], mask[1:2])]
    _, c, h, w = preset.latent_shape()
    common = dict(latent_shape=(c, h, w), schedule=preset.schedule(), timesteps=preset.student_timesteps,
                  window_chunks=preset.window_chunks, vae=generator.vae)
    rng = torch.Generator().manual_seed(7)
    first = list(stream(generator.model, texts[0], num_chunks=switch, generator=rng, **common))
    reference = list(stream(
        generator.model, lambda i: texts[0] if i < switch else texts[1], num_chunks=len(later),
        generator=rng, context=torch.cat([f.latents for f in first], dim=1), **common,
    ))
    assert [r.given for r in reference] == [True] * switch + [False] * len(later)
    for ours, ref in zip(later, reference[switch:]):
        torch.testing.assert_close(ours.latents, ref.latents, atol=1e-4, rtol=1e-4)


def test_image_to_video_starts_from_the_image_round_trip_held_in_the_cache(generator: Generator) -> None:
    image = render(CLIP, size=64, fps=12, seconds=0.1)[0]
    chunks = list(generator.chunks(Request(A, seconds=1.5, image=image, seed=1)))
    assert chunks[0].given and len(chunks[0].frames) == 1 and sum(len(c.frames) for c in chunks) == 18
    encoded = generator.vae.encode(frames_to_video([image], torch.device("cpu")))
    torch.testing.assert_close(chunks[0].latents, encoded)
    round_trip = video_to_pixels(generator.vae.decode(encoded))[0, 0]
    assert np.abs(chunks[0].frames[0].astype(int) - round_trip.astype(int)).max() <= 1
    assert np.abs(round_trip.astype(int) - image.astype(int)).mean() < 12

    emb, mask = generator.text_encoder.encode([A])
    preset = generator.preset
    _, c, h, w = preset.latent_shape()
    reference = list(stream(
        generator.model, (emb, mask), num_chunks=len(chunks) - 1, latent_shape=(c, h, w), schedule=preset.schedule(),
        timesteps=preset.student_timesteps, window_chunks=preset.window_chunks, vae=generator.vae,
        generator=torch.Generator().manual_seed(1), context=encoded,
    ))
    torch.testing.assert_close(chunks[1].latents, reference[1].latents, atol=1e-4, rtol=1e-4)
    other = list(generator.chunks(Request(A, seconds=1.5, image=255 - image, seed=1)))
    assert not torch.equal(other[1].latents, chunks[1].latents)  # same seed: only the cached image differs


def test_video_to_video_consumes_a_growing_mp4_chunk_by_chunk(generator: Generator, tmp_path: Path) -> None:
    source = render(CLIP, size=64, fps=12, seconds=3.0)
    path = tmp_path / "live.mp4"
    request = Request(B, video=path, strength=0.5, seed=2, idle_seconds=300)
    live = []
    with LiveMp4(path, source, 12, head=24) as live_file:
        for chunk in generator.chunks(request):
            live.append(chunk)
            if len(live) == 1:
                live_file.resume()
    assert live_file.log == ["resumed", "waited", "closed"]
    assert sum(len(c.frames) for c in live) == len(source)
    offline = list(generator.chunks(request))
    assert len(offline) == len(live) == 5  # the first chunk in two parts
    for a, b in zip(live, offline):
        assert torch.equal(a.latents, b.latents) and np.array_equal(a.frames, b.frames)
    full = list(generator.chunks(Request(B, video=path, strength=1.0, seed=2)))
    assert (full[0].latents - offline[0].latents).abs().max() > 1e-3


def test_cli_generate_streams_an_mp4(
    student_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    image = tmp_path / "first.png"
    from PIL import Image

    Image.fromarray(render(CLIP, size=96, fps=12, seconds=0.1)[0]).save(image)
    out = tmp_path / "out" / "video.mp4"
    args = ["generate", "--checkpoint", student_dir, "--prompt", A, "--seconds", "1.5",
            "--out", str(out), "--prompt-at", f"0.5:{B}", "--image", str(image), "--device", "cpu", "--compile"]
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    [summary] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generate: wrote")]
    assert summary.startswith(f"generate: wrote {out.resolve()}: 18 frames (1.5 s at 12 fps) in ")
    assert "nan" not in summary
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 18 and frames[0].shape == (64, 64, 3)


@pytest.mark.parametrize(
    "case",
    ["unknown-path", "unknown-run", "image", "video-garbage", "video-missing", "prompt-at", "strength-0", "strength-high"],
)
def test_cli_generate_bad_inputs_are_one_line_errors(
    case: str, student_dir: str, input_mp4: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a picture or a video " * 40)
    old = time.time() - 3600
    os.utime(garbage, (old, old))
    checkpoint = student_dir
    base = ["generate", "--prompt", A, "--out", str(tmp_path / "o.mp4"), "--set", f"storage.root={tmp_path / 'root'}"]
    extra = {
        "unknown-path": ["--checkpoint", str(tmp_path / "nothing")],
        "unknown-run": ["--checkpoint", "0123456789abcdef0123456789abcdef"],
        "image": ["--checkpoint", checkpoint, "--image", str(garbage)],
        "video-garbage": ["--checkpoint", checkpoint, "--video", str(garbage)],
        "video-missing": ["--checkpoint", checkpoint, "--video", str(tmp_path / "missing.mp4")],
        "prompt-at": ["--checkpoint", checkpoint, "--seconds", "4", "--prompt-at", f"4:{B}"],
        "strength-0": ["--checkpoint", checkpoint, "--video", str(input_mp4), "--strength", "0"],
        "strength-high": ["--checkpoint", checkpoint, "--video", str(input_mp4), "--strength", "1.5"],
    }[case]
    assert main(base + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("causvid: error: "), err
    assert not (tmp_path / "o.mp4").exists()
    keyword = {"unknown-path": "checkpoint", "unknown-run": "checkpoint", "image": "image", "video-garbage": "video",
               "video-missing": "video", "prompt-at": "past the end", "strength-0": "strength", "strength-high": "strength"}
    assert keyword[case] in err
