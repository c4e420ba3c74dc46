"""`causvid bench train`: teacher-stage throughput, model FLOP/s and peak memory per worker, for each precision,
eager or compiled, ZeRO stage and worker count.

Each configuration is a real harness run (Ray Train + DeepSpeed) of the teacher task on random latents of the
preset's shape. The run takes ``2 * measure`` steps with one log window of ``measure`` steps; the first window
(worker start, compilation, DeepSpeed's first steps) is dropped and the second gives samples/s (all workers
together) and the peak memory of rank 0's worker (accelerator memory on GPU, resident set size on CPU). Model
FLOP/s are samples/s times the FLOPs of one sample's forward and backward (counted by torch's FLOP counter), set
against this machine's dense matmul rate in bf16 and fp32, measured in the same run. bf16 is measured only where
the device computes it natively: elsewhere torch emulates it, orders of magnitude slower than fp32.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from torch.utils.flop_counter import FlopCounterMode

from infra import storage
from infra.cluster import ensure_ray
from infra.config import load_config
from model.bench import matmul_rate
from model.precision import has_native_bf16
from model.presets import get_preset
from pipelines.latents import latent_rows, training_dataset, write_latent_shard
from training.harness import TrainJob, fit
from training.flow_matching import TeacherTask


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="causvid bench train", description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--zero-stages", default="2", help="comma-separated ZeRO stages")
    parser.add_argument(
        "--precisions", default=None, help="comma-separated: fp32, bf16 (default: both where bf16 is native, else fp32)"
    )
    parser.add_argument("--compile", default="false,true", help="comma-separated: false (eager), true (torch.compile)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--batch-size", type=int, default=8, help="per worker")
    parser.add_argument("--measure", type=int, default=8, help="timed steps (after as many untimed ones)")
    parser.add_argument("--rows", type=int, default=64, help="random latent clips in the dataset")
    parser.add_argument(
        "--latent-frames", type=int, default=None, help="latent frames per clip (default: the preset's clip length)"
    )
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    return parser.parse_args(argv)


def write_random_latents(folder: str, preset: str, rows: int, latent_frames: int | None = None, seed: int = 0) -> str:
    """A complete latents output of random clips with the preset's shapes (two shards)."""
    p = get_preset(preset)
    rng = np.random.default_rng(seed)
    shape = p.latent_shape(latent_frames)
    for shard, count in enumerate((rows - rows // 2, rows // 2)):
        latents = rng.standard_normal((count, *shape)).astype(np.float32)
        text = rng.standard_normal((count, p.text_len, p.text_dim)).astype(np.float32)
        mask = np.ones((count, p.text_len), bool)
        ids = [f"{shard}-{i}" for i in range(count)]
        rows_ = latent_rows(ids, ["random"] * count, ["{}"] * count, latents, text, mask)
        write_latent_shard(storage.join(folder, f"latents-{shard}.parquet"), rows_)
    storage.write_manifest(folder, {"stage": "latents", "summary": {"vae": None}})
    return folder


def teacher_task(preset: str) -> TeacherTask:
    return TeacherTask(
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


def flops_per_sample(preset: str, batch_size: int, latent_frames: int | None = None) -> float:
    """FLOPs of one training sample: forward and backward of the teacher's loss on one batch, divided by it."""
    p = get_preset(preset)
    objective = teacher_task(preset).plain("dit")
    latents = torch.randn(batch_size, *p.latent_shape(latent_frames))
    text = torch.randn(batch_size, p.text_len, p.text_dim)
    mask = torch.ones(batch_size, p.text_len, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        objective(latents, text, mask).backward()
    return counter.get_total_flops() / batch_size


def measure(
    preset: str, latents_uri: str, out: str, run: dict[str, Any], args: argparse.Namespace, rates: dict[str, Any]
) -> dict[str, Any]:
    zero, workers = run["zero_stage"], run["workers"]
    config = load_config(
        None,
        [
            f"teacher.precision={run['precision']}",
            f"teacher.compile={str(run['compile']).lower()}",
            f"teacher.zero_stage={zero}",
            f"teacher.cpus_per_worker={max(1, rates['cpus'] // workers)}",
            f"teacher.num_workers={workers}",
            f"teacher.batch_size={args.batch_size}",
            f"teacher.steps={2 * args.measure}",
            f"teacher.log_every={args.measure}",
            f"teacher.checkpoint_every={2 * args.measure}",
            f"teacher.use_gpu={str(args.gpu).lower()}",
            "teacher.warmup_steps=0",
        ],
    )
    started = time.time()
    result = fit(TrainJob("bench", out, config.teacher, teacher_task(preset), training_dataset(latents_uri), preset))
    model_rate = result.metrics["samples_per_s"] * rates["flops_per_sample"]
    return {
        **run,
        "batch_size_per_worker": args.batch_size,
        "samples_per_s": round(result.metrics["samples_per_s"], 3),
        "model_flops_per_s": round(model_rate),
        "fraction_of_bf16_matmul": round(model_rate / rates["bf16"], 4) if rates["bf16"] else None,
        "fraction_of_fp32_matmul": round(model_rate / rates["fp32"], 4),
        "samples_per_s_per_worker": round(result.metrics["samples_per_s"] / workers, 3),
        "peak_mem_mb": round(result.metrics["peak_mem_mb"], 1),
        "wall_s": round(time.time() - started, 1),
    }


def main(argv: list[str]) -> dict[str, Any]:
    args = parse(argv)
    p = get_preset(args.preset)
    ensure_ray(load_config(None, [f"ray.num_cpus={args.num_cpus}"] if args.num_cpus else []))
    device = torch.device("cuda" if args.gpu else "cpu")
    native_bf16 = has_native_bf16(device)
    precisions = args.precisions or ("fp32,bf16" if native_bf16 else "fp32")
    rates = {
        "bf16": matmul_rate(device, n=2048, dtype=torch.bfloat16) if native_bf16 else None,
        "fp32": matmul_rate(device, n=2048, dtype=torch.float32),
        "flops_per_sample": flops_per_sample(args.preset, args.batch_size, args.latent_frames),
        "cpus": int(ray.cluster_resources().get("CPU", 1)),
    }
    grid = [
        {"precision": precision, "compile": compiled == "true", "zero_stage": int(zero), "workers": int(workers)}
        for precision in precisions.split(",")
        for compiled in args.compile.split(",")
        for zero in args.zero_stages.split(",")
        for workers in args.workers.split(",")
    ]
    runs = []
    with tempfile.TemporaryDirectory(prefix="causvid-bench-") as tmp:
        latents_uri = write_random_latents(str(Path(tmp, "latents")), args.preset, args.rows, args.latent_frames)
        for i, run in enumerate(grid):
            runs.append(measure(args.preset, latents_uri, str(Path(tmp, f"run{i}")), run, args, rates))
    return {
        "benchmark": "train",
        "stage": "teacher",
        "preset": args.preset,
        "latent_shape": list(p.latent_shape(args.latent_frames)),
        "device": "gpu" if args.gpu else "cpu",
        "measured_steps": args.measure,
        "peak_mem": "GPU max allocated" if args.gpu else "worker process max RSS",
        "native_bf16": native_bf16,
        "matmul_rate_bf16": round(rates["bf16"]) if rates["bf16"] else None,
        "matmul_rate_fp32": round(rates["fp32"]),
        "train_flops_per_sample": round(rates["flops_per_sample"]),
        "runs": runs,
    }
