"""Ray Train + DeepSpeed harness shared by every training stage.

A stage describes its work as a :class:`TrainTask`: which modules train (each becomes its own DeepSpeed engine,
so a DMD step can drive a generator and a critic), which frozen models ride along, and one training step over
a batch. :func:`fit` runs it under ``TorchTrainer`` with N workers and ZeRO stage 0-3, feeds batches from the
stage's Ray Dataset (``ray.train.get_dataset_shard``; read once and held in memory with ``cache_shard``, the
embedded default, else streamed every epoch), checkpoints every engine together with the step counter,
RNG states and data position through ``ray.train.report`` into ``<output>/checkpoints`` (local or s3://),
resumes from the latest checkpoint after a worker dies (``FailureConfig``) or when the stage is re-run, logs
from rank 0 to the stage's MLflow run and the driver's console (:mod:`training.progress`), and exports the final
weights as a plain PyTorch file (:mod:`model.weights`). :func:`stage_job` builds the run of a stage,
:func:`log_videos` logs sample videos.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.util.queue import Queue
from torch import Tensor, nn

from infra import storage, tracking
from infra.config import TrainConfig
from model import weights
from model.precision import precision_note, resolve_precision
from model.presets import get_preset
from pipelines.video import encode_mp4
from pipelines.workflow import StageContext
from training.progress import ConsoleRelay, step_line

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_TAG = "state"
TRAIN_RUN_NAME = "train"
log = logging.getLogger("causvid")

StepHook = Callable[[int, int, bool], None]
"""Called on every worker before each training step with ``(step, rank, resumed)``: fault injection, probes."""


@dataclass
class EngineSpec:
    """A module trained by its own DeepSpeed engine; ``forward`` usually returns the losses of one step."""

    module: nn.Module
    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Models:
    """What a task builds on each worker: trainable engines by name, and frozen models (never engines)."""

    engines: dict[str, EngineSpec]
    frozen: dict[str, nn.Module] = field(default_factory=dict)


@dataclass(frozen=True)
class Export:
    """Which engine's network becomes ``model.pt``: ``unwrap`` takes the engine's module to the plain network."""

    engine: str
    kind: str
    unwrap: Callable[[nn.Module], nn.Module] = lambda module: module


def unwrap_dit(module: nn.Module) -> nn.Module:
    """The DiT inside a stage's training wrapper (a loss module whose ``dit`` is the network), or the moving
    average of its weights where the wrapper keeps one (``ema``): what a stage scores, samples and exports."""
    average = getattr(module, "ema", None)
    return module.dit if average is None else average.module


class EngineSet(dict):
    """The DeepSpeed engines of a run by name; ``optimize`` is one backward + step that records the grad norm.

    Grad norms stay tensors until the harness logs them, so a step never waits on a host copy for bookkeeping.
    """

    def __init__(self, engines: Mapping[str, Any], zero_stage: int) -> None:
        super().__init__(engines)
        self.zero_stage = zero_stage
        self.grad_norms: dict[str, Tensor | float] = {}

    def optimize(self, name: str, loss: Tensor) -> None:
        engine = self[name]
        engine.backward(loss)
        if self.zero_stage == 0:
            grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
            self.grad_norms[name] = torch.stack(grads).norm() if grads else 0.0
        engine.step()
        if self.zero_stage > 0:
            norm = engine.get_global_grad_norm()
            self.grad_norms[name] = norm if norm is not None else float("nan")


class TrainTask:
    """A stage's training logic; constructed on the driver and shipped to every worker (keep it picklable)."""

    export: Export

    def build(self) -> Models:
        raise NotImplementedError

    def train_step(self, step: int, batch: dict[str, Tensor], engines: EngineSet, frozen: Mapping[str, nn.Module]) -> dict[str, Tensor | float]:
        """One optimisation step: call engines, then ``engines.optimize(name, loss)`` per engine; return scalars
        (detached tensors or floats, read on the host only when the harness logs them)."""
        raise NotImplementedError

    def batches_per_step(self) -> int:
        """Batches of ``batch_size`` rows that one training step draws (handed over as one batch, in order)."""
        return 1

    def plain(self, name: str) -> nn.Module:
        """A fresh plain copy of engine ``name``'s network (weights are loaded into it), for samples and export."""
        raise NotImplementedError

    def samples(self, step: int, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module]) -> dict[str, np.ndarray]:
        """Videos to log as MP4 (name -> ``[T, H, W, 3]`` uint8) from plain copies of the engines; rank 0 only."""
        return {}

    def figures(self, step: int) -> Mapping[str, np.ndarray]:
        """Images (name -> ``[H, W, 3]`` uint8) that the step just taken drew for MLflow; rank 0 logs them."""
        return {}

    def learning_curve(self, step: int, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module]) -> dict[str, float]:
        """Quality figures of plain copies of the engines every ``eval_every`` steps (logged as ``curve/...``)."""
        return {}


