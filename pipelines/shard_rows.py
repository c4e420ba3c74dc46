"""Rows of the clips, latents and trajectories shards as arrays: numpy, pyarrow and the video codec, no torch.

The training stages read their shards in a Ray task (`infra.shards.shard_dataset`) that imports the reader's
module before its first read. Kept here, that import takes 0.6-0.9 s and 96 MB on two idle cores; the stage
modules import torch, 7-8 s and 830 MB there, and about a minute at nice 15 beside busy training workers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from infra import storage
from pipelines.video import decode_clip

TEXT_COLUMNS = ("text_emb", "text_mask", "text_len", "text_dim")


def _text_arrays(batch: Mapping[str, Sequence[Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Text embeddings ``[B, L, D]`` float32 and masks ``[B, L]`` bool of rows that carry the text columns."""
    text_emb = np.stack(
        [np.frombuffer(e, dtype="<f4").reshape(int(n), int(d)) for e, n, d in zip(batch["text_emb"], batch["text_len"], batch["text_dim"])]
    )
    text_mask = np.stack([np.frombuffer(m, dtype=np.uint8).astype(bool) for m in batch["text_mask"]])
    return text_emb, text_mask


def _concat(uris: Sequence[Any]) -> pa.Table:
    return pa.concat_tables([storage.read_parquet(str(uri)) for uri in uris])


def decode_clips(batch: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """Arrays of a batch of clip rows (a Ray numpy batch or `table.to_pydict()`).

    -> frames [B, T, H, W, 3] uint8, text_emb [B, L, D] float32, text_mask [B, L] bool, caption list[str].
    """
    frames = np.stack([decode_clip(f) for f in batch["frames"]])
    text_emb, text_mask = _text_arrays(batch)
    return {"frames": frames, "text_emb": text_emb, "text_mask": text_mask, "caption": [str(c) for c in batch["caption"]]}


def read_clip_frames(batch: dict[str, np.ndarray], holdout: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Ray Data batch of clip-shard URIs -> ``frames [N, T, H, W, 3]`` uint8 of the clips not held out."""
    table = _concat(batch["uri"])
    keep = [i for i, clip_id in enumerate(table["clip_id"].to_pylist()) if clip_id not in holdout]
    if not keep:
        return {"frames": np.zeros((0, 1, 1, 1, 3), np.uint8)}
    return {"frames": decode_clips(table.take(keep).to_pydict())["frames"]}


def decode_latents(batch: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """Arrays of a batch of latent rows (a Ray numpy batch or `table.to_pydict()`).

    -> latents [B, F, C, h, w] float32, text_emb [B, L, D] float32, text_mask [B, L] bool, caption, meta.
    """
    shapes = zip(batch["latent_frames"], batch["latent_channels"], batch["latent_height"], batch["latent_width"])
    latents = np.stack([np.frombuffer(z, dtype="<f4").reshape(*map(int, shape)) for z, shape in zip(batch["latents"], shapes)])
    text_emb, text_mask = _text_arrays(batch)
    return {
        "latents": latents,
        "text_emb": text_emb,
        "text_mask": text_mask,
        "caption": [str(c) for c in batch["caption"]],
        "meta": [str(m) for m in batch["meta"]],
    }


def read_latent_shards(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data batch of latent shard URIs -> the numeric columns a training step needs, for every row."""
    arrays = decode_latents(_concat(batch["uri"]).to_pydict())
    return {"latents": arrays["latents"], "text_emb": arrays["text_emb"], "text_mask": arrays["text_mask"]}


def read_text(refs: Sequence[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Text embeddings ``[N, L, D]`` float32 and masks ``[N, L]`` bool of (latents shard, row) references."""
    by_shard: dict[str, list[int]] = defaultdict(list)
    for uri, row in refs:
        by_shard[uri].append(int(row))
    found: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    for uri, wanted in by_shard.items():
        rows = sorted(set(wanted))
        part = storage.read_parquet(uri).select(list(TEXT_COLUMNS)).take(pa.array(rows)).to_pydict()
        embs, masks = _text_arrays(part)
        found.update({(uri, row): (emb, mask) for row, emb, mask in zip(rows, embs, masks)})
    embs, masks = zip(*(found[(uri, int(row))] for uri, row in refs))
    return np.stack(embs), np.stack(masks)


def decode_trajectories(batch: Mapping[str, Sequence[Any]]) -> dict[str, np.ndarray]:
    """Arrays of trajectory rows: states ``[B, S, F, C, h, w]``, x0 ``[B, F, C, h, w]``, text_emb, text_mask."""
    shapes = list(zip(*(batch[k] for k in ("latent_frames", "latent_channels", "latent_height", "latent_width"))))
    states = np.stack(
        [np.frombuffer(z, dtype="<f4").reshape(len(ts), *map(int, shp)) for z, ts, shp in zip(batch["states"], batch["timesteps"], shapes)]
    )
    x0 = np.stack([np.frombuffer(z, dtype="<f4").reshape(*map(int, shp)) for z, shp in zip(batch["x0"], shapes)])
    emb, mask = read_text(list(zip(batch["text_uri"], batch["text_row"])))
    return {"states": states, "x0": x0, "text_emb": emb, "text_mask": mask}


def read_trajectory_shards(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data batch of trajectory shard URIs -> the training arrays of every row in those shards."""
    return decode_trajectories(_concat(batch["uri"]).to_pydict())
