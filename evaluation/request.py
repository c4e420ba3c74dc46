"""What to generate: one :class:`Request` of any of the four modes, and every mistake in it that can be seen
before generating, as one UserError line."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infra.errors import UserError
from pipelines.video import IDLE_SECONDS, VideoSource, read_image

DEFAULT_SECONDS = 30.0


@dataclass(frozen=True)
class Request:
    """One generation. ``prompt_at`` lists ``(second, caption)`` switches (dynamic prompting); ``image`` (a path or
    ``[H, W, 3]`` uint8) starts the video from that frame; ``video`` (a path, possibly still being written) is
    re-rendered under the prompt, noised to the student timestep nearest ``strength`` (0 < strength <= 1).
    ``seconds`` defaults to 30, or to the whole input video."""

    prompt: str
    seconds: float | None = None
    prompt_at: tuple[tuple[float, str], ...] = ()
    image: str | Path | np.ndarray | None = None
    video: str | Path | None = None
    strength: float = 0.5
    seed: int = 0
    idle_seconds: float = IDLE_SECONDS


def parse_prompt_at(value: str) -> tuple[float, str]:
    """``'10:a blue square ...'`` -> ``(10.0, 'a blue square ...')``."""
    second, sep, caption = value.partition(":")
    try:
        at = float(second)
    except ValueError:
        at = math.nan
    if not sep or not caption.strip() or not math.isfinite(at) or at < 0:
        raise UserError(f"--prompt-at wants SECONDS:\"TEXT\" with SECONDS >= 0, got {value!r}")
    return at, caption.strip()


def requested_seconds(request: Request) -> float | None:
    """The length asked for: ``seconds``, else 30 s, else (with a video input) None for the whole input."""
    if request.seconds is not None or request.video is not None:
        return request.seconds
    return DEFAULT_SECONDS


def validate(request: Request) -> None:
    """Every mistake in a request that can be seen before generating, as one UserError line."""
    if request.image is not None and request.video is not None:
        raise UserError("--image and --video cannot be combined")
    if request.seconds is not None and not request.seconds > 0:
        raise UserError(f"--seconds must be positive, got {request.seconds:g}")
    if not 0.0 < request.strength <= 1.0:
        raise UserError(f"--strength must be in (0, 1], got {request.strength:g}")
    length = requested_seconds(request)
    if request.video is not None:
        source = VideoSource(request.video, fps=1, height=8, width=8, idle_seconds=request.idle_seconds)
        source.check()
        length = length if length is not None else source.finished_seconds()
    if request.image is not None and not isinstance(request.image, np.ndarray):
        read_image(request.image, 8, 8)
    for at, _ in request.prompt_at:
        if length is not None and at >= length:
            raise UserError(f"--prompt-at {at:g} is past the end of the video ({length:g} s)")
