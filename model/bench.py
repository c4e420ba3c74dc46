"""Inference benchmark, as the paper measures it: a 10-second video, the teacher generating the whole clip at once
(bidirectional, 50 CFG steps) against the student streaming it chunk by chunk with the KV cache, both decoded to
pixels by the VAE; latency is the time to the first decoded frame (both decode their first latent frame alone:
the student's stream yields it before the rest of its chunk), throughput frames per second over the video.

The teacher on one training clip is kept as a second, shorter figure; beside them: the per-chunk cost over a
30-second rollout (``chunk_time_growth``: its last chunk against its first steady one, the window full and
evicting; earlier chunks see a smaller cache and chunk 0 has no cache pass to make), the no-cache reference (run
eagerly: without a cache every chunk is a new shape to compile), the VAE decode's share of a chunk and the DiT's
achieved FLOP/s against the machine's dense matmul rate (bf16 where the device has it). By default the DiT's blocks
and the VAE decoder are compiled, their compilation timed apart (``warmup_seconds``). ``main(argv) -> dict`` (the
``causvid bench inference`` command prints it as JSON). Random weights are enough: every figure is a wall-clock
time of the real computation, measured once in this process on this machine.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.dit import DiT
from model.precision import PRECISIONS, default_precision, for_inference, has_native_bf16
from model.presets import Preset, get_preset
from model.streaming import Chunk, stream, teacher_sample

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
TARGETS = {
    "latency_ratio": 200.0,
    "throughput_ratio": 20.0,
    "chunk_time_growth": 1.1,
    "matmul_fraction": 0.5,
    "vae_decode_fraction": 0.25,
    "student_fps": 200.0,
}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="causvid bench inference", description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--teacher-steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--guidance", type=float, default=None, help="default: the preset's")
    parser.add_argument("--video-seconds", type=float, default=10.0, help="length of the paper's comparison")
    parser.add_argument("--long-seconds", type=float, default=30.0, help="rollout for the per-chunk cost growth")
    parser.add_argument("--window", type=int, default=None, help="sliding window in chunks (default: preset's)")
    parser.add_argument("--reference-seconds", type=float, default=10.0, help="length of the no-cache rollout")
    parser.add_argument("--repeats", type=int, default=3, help="rollouts per length; per-chunk minimum is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=PRECISIONS, help="weights' dtype (default: bf16 where native)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compile",
        choices=("true", "false"),
        default="true",
        help="compile the DiT's blocks and the VAE decoder (default true; the compilation's seconds are reported "
        "apart, the way a streaming service pays them once at start-up)",
    )
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="wall: elapsed seconds; cpu: this process's CPU seconds (with --threads 1 the compute alone, for a "
        "machine shared with other work)",
    )
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(
    fn: Callable[[], Any], device: torch.device, repeats: int = 1, clock: Callable[[], float] = time.perf_counter
) -> tuple[float, Any]:
    """Best time of ``repeats`` calls (after one warm-up call) on ``clock``, and the last result."""
    out = fn()
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        start = clock()
        out = fn()
        _sync(device)
        best = min(best, clock() - start)
    return best, out


def matmul_rate(
    device: torch.device,
    n: int = 1024,
    dtype: torch.dtype = torch.float32,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Dense matmul FLOP/s of this machine: the best of a few ``n x n`` products."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds, _ = _timed(lambda: a @ b, device, repeats=5, clock=clock)
    return 2 * n**3 / seconds


def forward_flops(model: DiT, *args: Any, **kwargs: Any) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return int(counter.get_total_flops())


@dataclass
class _Models:
    preset: Preset
    dit: DiT
    vae: torch.nn.Module
    text: tuple[torch.Tensor, torch.Tensor]
    device: torch.device
    clock: Callable[[], float]


def _rollout(m: _Models, n: int, seed: int, **kw: Any) -> list[Chunk]:
    g = torch.Generator(device=m.device).manual_seed(seed)
    chunks = []
    for chunk in stream(
        m.dit,
        m.text,
        num_chunks=n,
        latent_shape=m.preset.latent_shape()[1:],
        schedule=m.preset.schedule(),
        timesteps=m.preset.student_timesteps,
        vae=m.vae,
        generator=g,
        clock=m.clock,
        first_frame_alone=True,
        **kw,
    ):
        _sync(m.device)
        chunks.append(chunk)
    return chunks


def _student(m: _Models, repeats: int, run: Callable[[], list[Chunk]]) -> dict[str, Any]:
    """Per-chunk minimum seconds (and decode seconds) over ``repeats`` rollouts, a chunk yielded in parts counted
    whole; the least time to the first frame (the first part)."""
    seconds: list[float] | None = None
    decode: list[float] | None = None
    first_frame = math.inf
    for _ in range(repeats):
        chunks = run()
        first_frame = min(first_frame, chunks[0].seconds)
        ends = {c.index: c.seconds for c in chunks}  # a chunk's last part ends it
        now = [ends[i] for i in sorted(ends)]
        now_decode = [sum(c.decode_seconds for c in chunks if c.index == i) for i in sorted(ends)]
        seconds = now if seconds is None else [min(a, b) for a, b in zip(seconds, now)]
        decode = now_decode if decode is None else [min(a, b) for a, b in zip(decode, now_decode)]
    assert seconds is not None and decode is not None
    frames = sum(c.video.shape[1] for c in chunks if c.video is not None)
    return {
        "chunks": len(seconds),
        "frames": frames,
        "video_seconds": frames / m.preset.fps,
        "wall_seconds": sum(seconds),
        "fps": frames / sum(seconds),
        "first_frame_latency_s": first_frame,
        "vae_decode_fraction": sum(decode) / sum(seconds),
        "chunk_seconds": seconds,
        "decode_seconds": decode,
    }


def _teacher(m: _Models, latent_frames: int, steps: int, guidance: float, seed: int) -> dict[str, Any]:
    """The whole clip at once: ``steps`` bidirectional CFG steps, then the VAE decode, its first latent frame alone
    as the student's; its first frame exists only after every step (timed once, after a one-step warm-up)."""
    _, c, h, w = m.preset.latent_shape()
    noise = torch.randn(1, latent_frames, c, h, w, device=m.device, generator=torch.Generator(m.device).manual_seed(seed))

    def run(num_steps: int) -> tuple[torch.Tensor, float]:
        """The video and the clock when its first frame was decoded."""
        traj = teacher_sample(m.dit, m.text, noise, m.preset.schedule(), num_steps=num_steps, guidance_scale=guidance)
        decoder = m.vae.stream_decoder()
        with torch.no_grad():
            first = decoder.push(traj.x0[:, :1])
            _sync(m.device)
            first_at = m.clock()
            return torch.cat([first, decoder.push(traj.x0[:, 1:])], dim=1), first_at

    run(1)
    _sync(m.device)
    start = m.clock()
    video, first_at = run(steps)
    _sync(m.device)
    seconds = m.clock() - start
    return {
        "steps": steps,
        "guidance_scale": guidance,
        "latent_frames": latent_frames,
        "frames": video.shape[1],
        "seconds": seconds,
        "first_frame_latency_s": first_at - start,
        "fps": video.shape[1] / seconds,
    }


