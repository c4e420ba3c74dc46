"""Inference benchmark: the teacher's 50-step bidirectional CFG sampling of a clip against the student's 4-step
KV-cached streaming, plus the no-cache reference and the DiT's achieved FLOP/s against the machine's matmul rate.

``main(argv) -> dict`` (the ``causvid bench inference`` command prints it as JSON). Random weights are enough:
every figure is a wall-clock time of the real computation, measured once in this process on this machine.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.dit import DiT
from model.presets import Preset, get_preset
from model.streaming import Chunk, stream, teacher_sample

TARGETS = {"latency_ratio": 200.0, "throughput_ratio": 20.0, "chunk_time_growth": 1.2, "matmul_fraction": 0.5}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="causvid bench inference", description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--teacher-steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--guidance", type=float, default=None, help="default: the preset's")
    parser.add_argument("--seconds", type=float, nargs="+", default=[10.0, 30.0], help="rollout lengths")
    parser.add_argument("--window", type=int, default=None, help="sliding window in chunks (default: preset's)")
    parser.add_argument("--reference-seconds", type=float, default=10.0, help="length of the no-cache rollout")
    parser.add_argument("--repeats", type=int, default=1, help="rollouts per length; per-chunk minimum is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int = 1) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls (after one warm-up call) and the last result."""
    out = fn()
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def matmul_rate(device: torch.device, n: int = 1024, dtype: torch.dtype = torch.float32) -> float:
    """Dense matmul FLOP/s of this machine: the best of a few ``n x n`` products."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds, _ = _timed(lambda: a @ b, device, repeats=5)
    return 2 * n**3 / seconds


def forward_flops(model: DiT, *args: Any, **kwargs: Any) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return int(counter.get_total_flops())


def _rollout(preset: Preset, model: DiT, vae: torch.nn.Module, text: tuple, n: int, seed: int, **kw: Any) -> list[Chunk]:
    g = torch.Generator(device=text[0].device).manual_seed(seed)
    chunks = []
    for chunk in stream(
        model,
        text,
        num_chunks=n,
        latent_shape=preset.latent_shape()[1:],
        schedule=preset.schedule(),
        timesteps=preset.student_timesteps,
        vae=vae,
        generator=g,
        **kw,
    ):
        _sync(text[0].device)
        chunks.append(chunk)
    return chunks


def _best_rollout(repeats: int, run: Callable[[], list[Chunk]]) -> tuple[list[float], int, float]:
    """Per-chunk minimum seconds over repeats, frames produced, and the best time to the first frame."""
    best: list[float] | None = None
    frames = 0
    for _ in range(repeats):
        chunks = run()
        seconds = [c.seconds for c in chunks]
        best = seconds if best is None else [min(a, b) for a, b in zip(best, seconds)]
        frames = sum(c.video.shape[1] for c in chunks)
    assert best is not None
    return best, frames, best[0]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(list(argv or []))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = get_preset(args.preset)
    steps = args.teacher_steps or preset.teacher_steps
    guidance = preset.guidance_scale if args.guidance is None else args.guidance
    window = preset.window_chunks if args.window is None else args.window
    torch.manual_seed(args.seed)
    model = preset.build_dit(device)
    model.initialize(adaln_zero=False)
    model.eval()
    vae = preset.build_vae(device).eval()
    text = (
        torch.randn(1, preset.text_len, preset.text_dim, device=device),
        torch.ones(1, preset.text_len, dtype=torch.bool, device=device),
    )
    f, c, h, w = preset.latent_shape()
    noise = torch.randn(1, f, c, h, w, device=device)

    def teacher() -> torch.Tensor:
        traj = teacher_sample(model, text, noise, preset.schedule(), num_steps=steps, guidance_scale=guidance)
        with torch.no_grad():
            return vae.decode(traj.x0)

    teacher_seconds, video = _timed(teacher, device)
    teacher_frames = video.shape[1]

    rollouts: dict[str, Any] = {}
    for seconds in args.seconds:
        n = preset.chunks_for(seconds)
        per_chunk, frames, first = _best_rollout(
            args.repeats, lambda n=n: _rollout(preset, model, vae, text, n, args.seed, window_chunks=window)
        )
        rollouts[f"{seconds:g}s"] = {
            "chunks": n,
            "frames": frames,
            "video_seconds": frames / preset.fps,
            "wall_seconds": sum(per_chunk),
            "fps": frames / sum(per_chunk),
            "first_frame_latency_s": first,
            "chunk_seconds": per_chunk,
        }
    n_ref = preset.chunks_for(args.reference_seconds)
    ref_chunks, _, _ = _best_rollout(
        1, lambda: _rollout(preset, model, vae, text, n_ref, args.seed, window_chunks=window, use_cache=False)
    )

    # The DiT forward of one teacher step (CFG batch of 2 over the whole clip) and of one student step.
    x2 = torch.cat([noise, noise])
    t2 = torch.full((2, f), 0.5, device=device)
    text2 = (torch.cat([text[0], text[0]]), torch.cat([text[1], text[1]]))
    teacher_flops = forward_flops(model, x2, t2, *text2, mode="bidirectional")
    with torch.no_grad():
        teacher_fwd, _ = _timed(lambda: model(x2, t2, *text2, mode="bidirectional"), device, repeats=5)
    rate = matmul_rate(device)
    with torch.no_grad():
        chunk_latents = noise[:, : preset.chunk_frames]
        decoder = vae.stream_decoder()
        decoder.push(chunk_latents)
        decode_seconds, _ = _timed(lambda: decoder.push(chunk_latents), device, repeats=3)
    longest = rollouts[f"{max(args.seconds):g}s"]
    shortest = rollouts[f"{min(args.seconds):g}s"]
    teacher_latency = teacher_seconds
    teacher_fps = teacher_frames / teacher_seconds
    dit_rate = teacher_flops / teacher_fwd
    return {
        "preset": preset.name,
        "device": str(device),
        "machine": {
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "dit_parameters": model.num_parameters(),
        "teacher": {
            "steps": steps,
            "guidance_scale": guidance,
            "clip_latent_frames": f,
            "clip_frames": teacher_frames,
            "seconds": teacher_seconds,
            "first_frame_latency_s": teacher_latency,
            "fps": teacher_fps,
        },
        "student": {
            "steps": len(preset.student_timesteps),
            "chunk_latent_frames": preset.chunk_frames,
            "window_chunks": window,
            "vae_decode_seconds_per_chunk": decode_seconds,
            "rollouts": rollouts,
        },
        "reference_no_cache": {
            "chunks": n_ref,
            "chunk_seconds": ref_chunks,
            "growth": ref_chunks[-1] / ref_chunks[0],
        },
        "dit_forward": {
            "tokens": 2 * f * (h // preset.dit.patch[1]) * (w // preset.dit.patch[2]),
            "flops": teacher_flops,
            "seconds": teacher_fwd,
            "flops_per_s": dit_rate,
            "matmul_flops_per_s": rate,
        },
        "latency_ratio": teacher_latency / shortest["first_frame_latency_s"],
        "throughput_ratio": longest["fps"] / teacher_fps,
        "chunk_time_growth": longest["chunk_seconds"][-1] / longest["chunk_seconds"][0],
        "matmul_fraction": dit_rate / rate,
        "targets": TARGETS,
    }
