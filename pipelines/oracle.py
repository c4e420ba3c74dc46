"""Pixel oracles for the shapes world: what a video shows, read back from its frames alone.

They turn a caption's promises into exact numbers: background and object colour (nearest palette
entry), shape (best soft-IoU template), centroid track and motion class, crispness (edge sharpness
of the object) and persistence (present as one connected component). `score_video` reports them per
second of a rollout, against the attributes the prompt asked for; `oracle_alignment` scores whole
videos, as every stage that samples does.  frames: [T, H, W, 3] uint8 RGB.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.shapes_world import BACKGROUND_COLORS, OBJECT_COLORS, SHAPES, shape_distance

FOREGROUND_DISTANCE = 40.0
MIN_AREA_FRACTION = 0.002
MIN_COMPONENT_PIXELS = 3
LINEAR_RATIO = 0.3
MIN_TRACK_STD = 0.75
OBJECT_KEYS = ("color", "shape", "motion")
"""What a caption says about the object: the text-alignment scores."""
ORACLE_KEYS = (*OBJECT_KEYS, "background")
"""Every prompt attribute the oracle reads back."""


@dataclass
class FrameDetections:
    """Per-frame oracle readings of a video with T frames."""

    background: np.ndarray  # [T, 3] float, median colour of the frame
    present: np.ndarray  # [T] bool, an object is there
    components: np.ndarray  # [T] int, connected foreground components of at least MIN_COMPONENT_PIXELS
    area: np.ndarray  # [T] float, soft object area in pixels
    centroid: np.ndarray  # [T, 2] float (x, y) in pixels, NaN where absent
    color: list[str]  # [T] nearest object palette entry ("" where absent)
    shape: list[str]  # [T] best-matching shape ("" where absent)
    crispness: np.ndarray  # [T] float, ~1 for a one-pixel edge, lower when blurred, NaN where absent

    @property
    def persistent(self) -> np.ndarray:
        """[T] bool: the object is there as exactly one piece."""
        return self.present & (self.components == 1)


def nearest(palette: dict[str, tuple[int, int, int]], rgb: np.ndarray) -> str:
    names = list(palette)
    table = np.asarray([palette[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(np.linalg.norm(table - rgb, axis=-1)))]


def detect_frames(frames: np.ndarray) -> FrameDetections:
    """Segment each frame against its background and read the object's attributes."""
    video = np.asarray(frames, dtype=np.float32)
    num, height, width, _ = video.shape
    background = np.median(video.reshape(num, -1, 3), axis=1)  # [T, 3]
    offset = video - background[:, None, None, :]  # [T, H, W, 3]
    distance = np.linalg.norm(offset, axis=-1)  # [T, H, W]
    coarse = distance > FOREGROUND_DISTANCE
    color_rgb = np.full((num, 3), np.nan, dtype=np.float32)
    alpha = np.zeros((num, height, width), dtype=np.float32)
    for t in np.nonzero(coarse.reshape(num, -1).sum(1) > 0)[0]:
        core = distance[t] >= 0.7 * distance[t][coarse[t]].max()
        color_rgb[t] = np.median(video[t][core], axis=0)
        direction = color_rgb[t] - background[t]
        alpha[t] = np.clip(offset[t] @ direction / max(float(direction @ direction), 1e-6), 0.0, 1.0)
    alpha = np.where(coarse | (distance > 0.5 * FOREGROUND_DISTANCE), alpha, 0.0)
    mask = alpha > 0.5
    area = alpha.sum(axis=(1, 2))
    present = mask.reshape(num, -1).sum(1) >= max(MIN_COMPONENT_PIXELS, MIN_AREA_FRACTION * height * width)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    weight = np.maximum(area, 1e-6)
    centroid = np.stack([(alpha * xs).sum((1, 2)) / weight, (alpha * ys).sum((1, 2)) / weight], axis=-1)
    centroid[~present] = np.nan
    color = [nearest(OBJECT_COLORS, color_rgb[t]) if present[t] else "" for t in range(num)]
    shape = _classify_shapes(alpha, centroid, area, present, xs, ys)
    return FrameDetections(
        background=background,
        present=present,
        components=count_components(mask),
        area=area,
        centroid=centroid,
        color=color,
        shape=shape,
        crispness=_crispness(alpha, mask, present),
    )


