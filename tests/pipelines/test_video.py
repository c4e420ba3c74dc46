"""Video files in and out: byte-identical MP4 encoding, decoding back, resampled reading, a file read as it grows."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipelines.shapes_world import render, sample_clip
from pipelines.video import VideoSource, decode_clip, decode_video, encode_clip, encode_mp4, writer_finished
from tests.live_mp4 import LiveMp4
from tests.paths import REPO


def test_mp4_round_trip_is_close() -> None:
    frames = render(sample_clip(0, 1), 64, 12, 2.0)
    decoded = decode_video(encode_mp4(frames, 12))
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 3.0


def test_a_stored_clip_is_exact_by_default_and_close_at_a_crf() -> None:
    """Clips are stored lossless with x264's fastest preset: even noise, the hardest input, comes back bit for bit."""
    noise = np.random.default_rng(0).integers(0, 256, (9, 32, 48, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_clip(encode_clip(noise, 12)), noise)
    frames = render(sample_clip(0, 1), 64, 12, 2.0)
    np.testing.assert_array_equal(decode_clip(encode_clip(frames, 12)), frames)
    lossy = decode_clip(encode_clip(frames, 12, crf=18))
    assert lossy.shape == frames.shape and not np.array_equal(lossy, frames)
    assert np.abs(lossy.astype(int) - frames).mean() < 2.0  # grey levels of 255; measured 1.2


ENCODE_IN_A_FRESH_PROCESS = """
import hashlib
from pipelines.shapes_world import render, sample_clip
from pipelines.video import encode_mp4
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


def test_video_source_resamples_rate_and_size(tmp_path: Path) -> None:
    frames = np.zeros((24, 32, 48, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(24)[:, None, None] * 10
    path = tmp_path / "fast.mp4"
    path.write_bytes(encode_mp4(frames, 24))
    read = np.stack(list(VideoSource(path, fps=12, height=16, width=16)))
    assert read.shape == (12, 16, 16, 3)
    assert np.abs(read[:, 8, 8, 0].astype(int) - np.arange(0, 240, 20)).max() <= 3


def test_live_mp4_is_read_while_it_is_written(tmp_path: Path) -> None:
    frames = render(sample_clip(0, 2), 64, 12, 3.0)
    path = tmp_path / "live.mp4"
    read = []
    with LiveMp4(path, frames, 12, head=24) as live:
        assert not writer_finished(path, idle_seconds=300)
        source = VideoSource(path, fps=12, height=64, width=64, idle_seconds=300)
        for frame in source:
            read.append(frame)
            if len(read) == 6:
                live.resume()
    assert live.log == ["resumed", "waited", "closed"] and writer_finished(path, idle_seconds=300)
    assert len(read) == source.frames_read == len(frames)
    assert np.abs(np.stack(read).astype(int) - frames).mean() < 3.0