def _dit_forward(m: _Models, eager: DiT, rate: float) -> dict[str, Any]:
    """FLOP/s of one teacher step's DiT forward (the CFG batch of 2 over a training clip) against ``rate``; the
    FLOPs are counted on ``eager``, the same network uncompiled."""
    f, c, h, w = m.preset.latent_shape()
    x2 = torch.randn(2, f, c, h, w, device=m.device)
    t2 = torch.full((2, f), 0.5, device=m.device)
    text2 = (torch.cat([m.text[0], m.text[0]]), torch.cat([m.text[1], m.text[1]]))
    flops = forward_flops(eager, x2, t2, *text2, mode="bidirectional")
    with torch.no_grad():
        seconds, _ = _timed(lambda: m.dit(x2, t2, *text2, mode="bidirectional"), m.device, repeats=5, clock=m.clock)
    return {
        "tokens": 2 * f * (h // m.preset.dit.patch[1]) * (w // m.preset.dit.patch[2]),
        "flops": flops,
        "seconds": seconds,
        "flops_per_s": flops / seconds,
        "matmul_flops_per_s": rate,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(list(argv or []))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = get_preset(args.preset)
    steps = args.teacher_steps or preset.teacher_steps
    guidance = preset.guidance_scale if args.guidance is None else args.guidance
    window = preset.window_chunks if args.window is None else args.window
    precision = args.precision or default_precision(device)
    torch.manual_seed(args.seed)
    model = preset.build_dit(device)
    model.initialize(adaln_zero=False)
    m = _Models(
        preset,
        for_inference(model, precision),
        for_inference(preset.build_vae(device), precision),
        (
            torch.randn(1, preset.text_len, preset.text_dim, device=device),
            torch.ones(1, preset.text_len, dtype=torch.bool, device=device),
        ),
        device,
        CLOCKS[args.clock],
    )

    compiled = args.compile == "true"
    eager = replace(m, dit=copy.deepcopy(m.dit), vae=copy.deepcopy(m.vae)) if compiled else m
    started = time.perf_counter()
    if compiled:
        m.dit.compile_blocks()
        m.vae.compile_decoder()
    _rollout(m, window + 2, args.seed, window_chunks=window)  # every cache length: compiled once each
    warmup_seconds = time.perf_counter() - started

    n_video = preset.chunks_for(args.video_seconds)
    student = _student(m, args.repeats, lambda: _rollout(m, n_video, args.seed, window_chunks=window))
    n_long = preset.chunks_for(args.long_seconds)
    long = _student(m, args.repeats, lambda: _rollout(m, n_long, args.seed, window_chunks=window))
    n_ref = preset.chunks_for(args.reference_seconds)
    # eager: without a cache every chunk is a new length, which a compiled network would recompile each time
    reference = _student(eager, 1, lambda: _rollout(eager, n_ref, args.seed, window_chunks=window, use_cache=False))
    teacher = _teacher(m, n_video * preset.chunk_frames, steps, guidance, args.seed)
    teacher_clip = _teacher(m, preset.clip_latent_frames, steps, guidance, args.seed)

    rates = {"fp32": matmul_rate(device, clock=m.clock)}
    if has_native_bf16(device):
        rates["bf16"] = matmul_rate(device, dtype=torch.bfloat16, clock=m.clock)
    dit_forward = _dit_forward(m, eager.dit, rates.get("bf16", rates["fp32"]))
    dit_forward["precision"] = precision
    return {
        "preset": preset.name,
        "device": str(device),
        "machine": {
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "matmul_flops_per_s": rates,
        },
        "precision": precision,
        "compiled": compiled,
        "warmup_seconds": warmup_seconds,
        "clock": args.clock,
        "dit_parameters": model.num_parameters(),
        "video_seconds": args.video_seconds,
        "teacher": teacher,
        "student": {
            "steps": len(preset.student_timesteps),
            "chunk_latent_frames": preset.chunk_frames,
            "window_chunks": window,
            **student,
        },
        "short_clip": {
            "teacher": teacher_clip,
            "latency_ratio": teacher_clip["first_frame_latency_s"] / student["first_frame_latency_s"],
            "throughput_ratio": student["fps"] / teacher_clip["fps"],
        },
        "long_rollout": {**long, "growth_from_first_chunk": long["chunk_seconds"][-1] / long["chunk_seconds"][0]},
        "reference_no_cache": {
            "chunks": n_ref,
            "chunk_seconds": reference["chunk_seconds"],
            "growth": reference["chunk_seconds"][-1] / reference["chunk_seconds"][0],
        },
        "dit_forward": dit_forward,
        "latency_ratio": teacher["first_frame_latency_s"] / student["first_frame_latency_s"],
        "throughput_ratio": student["fps"] / teacher["fps"],
        "chunk_time_growth": long["chunk_seconds"][-1] / long["chunk_seconds"][min(window + 1, n_long - 1)],
        "matmul_fraction": dit_forward["flops_per_s"] / dit_forward["matmul_flops_per_s"],
        "vae_decode_fraction": student["vae_decode_fraction"],
        "student_fps": student["fps"],
        "targets": TARGETS,
    }