@dataclass
class TrainJob:
    """One training run of a stage: where it writes, its config section, its task and its data."""

    name: str
    output_uri: str
    section: TrainConfig
    task: TrainTask
    dataset: Any
    preset: str
    tracking_uri: str | None = None
    run_id: str | None = None
    fps: int = 12
    extra: dict[str, Any] = field(default_factory=dict)
    before_step: StepHook | None = None


def stage_job(ctx: StageContext, section: TrainConfig, task: TrainTask, dataset: Any, **extra: Any) -> TrainJob:
    """The training run of a stage: its output, MLflow run, preset and frame rate; ``extra`` (with the stage and its
    fingerprint) goes into the exported weights file."""
    preset = ctx.config.model.preset
    return TrainJob(
        name=ctx.name, output_uri=ctx.output_uri, section=section, task=task, dataset=dataset, preset=preset,
        tracking_uri=tracking.tracking_uri(ctx.config), run_id=ctx.run_id, fps=get_preset(preset).fps,
        extra={"stage": ctx.name, "fingerprint": ctx.fingerprint, **extra},
    )


@dataclass
class FitResult:
    model_uri: str
    steps: int
    metrics: dict[str, float]
    checkpoint_uri: str | None
    seconds: float


def after_training(fn: Callable[..., Any], section: TrainConfig) -> Any:
    """``fn`` as a Ray task holding the CPUs of every training worker (as torch threads) and one GPU: they are free
    once training ends, so a stage's final evaluation runs on all that trained."""
    import ray

    cpus = section.cpus_per_worker * section.num_workers

    def call(*args: Any, **kwargs: Any) -> Any:
        torch.set_num_threads(cpus)
        return fn(*args, **kwargs)

    return ray.remote(num_cpus=cpus, num_gpus=1 if section.use_gpu else 0)(call)


def deepspeed_config(section: TrainConfig, spec: EngineSpec, world_size: int) -> dict[str, Any]:
    """DeepSpeed config of one engine: ZeRO stage, AdamW (torch implementation), warmup (+ cosine), clipping.

    Weights, gradients and optimiser states stay fp32 at every precision: bf16 is the compute dtype of an
    autocast region around the step (see :func:`autocast`), which works alike on CPU and GPU.
    """
    warmup = min(section.warmup_steps, max(section.steps - 1, 0))
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": section.batch_size,
        "train_batch_size": section.batch_size * world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": section.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": section.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": spec.lr, "weight_decay": spec.weight_decay, "betas": list(spec.betas), "torch_adam": True},
        },
    }
    if section.lr_schedule == "cosine":
        config["scheduler"] = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": section.steps,
                "warmup_num_steps": max(warmup, 1),
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": section.min_lr_ratio,
                "warmup_type": "linear",
            },
        }
    elif warmup > 0:
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": spec.lr, "warmup_num_steps": warmup, "warmup_type": "linear"},
        }
    return config


