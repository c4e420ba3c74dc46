"""`causvid`: run the workflow, one stage or a sweep, show its state, submit it to a cluster, benchmark it."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from collections.abc import Sequence

from infra import console
from infra.config import EMBEDDED_DEFAULT, ConfigError, PipelineConfig, load_config
from infra.errors import UserError
from infra.preflight import check_manifest, preflight
from infra.redact import redact_text
from infra.storage import IncompleteOutputError

BENCHMARKS = {
    "inference": ("model.bench", "teacher 50-step vs student 4-step streaming, KV-cache growth, matmul fraction"),
    "data": ("pipelines.bench", "decord raw decode vs the clips stage, frames/s"),
    "train": ("training.bench", "samples/s and peak memory per ZeRO stage and worker count"),
    "memory": ("model.memory", "a preset's parameters, model states per ZeRO stage and activations, on the meta device"),
}


def _config_args(
    parser: argparse.ArgumentParser, config_help: str = "YAML config (default: configs/tiny.yaml, the embedded default)"
) -> None:
    parser.add_argument("--config", "-c", help=config_help)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. dmd.lr=1e-5"
    )
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")


def build_parser() -> argparse.ArgumentParser:
    from pipelines.workflow import STAGES

    parser = argparse.ArgumentParser(
        prog="causvid",
        description="Distil a bidirectional video diffusion teacher into a streaming 4-step causal student "
        "(CausVid) on Ray Data, Ray Train + DeepSpeed and MLflow.",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="Ray's, Ray Data's and DeepSpeed's own logs on the console too"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    stage_list = ", ".join(STAGES)

    run = commands.add_parser("run", help="run the stage DAG, skipping complete outputs", description=f"Stages: {stage_list}.")
    _config_args(run)
    run.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage (earlier ones must be complete)")
    run.add_argument("--until", metavar="STAGE", help="stop after this stage")
    run.add_argument("--force", action="append", default=[], metavar="STAGE", help="re-run this stage even if complete")

    stage = commands.add_parser("stage", help="run one stage (its inputs must be complete)")
    stage.add_argument("name", choices=list(STAGES), metavar="NAME", help=stage_list)
    _config_args(stage)
    stage.add_argument("--force", action="store_true", help="re-run even if complete")

    sweep = commands.add_parser(
        "sweep",
        help="run the rows of a sweep file through evaluate and print their table (Table 4; plots: Figure 8)",
        description="Example: causvid sweep configs/sweep_table4.yaml --set dmd.steps=200 (the paper's Table 4).",
    )
    sweep.add_argument("sweep", metavar="SWEEP", help="sweep YAML, e.g. configs/sweep_table4.yaml")
    _config_args(sweep, "base YAML config of every row (default: the sweep file's `config`)")
    sweep.add_argument("--json", action="store_true", help="print the rows as JSON")

    status = commands.add_parser("status", help="list stages as done / partial / stale / missing with their output URIs")
    _config_args(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    submit = commands.add_parser(
        "submit",
        help="run a causvid command as a Ray job on a cluster",
        description="Example: causvid submit --address http://127.0.0.1:8265 -- run --config configs/tiny.yaml",
    )
    submit.add_argument("--address", help="Ray Jobs API address (default: $RAY_ADDRESS)")
    submit.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    submit.add_argument(
        "--env", action="append", default=[], metavar="NAME", help="also forward this environment variable to the job"
    )
    submit.add_argument("args", nargs=argparse.REMAINDER, help="the causvid command to run, after --")

    jobs = commands.add_parser(
        "jobs",
        help="the cluster's jobs: list them, print one's logs, stop one",
        description="Examples: causvid jobs list; causvid jobs logs raysubmit_...; causvid jobs stop raysubmit_...",
    )
    jobs.add_argument("action", choices=["list", "logs", "stop"])
    jobs.add_argument("job", nargs="?", metavar="JOB", help="the job id (for logs and stop), as `jobs list` shows it")
    jobs.add_argument("--address", help="Ray Jobs API address (default: $RAY_ADDRESS)")

    report = commands.add_parser("report", help="print the latest evaluation's scores and drift ratios")
    _config_args(report)
    report.add_argument("--json", action="store_true", help="print summary.json: {models: {NAME: {metric: value, drift_ratio}}}")

    dashboard = commands.add_parser("dashboard", help="write a static HTML drift report from MLflow evaluation runs")
    _config_args(dashboard)
    dashboard.add_argument("--runs", nargs="+", default=[], metavar="RUN_ID", help="evaluation runs (default: the latest 5)")
    dashboard.add_argument("--out", default="causvid-dashboard.html", help="where to write the report")
    dashboard.add_argument("--videos", type=int, default=2, metavar="N", help="rollout videos per model to embed")

    generate = commands.add_parser(
        "generate",
        help="stream a video from a student to an MP4: text, dynamic prompts, an image or a video as input",
        description='Example: causvid generate --checkpoint RUN_ID --prompt "a red circle circling clockwise on a '
        'black background" --seconds 30 --out video.mp4 --prompt-at 10:"a blue square bouncing up and down on a '
        'black background"',
    )
    generate.add_argument(
        "--checkpoint", required=True, metavar="RUN_OR_PATH", help="stage output, model.pt, MLflow run id or models:/ URI"
    )
    generate.add_argument("--prompt", required=True, help="the caption (from the start)")
    generate.add_argument("--seconds", type=float, help="length (default 30 s; with --video the whole input)")
    generate.add_argument("--out", required=True, help="the MP4 to write, frame by frame as chunks are ready")
    generate.add_argument(
        "--prompt-at", action="append", default=[], metavar='SECONDS:"TEXT"', help="switch the caption from that second on"
    )
    generate.add_argument("--image", help="start from this image (png, jpg, ...)")
    generate.add_argument("--video", help="re-render this video (it may still be being written)")
    generate.add_argument("--strength", type=float, default=0.5, help="with --video: noise level in (0, 1] (default 0.5)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--vae", help="VAE model.pt (default: the one in the checkpoint's manifests)")
    generate.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    generate.add_argument(
        "--precision", choices=["fp32", "bf16"], help="weights' dtype (default: bf16 where the device has it natively)"
    )
    generate.add_argument(
        "--compile",
        action="store_true",
        help="compile the student's blocks and the VAE decoder: about 11 s at start-up for about 1.5 times the "
        "frames per second after it on two CPU cores (pays for videos of minutes, or a long-running stream)",
    )
    generate.add_argument("--config", "-c", help="YAML config, to find MLflow run ids (default: configs/tiny.yaml)")
    generate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override")

    imports = commands.add_parser(
        "import-teacher",
        help="convert a pretrained teacher into a teacher output for --set teacher.source=...",
        description="Example: causvid import-teacher --format diffusers Wan2.1-T2V-1.3B-Diffusers "
        "--set model.preset=wan2.1-t2v-1.3b; prints the output folder.",
    )
    imports.add_argument("path", metavar="PATH", help="the teacher's folder (diffusers: transformer/, vae/, text_encoder/)")
    imports.add_argument("--format", default="diffusers", choices=["diffusers"], help="the folder's layout")
    _config_args(imports)

    bench = commands.add_parser("bench", help="benchmarks that print JSON")
    bench.add_argument("name", choices=list(BENCHMARKS), help="; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items()))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="options of the benchmark")
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    """The command's ``--set`` overrides, with ``--address`` as ``ray.address``."""
    address = getattr(args, "address", None)
    return [*args.overrides, *([f"ray.address={address}"] if address else [])]


