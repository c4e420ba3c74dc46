"""A progress bar for streamed generation on stderr: seconds of video generated and the live frames per second."""

from __future__ import annotations

import sys

from tqdm import tqdm

BAR = "{desc}: {n:.1f}/{total_fmt} s |{bar}| {elapsed} {postfix}"


class SecondsBar:
    """``advance(frames, done, elapsed)`` after each chunk: ``frames`` new ones, ``done`` in all after ``elapsed`` s."""

    def __init__(self, total_seconds: float | None, fps: int, enabled: bool = True) -> None:
        self.fps = fps
        self.bar = tqdm(total=total_seconds, unit="s", desc="generate", disable=not enabled, file=sys.stderr, bar_format=BAR)

    def advance(self, frames: int, done: int, elapsed: float) -> None:
        self.bar.update(frames / self.fps)
        self.bar.set_postfix_str(f"{done / max(elapsed, 1e-9):.1f} fps")

    def __enter__(self) -> SecondsBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
