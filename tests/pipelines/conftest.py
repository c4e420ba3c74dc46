"""Real footage nobody here drew: ffmpeg's built-in sources in several containers, plus broken files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg
import pytest

from pipelines.shapes_world import render, sample_clip
from pipelines.video import encode_mp4

# name -> (lavfi source, seconds, encoder arguments)
SOURCES: dict[str, tuple[str, float, list[str]]] = {
    "testsrc2.mp4": ("testsrc2=size=160x120:rate=25", 4.0, ["-c:v", "libx264", "-pix_fmt", "yuv420p"]),
    "mandelbrot.webm": ("mandelbrot=size=128x96:rate=20", 4.0, ["-c:v", "libvpx-vp9", "-b:v", "300k"]),
    "life.avi": ("life=size=96x96:rate=15:mold=10:ratio=0.3:seed=1", 4.0, ["-c:v", "mpeg4", "-q:v", "3"]),
    "cellauto.mkv": ("cellauto=size=120x80:rate=30:seed=2", 4.0, ["-c:v", "libx264", "-pix_fmt", "yuv420p"]),
    "faststart.mp4": (
        "testsrc2=size=160x120:rate=25",
        4.0,
        ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-movflags", "+faststart"],
    ),
    "bars.mp4": ("smptebars=size=96x72:rate=12", 4.0, ["-c:v", "libx264", "-pix_fmt", "yuv420p"]),
    "black.mp4": ("color=c=black:size=96x72:rate=12", 4.0, ["-c:v", "libx264", "-pix_fmt", "yuv420p"]),
    "tiny.mp4": ("testsrc2=size=24x16:rate=12", 4.0, ["-c:v", "libx264", "-pix_fmt", "yuv420p"]),
    "short.mp4": ("testsrc2=size=96x72:rate=12", 1.0, ["-c:v", "libx264", "-pix_fmt", "yuv420p"]),
    "audio_only.m4a": ("sine=frequency=440:sample_rate=8000", 1.0, ["-c:a", "aac"]),
}
ACCEPTED = ("testsrc2.mp4", "mandelbrot.webm", "life.avi", "cellauto.mkv", "faststart.mp4")
SYNTHETIC_SEED = 5
EXPECTED_REASON = {
    "bars.mp4": "static",
    "black.mp4": "blank",
    "tiny.mp4": "too_small",
    "short.mp4": "too_short",
    "audio_only.m4a": "no_video_stream",
    "cut_moov.mp4": "unreadable",
    "cut_frames.mp4": "truncated",
    "cut.webm": "truncated",
    "zero.mp4": "empty",
    "text.mp4": "unreadable",
    "missing.mp4": "missing",
}


def ffmpeg(source: str, seconds: float, args: list[str], out: Path) -> None:
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", source]
    subprocess.run([*command, "-t", str(seconds), *args, str(out)], check=True)


def truncate(src: Path, dst: Path, fraction: float) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])


@pytest.fixture(scope="session")
def footage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of videos and broken files and `manifest.csv` (relative paths) listing them all.

    Also two shapes-world MP4 files whose attributes ride along in extra manifest columns.
    """
    folder = tmp_path_factory.mktemp("footage")
    for name, (source, seconds, args) in SOURCES.items():
        ffmpeg(source, seconds, args, folder / name)
    truncate(folder / "testsrc2.mp4", folder / "cut_moov.mp4", 0.5)
    truncate(folder / "faststart.mp4", folder / "cut_frames.mp4", 0.5)
    truncate(folder / "mandelbrot.webm", folder / "cut.webm", 0.3)
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("this is not a video\n")
    lines = ["uri,caption,shape,color,background,motion"]
    for name in (*ACCEPTED, *EXPECTED_REASON):
        lines.append(f"{name},footage {name.split('.')[0]},,,,")
    for index in range(2):
        clip = sample_clip(SYNTHETIC_SEED, index)
        (folder / f"shapes{index}.mp4").write_bytes(encode_mp4(render(clip, 64, 12, 4.0), 12))
        lines.append(f"shapes{index}.mp4,{clip.caption},{clip.shape},{clip.color},{clip.background},{clip.motion}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def expected_reasons() -> dict[str, str]:
    """Rejection reason of every bad input in `footage`, by file name."""
    return dict(EXPECTED_REASON)


@pytest.fixture(scope="session")
def accepted_names() -> tuple[str, ...]:
    """Files in `footage` that are real videos long and lively enough to give clips (besides the shapes)."""
    return ACCEPTED