def _load(args: argparse.Namespace) -> PipelineConfig:
    """The command's config: `--config`, else the embedded default's file, so every command sees the demo's outputs."""
    return load_config(args.config or EMBEDDED_DEFAULT, _overrides(args))


def _cmd_run(args: argparse.Namespace) -> int:
    from infra.cluster import ensure_ray
    from pipelines.workflow import run_stages, select_stages

    config = _load(args)
    stages = select_stages(config, start=args.start, until=args.until)
    preflight(config, stages)
    console.capture_internal_logs(config.storage.root)
    ensure_ray(config)
    outputs = run_stages(config, stages, force=args.force, parent_run_name="run")
    for name, uri in outputs.items():
        print(f"{name:15s} {uri}")
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    from infra.cluster import ensure_ray
    from pipelines.workflow import run_stages

    config = _load(args)
    preflight(config, [args.name])
    console.capture_internal_logs(config.storage.root)
    ensure_ray(config)
    outputs = run_stages(config, [args.name], force=[args.name] if args.force else [], parent_run_name=args.name)
    print(outputs[args.name])
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from training.sweep import format_table, run_sweep

    rows = run_sweep(args.sweep, args.config, _overrides(args))
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from pipelines.workflow import status

    config = _load(args)
    if config.clips.manifest:
        check_manifest(config.clips.manifest)
    rows = status(config)
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=2))
        return 0
    marks = {"done": "done   ", "partial": "partial", "stale": "stale  ", "missing": "missing"}
    for row in rows:
        print(f"{row.name:15s} {marks[row.state]} {row.uri}  {row.detail}".rstrip())
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from infra.cluster import submit

    address = _jobs_address(args)
    forwarded = args.args[1:] if args.args[:1] == ["--"] else args.args
    if not forwarded:
        raise UserError("submit needs a command after --, e.g. causvid submit -- run --config configs/tiny.yaml")
    return submit(address, forwarded, wait=not args.no_wait, env=args.env)


