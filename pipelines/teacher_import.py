"""`causvid import-teacher`: a pretrained teacher (a diffusers Wan2.1 folder) as a complete `teacher` output.

The transformer is converted exactly (:func:`model.wan.dit_from_diffusers`) into the preset's chunking and caption
length, its null caption set to the preset's encoding of the empty prompt (Wan's unconditional branch), and written
as safetensors beside its config; the VAE, when the folder has one, likewise in ``vae/``, itself a complete `vae`
output (``--set vae.source=FOLDER/vae``, so the latents are Wan's). The folder is named by the weights'
digest, which is also its fingerprint, so the stages that read `--set teacher.source=FOLDER` re-run exactly when
the weights change. The import is an MLflow run whose model is the teacher (``models:/`` URIs resolve to it).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import mlflow
import torch

from infra import storage, tracking
from infra.config import PipelineConfig
from infra.errors import UserError
from model.dit import DiTConfig
from model.presets import Preset, get_preset
from model.wan import dit_from_diffusers, vae_from_diffusers
from model.weights import (
    FORMAT,
    MODEL_FILE,
    safetensors_files,
    weights_digest,
    weights_payload,
    write_safetensors,
)

FORMATS = ("diffusers",)
VAE_FOLDER = "vae"


def _check_fits(dit_cfg: DiTConfig, preset: Preset) -> None:
    """Every stage builds its DiTs from the preset, so the import must be the preset's DiT: one line when not."""
    wanted = dataclasses.replace(preset.dit, attention_mode=dit_cfg.attention_mode)
    differ = [f"{f.name} {getattr(dit_cfg, f.name)} (preset {getattr(wanted, f.name)})"
              for f in dataclasses.fields(DiTConfig) if getattr(dit_cfg, f.name) != getattr(wanted, f.name)]
    if differ:
        raise UserError(f"the imported transformer is not preset {preset.name}'s DiT: {', '.join(differ)}")


def import_teacher(config: PipelineConfig, source: str | Path, fmt: str = "diffusers") -> str:
    """Convert ``source`` into ``<root>/teacher/<digest>/`` (a complete teacher output) and return that URI."""
    if fmt not in FORMATS:
        raise UserError(f"unknown teacher format {fmt!r}; known: {', '.join(FORMATS)}")
    started = time.time()
    preset = get_preset(config.model.preset)
    dit = dit_from_diffusers(source, chunk_frames=preset.chunk_frames, text_len=preset.text_len)
    _check_fits(dit.cfg, preset)
    has_text_encoder = (Path(source) / "text_encoder").is_dir()
    encoder = preset.text_encoder_for(config.model.text_path or (str(source) if has_text_encoder else None))
    empty, empty_mask = encoder.encode([""])
    dit.set_null_text(empty[0], empty_mask[0])
    extra = {"source": str(source), "format": fmt}
    weights, meta = safetensors_files(weights_payload(dit, kind="dit", preset=preset.name, step=0, extra=extra))
    digest = weights_digest(weights)
    fingerprint = digest[:16]
    uri = storage.join(storage.normalize(config.storage.root), "teacher", fingerprint)
    if storage.is_complete(uri):
        return uri
    write_safetensors(uri, (weights, meta))
    run_id = _log_import(config, dit, uri, fingerprint, str(source))
    vae_uri = _import_vae(source, storage.join(uri, VAE_FOLDER), preset.name, extra, run_id)
    storage.write_manifest(uri, {
        "stage": "teacher",
        "fingerprint": fingerprint,
        "inputs": {},
        "config": {"source": str(source), "format": fmt},
        "counts": {"parameters": dit.num_parameters()},
        "summary": {"imported_from": str(source), "weights_sha256": digest, "vae": str(vae_uri)},
        "mlflow_run_id": run_id,
        "seconds": round(time.time() - started, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return uri


def _import_vae(source: str | Path, uri: str, preset: str, extra: dict[str, str], run_id: str) -> str | None:
    """The folder's VAE, when it has one, as a complete `vae` output inside the teacher's (for ``vae.source``)."""
    if not (Path(source) / VAE_FOLDER / "config.json").is_file():
        return None
    vae = vae_from_diffusers(source)
    payload = {"format": FORMAT, "kind": "wan_vae", "preset": preset, "config": dict(vae.cfg.diffusers), "step": 0,
               "state_dict": vae.model.state_dict(), "extra": extra}
    weights, meta = safetensors_files(payload)
    write_safetensors(uri, (weights, meta))
    storage.write_manifest(uri, {
        "stage": "vae", "fingerprint": weights_digest(weights)[:16], "inputs": {}, "config": extra,
        "counts": {}, "summary": {"imported_from": str(source)}, "mlflow_run_id": run_id,
    })
    return storage.join(uri, MODEL_FILE)


def _log_import(config: PipelineConfig, dit: torch.nn.Module, uri: str, fingerprint: str, source: str) -> str:
    """An MLflow run for the import: the source as a parameter, the output as a tag and a dataset, the DiT as model."""
    tracking.configure(config)
    tags = {"causvid.kind": "import", "causvid.stage": "teacher", "causvid.output": uri, "causvid.fingerprint": fingerprint}
    with mlflow.start_run(run_name="import-teacher", tags=tags) as run:
        mlflow.log_params({"teacher.source": source, "model.preset": config.model.preset})
        mlflow.pytorch.log_model(dit, name="teacher", serialization_format="pickle", pip_requirements=["torch", "einops"])
        tracking.log_dataset(uri, "teacher", context="output", fingerprint=fingerprint)
        return run.info.run_id
