"""The `trajectories` stage: the teacher's CFG Euler ODE from seeded noise, kept at the student's timesteps.

A Ray Data job: each shard of prompts is one task for an actor pool whose actors load the teacher once. Prompt i
is row ``i mod N`` of the latents output (its caption and stored text embedding, referenced, not copied) with
noise seed ``noise_seed(seed, i)``; shard k holds prompts ``[k R, (k + 1) R)`` and is written atomically, so a
killed job resumes by computing only the missing shards and the result has exactly ``num_prompts`` rows.
Shards (`trajectories-<k>.parquet`), one row per prompt:

    prompt_index   int64    position in the prompt list (unique, 0..num_prompts-1)
    prompt_id      string   the latents row's clip_id
    caption, meta  string
    seed           int64    the noise seed
    text_uri       string   latents shard holding the text embedding
    text_row       int32    row in that shard
    timesteps      list<int32>    the student's timestep names (1000, 750, 500, 250)
    times          list<float32>  their flow times (shifted)
    states         binary   float32 little-endian, C order, [S, F, C, h, w]: the ODE state at each student time
    x0             binary   float32, [F, C, h, w]: the ODE's end point
    latent_frames, latent_channels, latent_height, latent_width   int32
    teacher        string   the teacher output's fingerprint
    teacher_run    string   its MLflow run id
    solver         string   "euler"
    ode_steps      int32    Euler steps (the student's times are merged into the grid)
    cfg_scale, shift  float32
    dtype          string   "float32"

`training_dataset(uri)` joins rows with their text embeddings for training.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from infra import storage, tracking
from infra.errors import UserError
from infra.shards import shard_dataset
from model.precision import resolve_precision
from model.presets import get_preset
from model.streaming import teacher_sample
from model.text import check_text_width
from model.weights import MODEL_FILE, load_model
from pipelines.shard_rows import read_text, read_trajectory_shards
from pipelines.workflow import StageContext

SOLVER = "euler"
DTYPE = "float32"
TRAJECTORY_SCHEMA = pa.schema(
    [
        ("prompt_index", pa.int64()),
        ("prompt_id", pa.string()),
        ("caption", pa.string()),
        ("meta", pa.string()),
        ("seed", pa.int64()),
        ("text_uri", pa.string()),
        ("text_row", pa.int32()),
        ("timesteps", pa.list_(pa.int32())),
        ("times", pa.list_(pa.float32())),
        ("states", pa.binary()),
        ("x0", pa.binary()),
        ("latent_frames", pa.int32()),
        ("latent_channels", pa.int32()),
        ("latent_height", pa.int32()),
        ("latent_width", pa.int32()),
        ("teacher", pa.string()),
        ("teacher_run", pa.string()),
        ("solver", pa.string()),
        ("ode_steps", pa.int32()),
        ("cfg_scale", pa.float32()),
        ("shift", pa.float32()),
        ("dtype", pa.string()),
    ]
)


def noise_seed(seed: int, prompt_index: int) -> int:
    """The noise seed of one prompt: independent of sharding, batching and which actor computes it."""
    return int(np.random.SeedSequence([seed, prompt_index]).generate_state(1)[0])


def prompt_noise(seed: int, latent_shape: Sequence[int]) -> torch.Tensor:
    """The initial noise ``[F, C, h, w]`` of a trajectory with this seed."""
    return torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(seed))


def shard_name(k: int) -> str:
    return f"trajectories-{k:05d}.parquet"


def list_prompts(latents_uri: str, num_prompts: int, seed: int) -> list[dict[str, Any]]:
    """The prompt list: latents rows in shard order, cycled to ``num_prompts``, each with its noise seed."""
    rows: list[dict[str, Any]] = []
    for uri in storage.parquet_files(latents_uri):
        table = storage.read_parquet(uri).select(["clip_id", "caption", "meta"]).to_pydict()
        rows += [
            {"prompt_id": cid, "caption": cap, "meta": meta, "text_uri": uri, "text_row": row}
            for row, (cid, cap, meta) in enumerate(zip(table["clip_id"], table["caption"], table["meta"]))
        ]
    if not rows:
        raise FileNotFoundError(f"{latents_uri} holds no latent rows to take prompts from")
    return [{**rows[i % len(rows)], "prompt_index": i, "seed": noise_seed(seed, i)} for i in range(num_prompts)]


class TeacherSolver:
    """Ray Data actor: loads the teacher once, solves whole prompt shards and writes each atomically."""

    def __init__(self, teacher_uri: str, output_uri: str, settings: Mapping[str, Any], threads: int | None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if settings["use_gpu"] and torch.cuda.is_available() else "cpu")
        self.teacher = load_model(teacher_uri, mode="bidirectional").to(self.device)
        self.preset = get_preset(settings["preset"])
        self.output_uri = output_uri
        self.settings = dict(settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[int]] = {"shard": [], "rows": []}
        for shard, encoded in zip(batch["shard"].tolist(), batch["prompts"].tolist()):
            prompts = json.loads(encoded)
            rows: list[dict[str, Any]] = []
            for start in range(0, len(prompts), self.settings["batch_size"]):
                rows += self.solve(prompts[start : start + self.settings["batch_size"]])
            storage.write_parquet(storage.join(self.output_uri, shard_name(shard)), pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA))
            out["shard"].append(shard)
            out["rows"].append(len(rows))
        return {k: np.asarray(v) for k, v in out.items()}

    def solve(self, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        s = self.settings
        emb, mask = read_text([(p["text_uri"], p["text_row"]) for p in prompts])
        shape = self.preset.latent_shape()
        noise = torch.stack([prompt_noise(p["seed"], shape) for p in prompts]).to(self.device)
        bf16 = resolve_precision(s["precision"], self.device) == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            trajectory = teacher_sample(
                self.teacher,
                (torch.from_numpy(emb).to(self.device), torch.from_numpy(mask).to(self.device)),
                noise,
                self.preset.schedule(),
                num_steps=s["ode_steps"],
                guidance_scale=s["cfg_scale"],
                record_timesteps=self.preset.student_timesteps,
            )
        states = trajectory.states.transpose(0, 1).float().cpu().numpy()  # [B, S, F, C, h, w]
        x0 = trajectory.x0.float().cpu().numpy()
        return [
            {
                **{k: p[k] for k in ("prompt_index", "prompt_id", "caption", "meta", "seed", "text_uri", "text_row")},
                "timesteps": list(self.preset.student_timesteps),
                "times": trajectory.times.tolist(),
                "states": np.ascontiguousarray(states[i], dtype="<f4").tobytes(),
                "x0": np.ascontiguousarray(x0[i], dtype="<f4").tobytes(),
                "latent_frames": shape[0],
                "latent_channels": shape[1],
                "latent_height": shape[2],
                "latent_width": shape[3],
                "teacher": s["teacher"],
                "teacher_run": s["teacher_run"],
                "solver": SOLVER,
                "ode_steps": s["ode_steps"],
                "cfg_scale": s["cfg_scale"],
                "shift": self.preset.shift,
                "dtype": DTYPE,
            }
            for i, p in enumerate(prompts)
        ]


def training_dataset(uri: str) -> ray.data.Dataset:
    """Trajectory rows joined with their text embeddings, for `iter_torch_batches` (one block per shard)."""
    return shard_dataset(uri, read_trajectory_shards, "trajectory")


def check_complete(output_uri: str, shards: int, num_prompts: int) -> int:
    """Rows written in the stage's `shards` shards, after checking that every prompt index appears exactly once."""
    files = [storage.join(output_uri, shard_name(k)) for k in range(shards)]
    indices = np.concatenate(
        [storage.read_parquet(uri).column("prompt_index").to_numpy() for uri in files]
        or [np.zeros(0, np.int64)]
    )
    if len(indices) != num_prompts or not np.array_equal(np.sort(indices), np.arange(num_prompts)):
        raise RuntimeError(f"{output_uri}: {len(indices)} rows for {num_prompts} prompts, or duplicated prompt indices")
    return len(indices)


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.config.trajectories
    preset = get_preset(ctx.config.model.preset)
    teacher_manifest = storage.read_manifest(ctx.inputs["teacher"])
    teacher_run = str(teacher_manifest.get("mlflow_run_id") or "")
    cfg_scale = preset.guidance_scale if cfg.cfg_scale is None else cfg.cfg_scale
    if ctx.run_id:
        client = tracking.log_to_run(tracking.tracking_uri(ctx.config), ctx.run_id)
        client.set_tag(ctx.run_id, "causvid.teacher_run_id", teacher_run)
        client.set_tag(ctx.run_id, "causvid.teacher_fingerprint", teacher_manifest["fingerprint"])
        client.set_tag(ctx.run_id, "causvid.prompts_source", ctx.inputs["latents"])

    prompts = list_prompts(ctx.inputs["latents"], cfg.num_prompts, cfg.seed)
    width = read_text([(prompts[0]["text_uri"], prompts[0]["text_row"])])[0].shape[-1]
    try:
        check_text_width(width, preset.text_dim, embeddings=f"the caption embeddings of {ctx.inputs['latents']}",
                         model=f"preset {preset.name}'s teacher")
    except ValueError as err:
        raise UserError(str(err)) from None
    r = cfg.rows_per_shard
    jobs = [{"shard": k, "prompts": json.dumps(prompts[k * r : (k + 1) * r])} for k in range(-(-len(prompts) // r))]
    ctx.track_progress("shards", [shard_name(job["shard"]) for job in jobs])
    pending = [job for job in jobs if not ctx.done(shard_name(job["shard"]))]
    if pending:
        resource = "GPU" if cfg.use_gpu else "CPU"
        free = int(ray.available_resources().get(resource, 1)) or 1
        actors = min(len(pending), cfg.actors or free)
        settings = {
            "preset": ctx.config.model.preset,
            "ode_steps": cfg.ode_steps,
            "cfg_scale": cfg_scale,
            "batch_size": cfg.batch_size,
            "use_gpu": cfg.use_gpu,
            "precision": cfg.precision,
            "teacher": teacher_manifest["fingerprint"],
            "teacher_run": teacher_run,
        }
        dataset = ray.data.from_items(pending, override_num_blocks=len(pending)).map_batches(
            TeacherSolver,
            fn_constructor_kwargs={
                "teacher_uri": storage.join(ctx.inputs["teacher"], MODEL_FILE),
                "output_uri": ctx.output_uri,
                "settings": settings,
                "threads": None if cfg.use_gpu else 1,
            },
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=0 if cfg.use_gpu else 1,
            num_gpus=1 if cfg.use_gpu else 0,
        )
        dataset.materialize()
    rows = check_complete(ctx.output_uri, len(jobs), cfg.num_prompts)
    return {
        "counts": {"rows": rows, "shards": len(jobs), "shards_computed": len(pending), "shards_skipped": len(jobs) - len(pending)},
        "summary": {
            "teacher": teacher_manifest["fingerprint"],
            "teacher_run": teacher_run,
            "prompts_source": ctx.inputs["latents"],
            "solver": SOLVER,
            "ode_steps": cfg.ode_steps,
            "cfg_scale": cfg_scale,
            "shift": preset.shift,
            "student_timesteps": ",".join(map(str, preset.student_timesteps)),
            "latent_shape": "x".join(map(str, preset.latent_shape())),
        },
        "files": [shard_name(job["shard"]) for job in jobs],
    }
