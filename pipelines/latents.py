"""The `latents` stage: encode the clips Parquet into latents Parquet with the trained VAE (a Ray Data job).

Teacher training and distillation read latents, never pixels. One Ray Data actor per worker loads the VAE once;
each task encodes one clip shard into one latents shard of the same name, so an interrupted run skips the
shards already written. Latent shards (`latents-<clip shard>.parquet`), one row per clip:

    clip_id        string
    caption        string
    meta           string   JSON attributes from the source manifest (the shapes world's shape, colour, ...)
    latents        binary   float32 little-endian, C order, shape [F, C, h, w] (the posterior mean)
    latent_frames, latent_channels, latent_height, latent_width   int32
    text_emb       binary   float32 little-endian, shape [L, D], zero where masked
    text_mask      binary   uint8 (1 = token), shape [L]
    text_len, text_dim      int32

`training_dataset(uri)` gives the training arrays of every row as a Ray Dataset;
`pipelines.shard_rows.decode_latents(batch)` turns a batch of rows into arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from infra import storage
from infra.shards import shard_dataset
from model.vae import pixels_to_video
from model.weights import MODEL_FILE, load_model
from pipelines.shard_rows import decode_clips, read_latent_shards
from pipelines.workflow import StageContext

LATENT_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("caption", pa.string()),
        ("meta", pa.string()),
        ("latents", pa.binary()),
        ("latent_frames", pa.int32()),
        ("latent_channels", pa.int32()),
        ("latent_height", pa.int32()),
        ("latent_width", pa.int32()),
        ("text_emb", pa.binary()),
        ("text_mask", pa.binary()),
        ("text_len", pa.int32()),
        ("text_dim", pa.int32()),
    ]
)


def latent_rows(
    clip_ids: Sequence[str],
    captions: Sequence[str],
    metas: Sequence[str],
    latents: np.ndarray,
    text_emb: np.ndarray,
    text_mask: np.ndarray,
) -> list[dict[str, Any]]:
    """Rows of the latents schema.  latents: [B, F, C, h, w] float32, text_emb: [B, L, D], text_mask: [B, L]."""
    rows = []
    for i in range(len(clip_ids)):
        z = np.ascontiguousarray(latents[i], dtype="<f4")
        rows.append(
            {
                "clip_id": str(clip_ids[i]),
                "caption": str(captions[i]),
                "meta": str(metas[i]),
                "latents": z.tobytes(),
                "latent_frames": z.shape[0],
                "latent_channels": z.shape[1],
                "latent_height": z.shape[2],
                "latent_width": z.shape[3],
                "text_emb": np.ascontiguousarray(text_emb[i], dtype="<f4").tobytes(),
                "text_mask": np.asarray(text_mask[i], dtype=np.uint8).tobytes(),
                "text_len": text_emb.shape[1],
                "text_dim": text_emb.shape[2],
            }
        )
    return rows


def write_latent_shard(uri: str, rows: list[dict[str, Any]]) -> None:
    storage.write_parquet(uri, pa.Table.from_pylist(rows, schema=LATENT_SCHEMA))


def training_dataset(uri: str) -> ray.data.Dataset:
    """Latents ``[F, C, h, w]``, text embeddings ``[L, D]`` and masks ``[L]`` per row, for `iter_torch_batches`."""
    return shard_dataset(uri, read_latent_shards, "latent")


class ShardEncoder:
    """Ray Data actor: loads the VAE once, encodes whole clip shards into latent shards."""

    def __init__(self, vae_uri: str, output_uri: str, batch_size: int, threads: int) -> None:
        torch.set_num_threads(threads)
        self.vae = load_model(vae_uri)
        self.output_uri = output_uri
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {"shard": [], "rows": []}
        for shard_uri, name in zip(batch["uri"].tolist(), batch["name"].tolist()):
            table = storage.read_parquet(shard_uri)
            rows: list[dict[str, Any]] = []
            for start in range(0, table.num_rows, self.batch_size):
                part = table.slice(start, self.batch_size).to_pydict()
                clips = decode_clips(part)
                rows += latent_rows(
                    part["clip_id"],
                    clips["caption"],
                    part["meta"],
                    encode_frames(self.vae, clips["frames"]),
                    clips["text_emb"],
                    clips["text_mask"],
                )
            write_latent_shard(storage.join(self.output_uri, name), rows)
            out["shard"].append(name)
            out["rows"].append(len(rows))
        return {k: np.asarray(v) for k, v in out.items()}


@torch.no_grad()
def encode_frames(vae: torch.nn.Module, frames: np.ndarray) -> np.ndarray:
    """uint8 RGB clips [B, T, H, W, 3] -> posterior-mean latents [B, F, C, h, w] float32."""
    return vae.encode(pixels_to_video(frames)).float().numpy()


def latent_shard_name(clip_shard_uri: str) -> str:
    return "latents-" + clip_shard_uri.rstrip("/").split("/")[-1]


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.config.latents
    vae_uri = storage.join(ctx.inputs["vae"], MODEL_FILE)
    clip_shards = storage.parquet_files(ctx.inputs["clips"])
    jobs = [{"uri": uri, "name": latent_shard_name(uri)} for uri in clip_shards]
    ctx.track_progress("shards", [job["name"] for job in jobs])
    pending = [job for job in jobs if not ctx.done(job["name"])]
    if pending:
        workers = max(1, min(len(pending), int(ray.available_resources().get("CPU", 1))))
        dataset = ray.data.from_items(pending, override_num_blocks=len(pending)).map_batches(
            ShardEncoder,
            fn_constructor_kwargs={
                "vae_uri": vae_uri,
                "output_uri": ctx.output_uri,
                "batch_size": cfg.batch_size,
                "threads": 1,
            },
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
        )
        dataset.materialize()
    written = [ctx.output(job["name"]) for job in jobs]
    rows = sum(storage.read_parquet(uri).num_rows for uri in written)
    first = storage.read_parquet(written[0]).slice(0, 1).to_pydict() if written else {}
    shape = [int(first[k][0]) for k in ("latent_frames", "latent_channels", "latent_height", "latent_width")] if first else []
    return {
        "counts": {"clips": rows, "shards": len(written), "shards_encoded": len(pending), "shards_skipped": len(jobs) - len(pending)},
        "summary": {"vae": vae_uri, "latent_shape": "x".join(map(str, shape))},
        "files": [job["name"] for job in jobs],
    }