def autocast(section: TrainConfig, device: torch.device) -> Any:
    """The compute-precision context of a training step: bf16 autocast (fp32 weights) or plain fp32."""
    bf16 = resolve_precision(section.precision, device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _scalars(values: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Host floats of a step's values (one device sync for all of them)."""
    return {k: float(v) for k, v in values.items()}


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on GPU, else the worker process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def full_state_dict(engine: Any, zero_stage: int, is_rank0: bool) -> dict[str, Tensor] | None:
    """The engine module's whole state dict on rank 0 (ZeRO-3 parameters are gathered); collective."""
    import deepspeed

    module = engine.module
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if is_rank0 else None
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if is_rank0 else None


def checkpoint_state_dict(checkpoint_dir: str | Path, engine: str, strip_prefix: str = "") -> dict[str, Tensor]:
    """fp32 weights of one engine from a local harness checkpoint folder, at any ZeRO stage.

    ZeRO 1-3 keep the fp32 weights in the optimiser partitions (DeepSpeed's ``zero_to_fp32`` gathers them);
    stage 0 keeps them whole in the model states. ``strip_prefix`` drops a wrapper's prefix (``"dit."``).
    """
    folder = Path(checkpoint_dir, engine)
    if list(Path(folder, CHECKPOINT_TAG).glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=CHECKPOINT_TAG)
    else:
        state = torch.load(Path(folder, CHECKPOINT_TAG, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)["module"]
    return {k[len(strip_prefix) :]: v.float() for k, v in state.items() if k.startswith(strip_prefix)}


def log_videos(
    tracking_uri: str | None, run_id: str | None, videos: Mapping[str, np.ndarray] | np.ndarray, fps: int, artifact_path: str
) -> None:
    """Each video ``[T, H, W, 3]`` uint8 as ``<name>.mp4`` under ``artifact_path`` of an existing MLflow run; videos
    in an array are named ``sample00``, ``sample01``, ..."""
    if not (tracking_uri and run_id):
        return
    from mlflow.tracking import MlflowClient

    named = videos if isinstance(videos, Mapping) else {f"sample{i:02d}": video for i, video in enumerate(videos)}
    client = MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        for name, frames in named.items():
            path = Path(tmp, f"{name}.mp4")
            path.write_bytes(encode_mp4(frames, fps))
            client.log_artifact(run_id, str(path), artifact_path)


class _Logger:
    """Rank 0's sink: console lines (to the driver, through its :class:`~training.progress.ConsoleRelay`) and
    MLflow metrics of the stage's run."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, console: Queue) -> None:
        self.run_id = run_id
        self.console_queue = console
        self.client = None
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=tracking_uri)

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items() if np.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=batch)

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Each image as ``<name>/step_<step>.png`` artifact of the stage's run."""
        if self.client is None:
            return
        for name, image in images.items():
            self.client.log_image(self.run_id, image, artifact_file=f"{name}/step_{step:07d}.png")

    def console(self, step: int, total: int, values: Mapping[str, float]) -> None:
        self.line(f"step {step}/{total}  {_shown(values)}")

    def progress(self, step: int, total: int, steps_per_s: float, values: Mapping[str, float]) -> None:
        """The step line: steps done of all, samples/s and ETA, then the step's other figures."""
        rest = {k: v for k, v in values.items() if k != "samples_per_s"}
        self.line(f"{step_line(step, total, values['samples_per_s'], steps_per_s)}  {_shown(rest)}")

    def line(self, text: str) -> None:
        self.console_queue.put(text)


def _shown(values: Mapping[str, float]) -> str:
    return "  ".join(f"{k} {_fmt(v)}" for k, v in values.items())


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"


def _epoch_seed(section: TrainConfig, rank: int, epoch: int) -> int:
    return section.seed * 1_000_003 + epoch * 101 + rank


def _shard_in_memory(shard: Any) -> dict[str, Tensor]:
    """Every row of this worker's shard as tensors, from one pass over its Ray Data pipeline."""
    parts = list(shard.iter_torch_batches(batch_size=4096))
    if not parts:
        return {}
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _batches_in_memory(
    rows: Mapping[str, Tensor], section: TrainConfig, size: int, rank: int, epoch: int, skip: int
) -> Iterator[dict[str, Tensor]]:
    """One epoch of the cached shard: a seeded permutation per epoch (none without a shuffle buffer), the first
    ``skip`` batches dropped; no Ray Data execution per epoch, so a short epoch costs nothing extra."""
    count = len(next(iter(rows.values()))) if rows else 0
    if section.shuffle_buffer:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(_epoch_seed(section, rank, epoch)))
    else:
        order = torch.arange(count)
    for i in range(skip, count // size):
        picked = order[i * size : (i + 1) * size]
        yield {key: value[picked] for key, value in rows.items()}


def _batches(shard: Any, section: TrainConfig, size: int, rank: int, epoch: int, skip: int) -> Iterator[dict[str, Tensor]]:
    """One epoch of this worker's shard in batches of ``size`` rows, shuffled with a per-epoch seed, the first
    ``skip`` batches dropped."""
    iterator = shard.iter_torch_batches(
        batch_size=size,
        drop_last=True,
        local_shuffle_buffer_size=section.shuffle_buffer or None,
        local_shuffle_seed=_epoch_seed(section, rank, epoch),
    )
    for i, batch in enumerate(iterator):
        if i >= skip:
            yield batch


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _train_loop(config: dict[str, Any]) -> None:
    """Body of every Ray Train worker (see the module docstring)."""
    job: TrainJob = config["job"]
    section = job.section
    if not section.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.ERROR)
    logging.getLogger("ray.train.v2._internal.execution.context").setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = torch.device(f"cuda:{context.get_local_rank()}") if section.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(section.cpus_per_worker)
    deepspeed.init_distributed(dist_backend="nccl" if section.use_gpu else "gloo")
    torch.manual_seed(section.seed)
    models = job.task.build()
    engines: dict[str, Any] = {}
    for name, spec in models.engines.items():
        if section.compile:
            spec.module.compile()
        engine, *_ = deepspeed.initialize(
            model=spec.module,
            model_parameters=[p for p in spec.module.parameters() if p.requires_grad],
            config=deepspeed_config(section, spec, world),
        )
        engines[name] = engine
    engines = EngineSet(engines, section.zero_stage)
    frozen = {name: m.to(device).eval().requires_grad_(False) for name, m in models.frozen.items()}

    step, epoch, batch_in_epoch = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    resumed_from = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            for name, engine in engines.items():
                engine.load_checkpoint(str(Path(folder, name)), tag=CHECKPOINT_TAG)
            states = sorted(Path(folder).glob("train_state_rank*.pt"))
            mine = Path(folder, f"train_state_rank{rank}.pt")
            state = torch.load(mine if mine.exists() else states[0], weights_only=False)
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        if mine.exists():
            _set_rng_state(state["rng"])
        else:
            torch.manual_seed(section.seed + 7919 * rank + step)
        resumed_from = step
    else:
        torch.manual_seed(section.seed + 7919 * rank)
        np.random.seed(section.seed + rank)
        random.seed(section.seed + rank)

    sink = _Logger(job.tracking_uri, job.run_id, config["console"]) if rank == 0 else None
    if sink is not None:
        sink.line(precision_note(section.precision, device))
    if sink is not None and resumed_from is not None:
        sink.line(f"resumed from step {resumed_from} (epoch {epoch}, batch {batch_in_epoch})")

    def save(final: bool) -> None:
        folder = tempfile.mkdtemp(prefix=f"{job.name}-ckpt-")
        for name, engine in engines.items():
            engine.save_checkpoint(str(Path(folder, name)), tag=CHECKPOINT_TAG)
        torch.save(
            {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "rng": _rng_state()},
            Path(folder, f"train_state_rank{rank}.pt"),
        )
        metrics = {"step": step, "final": float(final), **last_metrics}
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=f"step_{step:07d}",
        )
        shutil.rmtree(folder, ignore_errors=True)

    shard = ray.train.get_dataset_shard("train")
    cached = _shard_in_memory(shard) if section.cache_shard else None

    rows_per_step = section.batch_size * job.task.batches_per_step()

    def epoch_batches(epoch: int, skip: int) -> Iterator[dict[str, Tensor]]:
        if cached is not None:
            return _batches_in_memory(cached, section, rows_per_step, rank, epoch, skip)
        return _batches(shard, section, rows_per_step, rank, epoch, skip)

    batches = epoch_batches(epoch, batch_in_epoch)
    last_metrics: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0
    window_sums: dict[str, Tensor | float] = {}
    window_counts: dict[str, int] = {}
    global_batch = section.batch_size * world
    while step < section.steps:
        batch = next(batches, None)
        if batch is None:
            epoch, batch_in_epoch = epoch + 1, 0
            batches = epoch_batches(epoch, 0)
            batch = next(batches, None)
            if batch is None:
                raise ValueError(f"{job.name}: the dataset shard has fewer rows than one step's {rows_per_step}")
        if job.before_step is not None:
            job.before_step(step, rank, resumed_from is not None)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(section, device):
            values = job.task.train_step(step, batch, engines, frozen)
        for key, value in values.items():
            window_sums[key] = window_sums.get(key, 0.0) + value
            window_counts[key] = window_counts.get(key, 0) + 1
        step += 1
        batch_in_epoch += 1
        window_steps += 1
        if sink is not None:
            sink.images(step, job.task.figures(step))
        if sink is not None and (step % section.log_every == 0 or step == section.steps):
            elapsed = time.perf_counter() - window_start
            last_metrics = {k: v / window_counts[k] for k, v in _scalars(window_sums).items()}
            for name, engine in engines.items():
                prefix = "" if len(engines) == 1 else f"{name}."
                last_metrics[f"{prefix}lr"] = float(engine.get_lr()[0])
                last_metrics[f"{prefix}updates"] = float(engine.global_steps)
                if name in engines.grad_norms:
                    last_metrics[f"{prefix}grad_norm"] = float(engines.grad_norms[name])
            last_metrics["samples_per_s"] = global_batch * window_steps / max(elapsed, 1e-9)
            last_metrics["peak_mem_mb"] = peak_memory_mb(device)
            last_metrics["epoch"] = float(epoch)
            sink.metrics(step, last_metrics)
            sink.progress(step, section.steps, window_steps / max(elapsed, 1e-9), last_metrics)
            window_start, window_steps, window_sums, window_counts = time.perf_counter(), 0, {}, {}
        if section.sample_every and step % section.sample_every == 0 and step < section.steps:
            plain = _plain_models(job, engines, section.zero_stage, sink is not None)
            if sink is not None:
                _log_samples(job, job.task.samples(step, plain, frozen), step)
        if section.eval_every and (step % section.eval_every == 0 or step == section.steps):
            _log_learning_curve(job, engines, frozen, step, sink)
        if step % section.checkpoint_every == 0 or step == section.steps:
            save(final=step == section.steps)

    plain = _plain_models(job, engines, section.zero_stage, rank == 0)
    if sink is not None:
        exported = job.task.export.unwrap(plain[job.task.export.engine])
        uri = storage.join(job.output_uri, weights.MODEL_FILE)
        weights.save_model(uri, exported, kind=job.task.export.kind, preset=job.preset, step=step, extra=job.extra)
        tracking.log_file_artifact(job.tracking_uri, job.run_id, uri, "weights")
        _log_samples(job, job.task.samples(step, plain, frozen), step)


def _plain_models(job: TrainJob, engines: Mapping[str, Any], zero_stage: int, is_rank0: bool) -> dict[str, nn.Module]:
    """Plain copies of every engine's module on rank 0 (empty elsewhere); collective under ZeRO-3."""
    plain: dict[str, nn.Module] = {}
    for name, engine in engines.items():
        state = full_state_dict(engine, zero_stage, is_rank0)
        if is_rank0:
            module = job.task.plain(name)
            module.load_state_dict(state)
            plain[name] = module.eval()
    return plain


def _log_learning_curve(job: TrainJob, engines: Mapping[str, Any], frozen: Mapping[str, nn.Module], step: int, sink: _Logger | None) -> None:
    """Score plain copies of the engines with the task's learning-curve figures; rank 0 logs ``curve/<name>``."""
    plain = _plain_models(job, engines, job.section.zero_stage, sink is not None)
    if sink is None:
        return
    started = time.perf_counter()
    figures = {f"curve/{k}": v for k, v in job.task.learning_curve(step, plain, frozen).items()}
    if figures:
        sink.metrics(step, figures)
        sink.console(step, job.section.steps, {**figures, "curve_s": time.perf_counter() - started})


def _log_samples(job: TrainJob, videos: Mapping[str, np.ndarray], step: int) -> None:
    log_videos(job.tracking_uri, job.run_id, videos, job.fps, f"samples/step_{step:07d}")


def ordered_ingest() -> Any:
    """Ray Train's ingest options with the blocks kept in order: the same batches on every run and after a resume."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def checkpoint_root(output_uri: str) -> str:
    return storage.join(output_uri, CHECKPOINT_DIR)


def fit(job: TrainJob) -> FitResult:
    """Run the job under Ray Train; resumes from ``<output>/checkpoints`` when an earlier attempt left one."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    section = job.section
    root = checkpoint_root(job.output_uri)
    filesystem, path = storage.resolve(root)
    if not storage.is_s3(root):
        Path(path).mkdir(parents=True, exist_ok=True)
    started = time.time()
    job.dataset.context.enable_progress_bars = False
    relay = ConsoleRelay(job.name)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"job": job, "console": relay.queue},
        scaling_config=ScalingConfig(
            num_workers=section.num_workers,
            use_gpu=section.use_gpu,
            resources_per_worker={"CPU": section.cpus_per_worker, **({"GPU": 1} if section.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=TRAIN_RUN_NAME,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=section.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=section.keep_checkpoints),
        ),
        datasets={"train": job.dataset},
        dataset_config=DataConfig(execution_options=ordered_ingest()),
    )
    with relay:
        result = trainer.fit()
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    checkpoint_uri = None
    if result.checkpoint is not None:
        checkpoint_uri = ("s3://" if storage.is_s3(root) else "") + result.checkpoint.path
    return FitResult(
        model_uri=storage.join(job.output_uri, weights.MODEL_FILE),
        steps=int(metrics.get("step", 0)),
        metrics=metrics,
        checkpoint_uri=checkpoint_uri,
        seconds=time.time() - started,
    )