def _shape_area_factor(shape: str) -> float:
    """Area of `shape` drawn at radius 1 (px^2 per px^2 of radius), measured once on a fine grid."""
    grid = (np.arange(400) - 199.5) / 100.0
    cover = np.clip(0.5 - shape_distance(shape, grid[None, :] * 100, grid[:, None] * 100, 100.0), 0, 1)
    return float(cover.sum()) / 100.0**2


SHAPE_AREA = {shape: _shape_area_factor(shape) for shape in SHAPES}


def _classify_shapes(
    alpha: np.ndarray, centroid: np.ndarray, area: np.ndarray, present: np.ndarray, xs: np.ndarray, ys: np.ndarray
) -> list[str]:
    """Best soft IoU between the object and each shape drawn at the same centroid and area."""
    idx = np.nonzero(present)[0]
    result = [""] * len(alpha)
    if len(idx) == 0:
        return result
    a = alpha[idx]  # [N, H, W]
    dx = xs[None] - centroid[idx, 0, None, None]
    dy = ys[None] - centroid[idx, 1, None, None]
    scores = []
    for shape in SHAPES:
        radius = np.sqrt(area[idx] / SHAPE_AREA[shape])[:, None, None]
        template = np.clip(0.5 - shape_distance(shape, dx, dy, radius), 0.0, 1.0)
        scores.append(np.minimum(a, template).sum((1, 2)) / np.maximum(a, template).sum((1, 2)))
    best = np.argmax(np.stack(scores, axis=-1), axis=-1)
    for i, t in enumerate(idx):
        result[t] = SHAPES[best[i]]
    return result


