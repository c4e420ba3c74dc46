"""`causvid bench train`: teacher-stage throughput and peak memory per worker, per ZeRO stage and worker count.

Each configuration is a real harness run (Ray Train + DeepSpeed) of the teacher task on random latents of the
preset's shape. The run takes ``2 * measure`` steps with one log window of ``measure`` steps; the first window
(worker start, DeepSpeed's first steps) is dropped and the second gives samples/s (all workers together) and
the peak memory of rank 0's worker (accelerator memory on GPU, resident set size on CPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from infra import storage
from infra.cluster import ensure_ray
from infra.config import load_config
from model.presets import get_preset
from pipelines.latents import latent_rows, training_dataset, write_latent_shard
from training.harness import TrainJob, fit
from training.flow_matching import TeacherTask


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="causvid bench train", description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--zero-stages", default="0,2,3", help="comma-separated ZeRO stages")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--batch-size", type=int, default=4, help="per worker")
    parser.add_argument("--measure", type=int, default=4, help="timed steps (after as many untimed ones)")
    parser.add_argument("--rows", type=int, default=64, help="random latent clips in the dataset")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    return parser.parse_args(argv)


def write_random_latents(folder: str, preset: str, rows: int, seed: int = 0) -> str:
    """A complete latents output of random clips with the preset's shapes (two shards)."""
    p = get_preset(preset)
    rng = np.random.default_rng(seed)
    shape = p.latent_shape()
    for shard, count in enumerate((rows - rows // 2, rows // 2)):
        latents = rng.standard_normal((count, *shape)).astype(np.float32)
        text = rng.standard_normal((count, p.text_len, p.text_dim)).astype(np.float32)
        mask = np.ones((count, p.text_len), bool)
        ids = [f"{shard}-{i}" for i in range(count)]
        rows_ = latent_rows(ids, ["random"] * count, ["{}"] * count, latents, text, mask)
        write_latent_shard(storage.join(folder, f"latents-{shard}.parquet"), rows_)
    storage.write_manifest(folder, {"stage": "latents", "summary": {"vae": None}})
    return folder


def measure(preset: str, latents_uri: str, out: str, zero: int, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(
        None,
        [
            f"teacher.zero_stage={zero}",
            f"teacher.num_workers={workers}",
            f"teacher.batch_size={args.batch_size}",
            f"teacher.steps={2 * args.measure}",
            f"teacher.log_every={args.measure}",
            f"teacher.checkpoint_every={2 * args.measure}",
            f"teacher.use_gpu={str(args.gpu).lower()}",
            "teacher.warmup_steps=0",
        ],
    )
    task = TeacherTask(
        preset=preset,
        mode="bidirectional",
        lr=1e-4,
        weight_decay=0.0,
        text_dropout=0.1,
        vae_uri=None,
        sample_text=None,
        sample_steps=1,
        guidance_scale=1.0,
    )
    started = time.time()
    result = fit(TrainJob("bench", out, config.teacher, task, training_dataset(latents_uri), preset))
    return {
        "zero_stage": zero,
        "workers": workers,
        "batch_size_per_worker": args.batch_size,
        "samples_per_s": round(result.metrics["samples_per_s"], 3),
        "samples_per_s_per_worker": round(result.metrics["samples_per_s"] / workers, 3),
        "peak_mem_mb": round(result.metrics["peak_mem_mb"], 1),
        "wall_s": round(time.time() - started, 1),
    }


def main(argv: list[str]) -> dict[str, Any]:
    args = parse(argv)
    p = get_preset(args.preset)
    ensure_ray(load_config(None, [f"ray.num_cpus={args.num_cpus}"] if args.num_cpus else []))
    runs = []
    with tempfile.TemporaryDirectory(prefix="causvid-bench-") as tmp:
        latents_uri = write_random_latents(str(Path(tmp, "latents")), args.preset, args.rows)
        for zero in (int(z) for z in args.zero_stages.split(",")):
            for workers in (int(w) for w in args.workers.split(",")):
                out = str(Path(tmp, f"zero{zero}-w{workers}"))
                runs.append(measure(args.preset, latents_uri, out, zero, workers, args))
    return {
        "benchmark": "train",
        "stage": "teacher",
        "preset": args.preset,
        "latent_shape": list(p.latent_shape()),
        "device": "gpu" if args.gpu else "cpu",
        "measured_steps": args.measure,
        "peak_mem": "GPU max allocated" if args.gpu else "worker process max RSS",
        "runs": runs,
    }
