"""The `vae` stage: train the causal 3D VAE on clips, then measure the round trip on held-out clips.

Training sees random ``train_frames``-frame windows of the clips (any frame can open a causal clip) with a
reconstruction MSE, a small KL and an L1 term on spatial gradients that keeps the objects' edges crisp. The last
``eval_clips`` clips (by clip id) never train; after training their whole-clip round trip gives the PSNR and the
oracle's colour / shape / motion / background accuracy against the clips' own attributes (and, as the
ceiling, the oracle's accuracy on the original pixels). Output: ``model.pt`` (the plain VAE), ``checkpoints/``,
``eval/roundtrip.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infra import storage, tracking
from infra.config import VaeConfig
from infra.shards import shard_dataset
from model.presets import get_preset
from model.vae import VAE, pixels_to_video, video_to_pixels
from model.weights import load_model, read_payload, save_model
from pipelines.oracle import attributes, oracle_alignment
from pipelines.shard_rows import decode_clips, read_clip_frames
from pipelines.workflow import StageContext
from training.harness import EngineSet, EngineSpec, Export, Models, TrainTask, after_training, fit, log_videos, stage_job

SAMPLE_CLIPS = 2


def spatial_gradients(video: Tensor) -> tuple[Tensor, Tensor]:
    return video[..., :, 1:] - video[..., :, :-1], video[..., 1:, :] - video[..., :-1, :]


class VaeLoss(nn.Module):
    """``forward(video [B, T, 3, H, W]) -> (loss, recon, kl, edge)``: the VAE's own losses plus the edge term."""

    def __init__(self, vae: VAE, kl_weight: float, edge_weight: float) -> None:
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight
        self.edge_weight = edge_weight

    def forward(self, video: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = self.vae(video)
        (rx, ry), (tx, ty) = spatial_gradients(out["video"]), spatial_gradients(video)
        edge = F.l1_loss(rx, tx) + F.l1_loss(ry, ty)
        loss = out["recon"] + self.kl_weight * out["kl"] + self.edge_weight * edge
        return loss, out["recon"], out["kl"], edge


def unwrap_vae(module: nn.Module) -> nn.Module:
    return module.vae


@dataclass
class VaeTask(TrainTask):
    preset: str
    lr: float
    weight_decay: float
    kl_weight: float
    edge_weight: float
    train_frames: int
    sample_frames: np.ndarray | None = None
    export: Export = Export(engine="vae", kind="vae", unwrap=unwrap_vae)

    def plain(self, name: str) -> nn.Module:
        return VaeLoss(get_preset(self.preset).build_vae(), self.kl_weight, self.edge_weight)

    def build(self) -> Models:
        return Models(engines={"vae": EngineSpec(self.plain("vae"), lr=self.lr, weight_decay=self.weight_decay)})

    def train_step(self, step: int, batch: dict[str, Tensor], engines: EngineSet, frozen: Mapping[str, nn.Module]) -> dict[str, Tensor | float]:
        frames = batch["frames"]
        length = min(self.train_frames, frames.shape[1])
        start = int(torch.randint(0, frames.shape[1] - length + 1, ()))
        engine = engines["vae"]
        loss, recon, kl, edge = engine(pixels_to_video(frames[:, start : start + length]))
        engines.optimize("vae", loss)
        recon = recon.detach()
        return {
            "loss": loss.detach(),
            "recon_mse": recon,
            "kl": kl.detach(),
            "edge_l1": edge.detach(),
            "psnr": -10 * torch.log10((recon / 4.0).clamp_min(1e-12)),
        }

    def samples(self, step: int, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module]) -> dict[str, np.ndarray]:
        if self.sample_frames is None:
            return {}
        recon = roundtrip(models["vae"].vae, self.sample_frames)
        return {f"clip{i}_orig_recon": np.concatenate([o, r], axis=2) for i, (o, r) in enumerate(zip(self.sample_frames, recon))}


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of an MSE measured on pixels scaled to [0, 1]."""
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


@torch.no_grad()
def roundtrip(vae: VAE, frames: np.ndarray, batch_size: int = 4) -> np.ndarray:
    """Encode (posterior mean) and decode uint8 clips ``[B, T, H, W, 3]``; same layout back."""
    out = []
    for start in range(0, len(frames), batch_size):
        video = pixels_to_video(frames[start : start + batch_size])
        out.append(video_to_pixels(vae.decode(vae.encode(video))))
    return np.concatenate(out)


def clip_dataset(clips_uri: str, holdout: frozenset[str]) -> ray.data.Dataset:
    """Training clips as ``frames`` rows, one block per shard."""
    return shard_dataset(clips_uri, read_clip_frames, "clip", holdout=holdout)


def heldout_rows(clips_uri: str, count: int) -> dict[str, list[Any]]:
    """The last ``count`` clips by clip id (frames, meta, ...), never trained on."""
    files = storage.parquet_files(clips_uri)
    ids = pa.concat_tables([storage.read_parquet(f).select(["clip_id"]) for f in files])["clip_id"].to_pylist()
    chosen = set(sorted(ids)[-count:])
    tables = []
    for f in files:
        table = storage.read_parquet(f)
        keep = [i for i, clip_id in enumerate(table["clip_id"].to_pylist()) if clip_id in chosen]
        if keep:
            tables.append(table.take(keep))
    return pa.concat_tables(tables).sort_by("clip_id").to_pydict()


def measure_latent_stats(model_uri: str, clips_uri: str, holdout: frozenset[str], count: int) -> dict[str, list[float]]:
    """Set the trained VAE's per-channel latent mean and std from up to ``count`` training clips and rewrite its
    weights file; the statistics make every later stage's latents unit-variance (see ``model.vae``)."""
    payload = read_payload(model_uri)
    vae: VAE = load_model(model_uri)
    raw, seen = [], 0
    for uri in storage.parquet_files(clips_uri):
        frames = read_clip_frames({"uri": [uri]}, holdout)["frames"][: count - seen]
        with torch.no_grad():
            for start in range(0, len(frames), 4):
                raw.append(vae.encode_raw(pixels_to_video(frames[start : start + 4])))
        seen += len(frames)
        if seen >= count:
            break
    vae.set_latent_stats(torch.cat(raw))
    save_model(model_uri, vae, kind="vae", preset=payload["preset"], step=payload["step"], extra=payload["extra"])
    return {"latent_mean": vae.latent_mean.tolist(), "latent_std": vae.latent_std.tolist(), "clips": seen}