def _crispness(alpha: np.ndarray, mask: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Mean of the k steepest alpha steps per frame, k = the object's boundary length in pixels."""
    grad = np.zeros_like(alpha)
    grad[:, :, :-1] = np.abs(np.diff(alpha, axis=2))
    grad[:, :-1, :] = np.maximum(grad[:, :-1, :], np.abs(np.diff(alpha, axis=1)))
    interior = mask.copy()
    interior[:, 1:, :] &= mask[:, :-1, :]
    interior[:, :-1, :] &= mask[:, 1:, :]
    interior[:, :, 1:] &= mask[:, :, :-1]
    interior[:, :, :-1] &= mask[:, :, 1:]
    boundary = (mask & ~interior).reshape(len(alpha), -1).sum(1)
    steps = -np.sort(-grad.reshape(len(alpha), -1), axis=1)
    out = np.full(len(alpha), np.nan, dtype=np.float32)
    for t in np.nonzero(present)[0]:
        out[t] = float(steps[t, : max(int(boundary[t]), 1)].mean())
    return out


def count_components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of at least MIN_COMPONENT_PIXELS per frame.  mask: [T, H, W] bool -> [T] int."""
    num, height, width = mask.shape
    index = np.arange(1, mask.size + 1, dtype=np.int64).reshape(mask.shape)
    none = np.int64(mask.size + 1)
    labels = np.where(mask, index, none)
    while True:
        low = labels.copy()
        np.minimum(low[:, 1:, :], labels[:, :-1, :], out=low[:, 1:, :])
        np.minimum(low[:, :-1, :], labels[:, 1:, :], out=low[:, :-1, :])
        np.minimum(low[:, :, 1:], labels[:, :, :-1], out=low[:, :, 1:])
        np.minimum(low[:, :, :-1], labels[:, :, 1:], out=low[:, :, :-1])
        low = np.where(mask, low, none)
        for _ in range(3):  # pointer jumping: take the label of the pixel named by one's own label
            low = np.concatenate([[0], low.ravel(), [none]])[low]
        if np.array_equal(low, labels):
            break
        labels = low
    sizes = np.bincount(labels[mask], minlength=mask.size + 2)
    roots = index[mask & (labels == index)]
    frame_of_root = (roots - 1) // (height * width)
    big = sizes[roots] >= MIN_COMPONENT_PIXELS
    return np.bincount(frame_of_root[big], minlength=num)


def classify_motion(track: np.ndarray) -> str:
    """Motion class of a centroid track (image coordinates, y down).  track: [T, 2], NaN rows ignored.

    A thin spread of positions is a bounce along its main axis; a round one is circling, its direction
    given by the sign of successive velocity cross products (positive is clockwise on screen).
    """
    points = track[~np.isnan(track).any(axis=1)]
    if len(points) < 3:
        return "unknown"
    centred = points - points.mean(axis=0)
    eigvals, eigvecs = np.linalg.eigh(np.cov(centred.T))
    if np.sqrt(max(eigvals[1], 0.0)) < MIN_TRACK_STD:
        return "static"
    if np.sqrt(max(eigvals[0], 0.0) / eigvals[1]) < LINEAR_RATIO:
        axis = eigvecs[:, 1]
        angle = np.degrees(np.arctan2(axis[1], axis[0])) % 180.0
        if angle < 22.5 or angle >= 157.5:
            return "bouncing left and right"
        if 67.5 <= angle < 112.5:
            return "bouncing up and down"
        return "bouncing diagonally" if angle < 90 else "bouncing anti-diagonally"
    velocity = np.diff(points, axis=0)
    turning = velocity[:-1, 0] * velocity[1:, 1] - velocity[:-1, 1] * velocity[1:, 0]
    return "circling clockwise" if turning.sum() > 0 else "circling counter-clockwise"


def _majority(values: list[str]) -> str:
    """The most frequent non-empty reading; a tie goes to the one seen first (a set's order would follow the
    process's string-hash seed, and a Ray worker and the driver would read the same video differently)."""
    counts = Counter(v for v in values if v)
    return counts.most_common(1)[0][0] if counts else ""


def summarize(det: FrameDetections, start: int = 0, stop: int | None = None) -> dict[str, Any]:
    """Attributes of frames [start, stop): majority colour/shape, background, motion class and quality rates."""
    window = slice(start, stop)
    present = det.present[window]
    crisp = det.crispness[window]
    return {
        "background": nearest(BACKGROUND_COLORS, np.median(det.background[window], axis=0)),
        "color": _majority(det.color[window]),
        "shape": _majority(det.shape[window]),
        "motion": classify_motion(det.centroid[window]),
        "present": float(present.mean()) if len(present) else 0.0,
        "persistence": float(det.persistent[window].mean()) if len(present) else 0.0,
        "crispness": float(np.nanmean(crisp)) if np.isfinite(crisp).any() else 0.0,
    }


def describe(frames: np.ndarray) -> dict[str, Any]:
    """Clip-level attributes of a whole video, in the generator's vocabulary (see shapes_world)."""
    return summarize(detect_frames(frames))


def score_video(frames: np.ndarray, fps: float, expected: dict[str, Any]) -> list[dict[str, Any]]:
    """Per second of video: whether background, colour, shape and motion match `expected`, plus the
    fraction of frames with the object present, the fraction where it is one piece, and mean crispness."""
    det = detect_frames(frames)
    per_second = max(1, int(round(fps)))
    rows = []
    for second, start in enumerate(range(0, len(frames) - per_second + 1, per_second)):
        found = summarize(det, start, start + per_second)
        row: dict[str, Any] = {"second": second}
        for key in ORACLE_KEYS:
            if key in expected:
                row[f"{key}_ok"] = found[key] == expected[key]
        row.update({k: found[k] for k in ("present", "persistence", "crispness")})
        row["detected"] = {k: found[k] for k in ORACLE_KEYS}
        rows.append(row)
    return rows


BOOTSTRAP_RESAMPLES = 2000


def bootstrap_interval(hits: np.ndarray, confidence: float = 0.95, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval over prompts of the mean of per-prompt hits ``[N]`` (0/1): how far a score
    may move on another draw of held-out prompts. Seeded, so a table is reproducible; ``[m, m]`` for one prompt."""
    from scipy.stats import bootstrap

    if len(hits) < 2 or np.all(hits == hits[0]):
        return [float(hits.mean()), float(hits.mean())]
    result = bootstrap(
        (hits,), np.mean, confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
        rng=np.random.default_rng(seed),
    )
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def oracle_alignment(videos: np.ndarray, expected: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Fraction of videos whose oracle reading matches the prompt, per attribute, plus the readings themselves."""
    found = [describe(video) for video in videos]
    scores: dict[str, Any] = {}
    for key in ORACLE_KEYS:
        pairs = [(f[key], e[key]) for f, e in zip(found, expected) if key in e]
        if pairs:
            hits = np.array([a == b for a, b in pairs], dtype=np.float64)
            scores[f"{key}_accuracy"] = float(hits.mean())
            scores[f"{key}_accuracy_interval"] = bootstrap_interval(hits)
    scores["present"] = float(np.mean([f["present"] for f in found])) if found else 0.0
    scores["detected"] = found
    return scores


def attributes(meta: str) -> dict[str, Any]:
    """The shapes-world attributes carried in a clip's `meta` JSON (empty for captions of other sources)."""
    try:
        value = json.loads(meta) if meta else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}