def _jobs_address(args: argparse.Namespace) -> str:
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError(f"{args.command} needs a cluster: pass --address http://HOST:8265 or set RAY_ADDRESS")
    return address


def _cmd_jobs(args: argparse.Namespace) -> int:
    from infra.cluster import job_logs, list_jobs, stop_job

    address = _jobs_address(args)
    if args.action == "list":
        for job in list_jobs(address):
            print(f"{job['job_id']:32s} {job['status']:10s} {job['command']}")
        return 0
    if not args.job:
        raise UserError(f"jobs {args.action} needs a job id, e.g. causvid jobs {args.action} raysubmit_... (see causvid jobs list)")
    if args.action == "logs":
        print(job_logs(address, args.job), end="")
        return 0
    print(f"job {args.job} {'stopping' if stop_job(address, args.job) else 'had already ended'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from evaluation.drift import markdown_table, summary_rows
    from evaluation.report import latest_evaluation, latest_summary

    config = _load(args)
    summary = latest_summary(config)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    models = summary["models"]
    print(f"evaluation {latest_evaluation(config)}\n")
    print(markdown_table(summary_rows(models)))
    metrics = sorted({m for entry in models.values() for m in entry.get("drift_ratio", {})})
    print("\ndrift (last 5 s / first 5 s)")
    print(f"{'model':18s}" + "".join(f"{m[:14]:>15s}" for m in metrics))
    for name, entry in models.items():
        ratios = entry.get("drift_ratio", {})
        cells = "".join(f"{ratios[m]:15.3f}" if ratios.get(m) is not None else f"{'-':>15s}" for m in metrics)
        print(f"{name:18s}{cells}")
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from pathlib import Path

    from evaluation.report import write_dashboard

    path = write_dashboard(_load(args), Path(args.out), args.runs, videos_per_model=args.videos)
    print(path.resolve())
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from evaluation.generate import Generator, write_mp4
    from evaluation.request import Request, parse_prompt_at, validate

    request = Request(
        prompt=args.prompt,
        seconds=args.seconds,
        prompt_at=tuple(parse_prompt_at(value) for value in args.prompt_at),
        image=args.image,
        video=args.video,
        strength=args.strength,
        seed=args.seed,
    )
    validate(request)
    generator = Generator.load(
        args.checkpoint, vae=args.vae, config=_load(args), device=args.device, precision=args.precision,
        compile=args.compile,
    )
    print(write_mp4(generator, request, args.out, progress=True))
    return 0


def _cmd_import_teacher(args: argparse.Namespace) -> int:
    from pipelines.teacher_import import import_teacher

    print(import_teacher(_load(args), args.path, args.format))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    module_name = BENCHMARKS[args.name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise UserError(f"benchmark '{args.name}' is not implemented yet") from None
    forwarded = args.args[1:] if args.args[:1] == ["--"] else args.args
    with contextlib.redirect_stdout(sys.stderr):  # workers' and libraries' chatter; stdout carries only the JSON
        result = module.main(forwarded)
    print(json.dumps(result, indent=2))
    return 0


COMMANDS = {
    "run": _cmd_run,
    "stage": _cmd_stage,
    "sweep": _cmd_sweep,
    "status": _cmd_status,
    "submit": _cmd_submit,
    "jobs": _cmd_jobs,
    "report": _cmd_report,
    "dashboard": _cmd_dashboard,
    "generate": _cmd_generate,
    "import-teacher": _cmd_import_teacher,
    "bench": _cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.configure(quiet=args.quiet, verbose_logs=args.verbose)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, IncompleteOutputError, UserError, NotImplementedError) as err:
        print(f"causvid: error: {redact_text(str(err))}", file=sys.stderr)
        return 2
    except Exception as err:
        tail = console.failure_tail(err)
        if tail:
            print(redact_text(tail), file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
