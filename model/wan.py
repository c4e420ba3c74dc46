"""Wan2.1 through diffusers: its transformer converted into our DiT, its VAE behind our VAE's interface.

:func:`dit_from_diffusers` maps every tensor of a ``WanTransformer3DModel`` onto a ``wan2.1``-architecture
:class:`~model.dit.DiT` (renames, two reshapes and one row permutation) and fails if any tensor is left over, so
the bidirectional forward ``dit(x [B, F, C, H, W], t [B], text)`` equals ``transformer(x as [B, C, F, H, W],
timestep=1000 t, text)``. :class:`WanVAE` wraps ``AutoencoderKLWan``: normalised latents ``[B, F, C, h, w]`` in and
out (its ``latents_mean`` / ``latents_std``), and chunk-by-chunk streaming through diffusers' own causal caches.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from model.dit import DiT, DiTConfig
from model.precision import weights_dtype
from model.vae import CausalFrames, LatentNormalization

WAN_TEXT_LEN = 512
"""Wan's pipeline pads every caption (and the empty prompt) to 512 UMT5 tokens."""

_DIT_KEYS: tuple[tuple[str, str], ...] = (
    (r"patch_embedding\.(weight|bias)", r"patch_embed.\1"),
    (r"condition_embedder\.time_embedder\.linear_1\.(weight|bias)", r"time_embed.0.\1"),
    (r"condition_embedder\.time_embedder\.linear_2\.(weight|bias)", r"time_embed.2.\1"),
    (r"condition_embedder\.time_proj\.(weight|bias)", r"time_proj.1.\1"),
    (r"condition_embedder\.text_embedder\.linear_1\.(weight|bias)", r"text_embed.0.\1"),
    (r"condition_embedder\.text_embedder\.linear_2\.(weight|bias)", r"text_embed.2.\1"),
    (r"blocks\.(\d+)\.attn1\.to_(q|k|v)\.(weight|bias)", r"blocks.\1.self_attn.\2.\3"),
    (r"blocks\.(\d+)\.attn1\.to_out\.0\.(weight|bias)", r"blocks.\1.self_attn.o.\2"),
    (r"blocks\.(\d+)\.attn1\.norm_(q|k)\.weight", r"blocks.\1.self_attn.norm_\2.weight"),
    (r"blocks\.(\d+)\.attn2\.to_(q|k|v)\.(weight|bias)", r"blocks.\1.cross_attn.\2.\3"),
    (r"blocks\.(\d+)\.attn2\.to_out\.0\.(weight|bias)", r"blocks.\1.cross_attn.o.\2"),
    (r"blocks\.(\d+)\.attn2\.norm_(q|k)\.weight", r"blocks.\1.cross_attn.norm_\2.weight"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm3.\2"),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj\.(weight|bias)", r"blocks.\1.ffn.0.\2"),
    (r"blocks\.(\d+)\.ffn\.net\.2\.(weight|bias)", r"blocks.\1.ffn.2.\2"),
    (r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
    (r"scale_shift_table", r"head_modulation"),
    (r"proj_out\.(weight|bias)", r"head.\1"),
)
OWN_DIT_KEYS = ("null_text_embedding",)
"""Our tensors that Wan's transformer does not hold: the null caption is the encoded empty prompt."""


def read_diffusers_folder(path: str | Path, name: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config, state dict)`` of a diffusers ``save_pretrained`` folder, or of subfolder ``name`` of a pipeline
    folder; the weights are safetensors, in one file or in shards."""
    from safetensors.torch import load_file

    folder = Path(path)
    if (folder / name / "config.json").is_file():
        folder = folder / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no diffusers config.json in {path} or {Path(path) / name}")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    state: dict[str, Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return json.loads((folder / "config.json").read_text()), state


def dit_config_from_diffusers(config: dict[str, Any], *, text_len: int = WAN_TEXT_LEN, **overrides: Any) -> DiTConfig:
    """Our ``wan2.1`` DiT config for a ``WanTransformer3DModel`` config (text-to-video only)."""
    unsupported = {
        "image_dim": config.get("image_dim"),
        "added_kv_proj_dim": config.get("added_kv_proj_dim"),
        "pos_embed_seq_len": config.get("pos_embed_seq_len"),
    }
    if any(v is not None for v in unsupported.values()):
        raise ValueError(f"only text-to-video Wan transformers convert; this one has {unsupported}")
    if not config.get("cross_attn_norm", True) or config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError("only Wan transformers with cross_attn_norm and rms_norm_across_heads convert")
    out_channels = config.get("out_channels") or config["in_channels"]
    if out_channels != config["in_channels"]:
        raise ValueError(f"in_channels {config['in_channels']} != out_channels {out_channels}")
    fields = dict(
        in_channels=config["in_channels"],
        dim=config["num_attention_heads"] * config["attention_head_dim"],
        depth=config["num_layers"],
        heads=config["num_attention_heads"],
        ffn_dim=config["ffn_dim"],
        text_dim=config["text_dim"],
        freq_dim=config["freq_dim"],
        patch=tuple(config["patch_size"]),
        eps=config.get("eps", 1e-6),
        null_text_len=text_len,
        architecture="wan2.1",
    )
    return DiTConfig(**{**fields, **overrides})


def convert_dit_state(wan_state: dict[str, Tensor], cfg: DiTConfig) -> dict[str, Tensor]:
    """Our DiT's state dict from a Wan transformer's; every Wan tensor is used exactly once."""
    out: dict[str, Tensor] = {}
    left = []
    for key, value in wan_state.items():
        for pattern, target in _DIT_KEYS:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, target, key)] = value
                break
        else:
            left.append(key)
    if left:
        raise ValueError(f"Wan tensors with no place in our DiT: {sorted(left)}")
    for key in [k for k in out if k.endswith("modulation")]:
        out[key] = out[key].unsqueeze(1)  # [1, n, D] -> [1, 1, n, D]: one row per latent frame
    _, ph, pw = cfg.patch
    c = cfg.in_channels
    for key in ("head.weight", "head.bias"):  # Wan's rows are (p, q, c), ours (c, p, q)
        out[key] = rearrange(out[key], "(p q c) ... -> (c p q) ...", p=ph, q=pw, c=c)
    return out


def dit_from_diffusers(transformer_or_path: nn.Module | str | Path, **overrides: Any) -> DiT:
    """Our DiT from a ``WanTransformer3DModel`` or its ``save_pretrained`` folder (or a pipeline folder).

    ``overrides`` set our own fields (``chunk_frames``, ``attention_mode``, ``null_text_len``). The null caption
    starts at zeros; :meth:`DiT.set_null_text` installs the encoded empty prompt.
    """
    if isinstance(transformer_or_path, nn.Module):
        config, wan_state = dict(transformer_or_path.config), transformer_or_path.state_dict()
    else:
        config, wan_state = read_diffusers_folder(transformer_or_path, "transformer")
    text_len = overrides.pop("text_len", WAN_TEXT_LEN)
    cfg = dit_config_from_diffusers(config, text_len=text_len, **overrides)
    with torch.device("meta"):
        dit = DiT(cfg)
    state = convert_dit_state({k: v.detach().float() for k, v in wan_state.items()}, cfg)
    missing = set(dit.state_dict()) - set(state) - set(OWN_DIT_KEYS)
    if missing:
        raise ValueError(f"our DiT tensors that Wan does not fill: {sorted(missing)}")
    state.update({k: torch.zeros_like(v, device="cpu") for k, v in dit.state_dict().items() if k in OWN_DIT_KEYS})
    dit.load_state_dict(state, strict=True, assign=True)
    dit.null_text_embedding.requires_grad_(False)
    return dit.eval()


class WanVAEConfig(CausalFrames):
    """The shape facts our stages read from a VAE's ``cfg`` (the temporal and spatial factors, latent channels)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.diffusers = dict(config)
        self.latent_channels = int(config["z_dim"])
        self.temporal_factor = 2 ** sum(bool(d) for d in config["temperal_downsample"])
        self.spatial_factor = 2 ** (len(config["dim_mult"]) - 1)


class WanVAE(LatentNormalization, nn.Module):
    """``AutoencoderKLWan`` with our VAE's interface: ``encode(video [B, T, 3, H, W]) -> latents [B, F, C, h, w]``
    normalised by ``latents_mean`` / ``latents_std``, ``decode`` back (unclamped), and streaming both ways."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.cfg = WanVAEConfig(dict(model.config))
        self.register_buffer("latent_mean", torch.tensor(model.config.latents_mean, dtype=torch.float32))
        self.register_buffer("latent_std", torch.tensor(model.config.latents_std, dtype=torch.float32))

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """Normalised posterior means ``[B, F, C, h, w]`` of ``video [B, 1 + 4n, 3, H, W]`` in [-1, 1]."""
        return self.stream_encoder().push(video)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Whole-clip decode ``[B, F, C, h, w] -> video [B, 1 + 4(F - 1), 3, H, W]`` (unclamped)."""
        return self.stream_decoder().push(latents)

    def stream_decoder(self) -> WanStreamingDecoder:
        return WanStreamingDecoder(self)

    def stream_encoder(self) -> WanStreamingEncoder:
        return WanStreamingEncoder(self)


def _causal_convs(module: nn.Module) -> int:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


class WanStreamingDecoder:
    """Decode latent frames as they arrive, one at a time through Wan's per-convolution caches, as
    ``AutoencoderKLWan.decode`` does over a whole clip: ``push(latents [B, n, C, h, w]) -> video [B, T_n, 3, H, W]``."""

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self.cache: list[Tensor | None] = [None] * _causal_convs(vae.model.decoder)
        self.started = False

    @torch.no_grad()
    def push(self, latents: Tensor) -> Tensor:
        model = self.vae.model
        raw = self.vae.denormalize(latents).to(weights_dtype(model))
        z = model.post_quant_conv(rearrange(raw, "b f c h w -> b c f h w"))
        out = []
        for i in range(z.shape[2]):
            first = not self.started
            out.append(model.decoder(z[:, :, i : i + 1], feat_cache=self.cache, feat_idx=[0], first_chunk=first))
            self.started = True
        return rearrange(torch.cat(out, dim=2), "b c t h w -> b t c h w").to(latents.dtype)


class WanStreamingEncoder:
    """Encode pixel frames as they arrive (the first push ``1 + 4n`` frames, later ones multiples of 4), as
    ``AutoencoderKLWan.encode`` does: the first frame alone, then groups of 4. Returns normalised posterior means."""

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self.cache: list[Tensor | None] = [None] * _causal_convs(vae.model.encoder)
        self.started = False

    @torch.no_grad()
    def push(self, video: Tensor) -> Tensor:
        model = self.vae.model
        x = rearrange(video.to(weights_dtype(model)), "b t c h w -> b c t h w")
        groups = []
        if not self.started:
            groups.append(x[:, :, :1])
            x = x[:, :, 1:]
            self.started = True
        tf = self.vae.cfg.temporal_factor
        if x.shape[2] % tf:
            raise ValueError(f"after the first frame the encoder takes multiples of {tf} frames, got {x.shape[2]}")
        groups.extend(x[:, :, i : i + tf] for i in range(0, x.shape[2], tf))
        out = [model.encoder(g, feat_cache=self.cache, feat_idx=[0]) for g in groups]
        h = model.quant_conv(torch.cat(out, dim=2))
        mean = h[:, : self.vae.cfg.latent_channels]
        return self.vae.normalize(rearrange(mean.to(video.dtype), "b c f h w -> b f c h w"))


def vae_from_diffusers(vae_or_path: nn.Module | str | Path) -> WanVAE:
    """Our VAE interface over an ``AutoencoderKLWan`` or its ``save_pretrained`` folder (or a pipeline folder)."""
    if isinstance(vae_or_path, nn.Module):
        return WanVAE(vae_or_path.float())
    return wan_vae_from_state(*read_diffusers_folder(vae_or_path, "vae"))


def wan_vae_from_state(config: dict[str, Any], state: dict[str, Tensor]) -> WanVAE:
    """A :class:`WanVAE` from an ``AutoencoderKLWan`` config and state dict (an imported teacher's VAE)."""
    from diffusers import AutoencoderKLWan

    model = AutoencoderKLWan.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    model.load_state_dict(state, strict=True)
    return WanVAE(model.float())
