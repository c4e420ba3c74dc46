"""Per-second video quality metrics that need no weights (VBench-style proxies), plus CLIP when weights exist.

Every function takes `frames: [T, H, W, 3] uint8` and the frame rate, and returns one value per whole
second of video, so that a 30-second rollout gives 30-point drift curves.

Definitions (higher is better unless noted):
- `temporal_flickering`: VBench's 1 - mean |frame_t - frame_{t-1}| / 255 over the second's frame pairs.
- `motion_smoothness`: 1 - mean |frame_t - (frame_{t-1} + frame_{t+1}) / 2| / 255: how well the middle
  frame is predicted by linear interpolation of its neighbours (VBench uses a learned interpolator).
- `dynamic_degree`: fraction of consecutive frame pairs in which the 1% most changed pixels changed
  by more than 8/255 (VBench thresholds its top optical-flow magnitudes); 0 for a frozen video.
- `sharpness`: variance of the Laplacian of the luma, in [0, 255] units squared.
- `color_drift` / `brightness_drift` (lower is better): distance of the second's mean RGB / mean luma
  from the first second's, in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
MOTION_THRESHOLD = 8.0
MOTION_PERCENTILE = 99.0


def seconds_of(frames: np.ndarray, fps: float) -> list[np.ndarray]:
    """Split a video into whole seconds; a trailing partial second is dropped."""
    per_second = max(1, int(round(fps)))
    return [frames[start : start + per_second] for start in range(0, len(frames) - per_second + 1, per_second)]


def _float(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float32)


def temporal_flickering(frames: np.ndarray, fps: float) -> list[float]:
    out = []
    for chunk in seconds_of(frames, fps):
        diffs = np.abs(np.diff(_float(chunk), axis=0)).mean() if len(chunk) > 1 else 0.0
        out.append(float(1.0 - diffs / 255.0))
    return out


def motion_smoothness(frames: np.ndarray, fps: float) -> list[float]:
    out = []
    for chunk in seconds_of(frames, fps):
        if len(chunk) < 3:
            out.append(1.0)
            continue
        video = _float(chunk)
        error = np.abs(video[1:-1] - 0.5 * (video[:-2] + video[2:])).mean()
        out.append(float(1.0 - error / 255.0))
    return out


def dynamic_degree(frames: np.ndarray, fps: float) -> list[float]:
    out = []
    for chunk in seconds_of(frames, fps):
        if len(chunk) < 2:
            out.append(0.0)
            continue
        change = np.abs(np.diff(_float(chunk), axis=0)).max(axis=-1)  # [T-1, H, W]
        top = np.percentile(change.reshape(len(change), -1), MOTION_PERCENTILE, axis=1)
        out.append(float((top > MOTION_THRESHOLD).mean()))
    return out


def _laplacian_variance(luma: np.ndarray) -> np.ndarray:
    """luma: [T, H, W] -> [T], the variance of the 4-neighbour Laplacian inside the border."""
    lap = (
        luma[:, :-2, 1:-1] + luma[:, 2:, 1:-1] + luma[:, 1:-1, :-2] + luma[:, 1:-1, 2:] - 4.0 * luma[:, 1:-1, 1:-1]
    )
    return lap.reshape(len(luma), -1).var(axis=1)


def sharpness(frames: np.ndarray, fps: float) -> list[float]:
    return [float(_laplacian_variance(_float(chunk) @ LUMA).mean()) for chunk in seconds_of(frames, fps)]


def color_drift(frames: np.ndarray, fps: float) -> list[float]:
    means = [_float(chunk).mean(axis=(0, 1, 2)) / 255.0 for chunk in seconds_of(frames, fps)]
    return [float(np.linalg.norm(m - means[0]) / np.sqrt(3.0)) for m in means] if means else []


def brightness_drift(frames: np.ndarray, fps: float) -> list[float]:
    means = [float((_float(chunk) @ LUMA).mean() / 255.0) for chunk in seconds_of(frames, fps)]
    return [abs(m - means[0]) for m in means] if means else []


WEIGHT_FREE: dict[str, Callable[[np.ndarray, float], list[float]]] = {
    "temporal_flickering": temporal_flickering,
    "motion_smoothness": motion_smoothness,
    "dynamic_degree": dynamic_degree,
    "sharpness": sharpness,
    "color_drift": color_drift,
    "brightness_drift": brightness_drift,
}

LOWER_IS_BETTER = {"color_drift", "brightness_drift"}


def weight_free_metrics(frames: np.ndarray, fps: float) -> dict[str, list[float]]:
    return {name: fn(frames, fps) for name, fn in WEIGHT_FREE.items()}


class ClipScorer:
    """CLIP text alignment and consistency with the first frame, from a local open_clip checkpoint only.

    Random-weight CLIP scores mean nothing, so the evaluation computes these only when a checkpoint is
    configured, and otherwise says so once and leaves them out.
    """

    def __init__(self, model, preprocess, tokenizer) -> None:
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer

    @classmethod
    def from_checkpoint(cls, checkpoint: str, arch: str = "ViT-B-32") -> ClipScorer:
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=checkpoint)
        return cls(model, preprocess, open_clip.get_tokenizer(arch))

    def _embed_frames(self, frames: np.ndarray):
        import torch
        from PIL import Image

        with torch.no_grad():
            batch = torch.stack([self.preprocess(Image.fromarray(frame)) for frame in frames])
            features = self.model.encode_image(batch)
        return features / features.norm(dim=-1, keepdim=True)

    def per_second(self, frames: np.ndarray, fps: float, caption: str) -> dict[str, list[float]]:
        import torch

        with torch.no_grad():
            text = self.model.encode_text(self.tokenizer([caption]))
        text = text / text.norm(dim=-1, keepdim=True)
        first = self._embed_frames(frames[:1])
        alignment, consistency = [], []
        for chunk in seconds_of(frames, fps):
            image = self._embed_frames(chunk[:: max(1, len(chunk) // 4)])
            alignment.append(float((image @ text.T).mean()))
            consistency.append(float((image @ first.T).mean()))
        return {"clip_text_alignment": alignment, "clip_first_frame_consistency": consistency}