def evaluate_roundtrip(model_uri: str, rows: dict[str, list[Any]]) -> dict[str, Any]:
    """PSNR and oracle accuracy of the whole-clip round trip of held-out clips."""
    frames = decode_clips(rows)["frames"]
    recon = roundtrip(load_model(model_uri), frames)
    mse = float(np.mean((recon.astype(np.float64) - frames.astype(np.float64)) ** 2) / 255.0**2)
    expected = [attributes(m) for m in rows["meta"]]
    after = oracle_alignment(recon, expected)
    before = oracle_alignment(frames, expected)
    scores: dict[str, Any] = {"clips": len(frames), "psnr": psnr_from_mse(mse)}
    keys = [k for k in after if k.endswith("_accuracy")]
    scores.update({f"oracle_{k}": after[k] for k in keys})
    scores.update({f"oracle_original_{k}": before[k] for k in keys})
    if keys:
        scores["oracle_accuracy"] = float(np.mean([after[k] for k in keys]))
        scores["oracle_original_accuracy"] = float(np.mean([before[k] for k in keys]))
    scores["detected"] = after["detected"]
    return {"scores": scores, "videos": np.concatenate([frames[:4], recon[:4]], axis=3)}


def run(ctx: StageContext) -> dict[str, Any]:
    section: VaeConfig = ctx.config.vae
    preset_name = ctx.config.model.preset
    p = get_preset(preset_name)
    clips_uri = ctx.inputs["clips"]
    held = heldout_rows(clips_uri, section.eval_clips)
    holdout = frozenset(held["clip_id"])
    task = VaeTask(
        preset=preset_name,
        lr=section.lr,
        weight_decay=section.weight_decay,
        kl_weight=section.kl_weight,
        edge_weight=section.edge_weight,
        train_frames=section.train_frames,
        sample_frames=decode_clips({k: v[:SAMPLE_CLIPS] for k, v in held.items()})["frames"],
    )
    uri = tracking.tracking_uri(ctx.config)
    result = fit(stage_job(ctx, section, task, clip_dataset(clips_uri, holdout)))
    measure = after_training(measure_latent_stats, section)
    stats = ray.get(measure.remote(result.model_uri, clips_uri, holdout, section.stats_clips))
    storage.write_json(ctx.output("eval", "latent_stats.json"), stats)
    tracking.log_file_artifact(uri, ctx.run_id, result.model_uri, "weights")
    evaluate = after_training(evaluate_roundtrip, section)
    out = ray.get(evaluate.remote(result.model_uri, held))
    scores = out["scores"]
    storage.write_json(ctx.output("eval", "roundtrip.json"), scores)
    log_videos(uri, ctx.run_id, out["videos"], p.fps, "eval_roundtrip")
    summary: dict[str, Any] = {"model": result.model_uri, "train_seconds": round(result.seconds, 1)}
    summary.update({k: v for k, v in scores.items() if isinstance(v, float)})
    summary.update({f"final_{k}": v for k, v in result.metrics.items() if k in ("loss", "samples_per_s", "peak_mem_mb")})
    return {"counts": {"steps": result.steps, "heldout_clips": scores["clips"]}, "summary": summary}
