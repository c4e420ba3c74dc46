"""A tiny world for the distillation and evaluation stages: latents, a VAE and two teachers as complete stage outputs.

The networks are randomly initialised (tiny preset; the DiT without adaLN-zero, so its velocities are not zero)
and written where the workflow's plan expects the `latents`, `teacher` and `causal_teacher` outputs, so the real
`trajectories`, `ode_init`, `dmd` and `evaluate` stages run on them through the workflow, Ray Data and the training harness.
"""

from __future__ import annotations

import numpy as np
import torch

from infra import storage
from infra.config import PipelineConfig
from model.presets import get_preset
from model.weights import MODEL_FILE, save_model
from pipelines.latents import latent_rows, write_latent_shard
from pipelines.workflow import plan

TEACHER_RUN = "teacher-run-0001"
ROWS_PER_SHARD = 6
SHARDS = 2
FAST = (
    "ray.num_cpus=2",
    "trajectories.num_prompts=8",
    "trajectories.rows_per_shard=2",
    "trajectories.ode_steps=6",
    "trajectories.batch_size=2",
    "trajectories.cfg_scale=3.0",
    "ode_init.steps=3",
    "ode_init.batch_size=2",
    "ode_init.warmup_steps=0",
    "ode_init.log_every=1",
    "ode_init.checkpoint_every=2",
    "ode_init.shuffle_buffer=0",
    "ode_init.eval_prompts=2",
    "ode_init.eval_latent_frames=3",
    "ode_init.sample_prompts=0",
    "ode_init.eval_every=3",
    "ode_init.curve_prompts=2",
    "dmd.steps=2",
    "dmd.batch_size=2",
    "dmd.warmup_steps=0",
    "dmd.log_every=1",
    "dmd.critic_steps=3",
    "dmd.shuffle_buffer=0",
    "dmd.eval_prompts=0",
    "dmd.sample_prompts=0",
    "dmd.guidance_scale=3.0",
    "dmd.diagnostics_every=2",
    "dmd.eval_every=1",
    "dmd.curve_prompts=2",
    "dmd.eval_latent_frames=3",
    "evaluate.seconds=2",
    "evaluate.num_prompts=1",
    "evaluate.causal_teacher_steps=2",
)


def random_dit(seed: int, mode: str) -> torch.nn.Module:
    torch.manual_seed(seed)
    dit = get_preset("tiny").build_dit(attention_mode=mode)
    dit.initialize(adaln_zero=False)
    return dit.eval()


def write_world(config: PipelineConfig) -> None:
    """Latents, VAE, teacher and causal teacher outputs at this config's planned URIs (skipped if present)."""
    the_plan = plan(config)
    latents_uri, teacher_uri = the_plan.output_uri("latents"), the_plan.output_uri("teacher")
    causal_uri = the_plan.output_uri("causal_teacher")
    if storage.is_complete(causal_uri):
        return
    preset = get_preset("tiny")
    torch.manual_seed(0)
    vae_uri = storage.join(the_plan.output_uri("vae"), MODEL_FILE)
    save_model(vae_uri, preset.build_vae().eval(), kind="vae", preset="tiny", step=0)
    storage.write_manifest(the_plan.output_uri("vae"), {"stage": "vae", "fingerprint": the_plan.fingerprints["vae"], "summary": {}})
    rng = np.random.default_rng(0)
    frames, channels, height, width = preset.latent_shape()
    for shard in range(SHARDS):
        latents = rng.standard_normal((ROWS_PER_SHARD, frames, channels, height, width)).astype(np.float32)
        mask = np.zeros((ROWS_PER_SHARD, preset.text_len), bool)
        mask[:, :6] = True
        text = rng.standard_normal((ROWS_PER_SHARD, preset.text_len, preset.text_dim)).astype(np.float32) * mask[..., None]
        rows = latent_rows(
            [f"clip-{shard}-{i}" for i in range(ROWS_PER_SHARD)],
            [f"caption {shard} {i}" for i in range(ROWS_PER_SHARD)],
            ["{}"] * ROWS_PER_SHARD,
            latents,
            text,
            mask,
        )
        write_latent_shard(storage.join(latents_uri, f"latents-{shard}.parquet"), rows)
    storage.write_manifest(
        latents_uri,
        {"stage": "latents", "fingerprint": the_plan.fingerprints["latents"], "summary": {"vae": vae_uri}},
    )
    for name, uri, mode, run_id in (
        ("teacher", teacher_uri, "bidirectional", TEACHER_RUN),
        ("causal_teacher", causal_uri, "block_causal", "causal-run-0001"),
    ):
        save_model(storage.join(uri, MODEL_FILE), random_dit(1, mode), kind="dit", preset="tiny", step=0)
        manifest = {"stage": name, "fingerprint": the_plan.fingerprints[name], "inputs": {"latents": latents_uri}}
        storage.write_manifest(uri, {**manifest, "mlflow_run_id": run_id, "summary": {}})
