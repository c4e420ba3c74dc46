"""Caption embedding for the clips stage: every distinct caption once, in one Ray task that loads the text encoder
once. The stage starts it before curation and hands its result to the curation tasks as an object reference, so
loading the encoder (most of its cost: importing torch and transformers, reading the weights) overlaps decoding."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ray

from model.presets import get_preset

CAPTIONS_PER_BATCH = 64

Embeddings = tuple[list[str], np.ndarray, np.ndarray]
"""(captions, emb [N, L, D] float32, mask [N, L] bool), row i of emb and mask being captions[i]'s."""


def embed_captions(captions: Sequence[str], preset: str, text_path: str | None) -> Embeddings:
    """Embed each distinct caption once, ``CAPTIONS_PER_BATCH`` at a time."""
    distinct = sorted(set(captions))
    shape = get_preset(preset)
    if not distinct:
        return [], np.zeros((0, shape.text_len, shape.text_dim), np.float32), np.zeros((0, shape.text_len), bool)
    encoder = shape.text_encoder_for(text_path)
    embs, masks = [], []
    for start in range(0, len(distinct), CAPTIONS_PER_BATCH):
        emb, mask = encoder.encode(distinct[start : start + CAPTIONS_PER_BATCH])
        embs.append(emb.float().numpy())
        masks.append(mask.numpy().astype(bool))
    return distinct, np.concatenate(embs), np.concatenate(masks)


_embedding_task = ray.remote(num_cpus=1)(embed_captions)


def start_embedding(captions: Sequence[str], preset: str, text_path: str | None) -> ray.ObjectRef:
    """:func:`embed_captions` as a Ray task of one CPU; returns the reference to its :data:`Embeddings`."""
    return _embedding_task.remote(list(captions), preset, text_path)
