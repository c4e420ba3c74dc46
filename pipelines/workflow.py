"""The stage DAG, output fingerprints, manifests, and the runner behind `causvid run` and `causvid stage`.

Every stage writes one output under `<root>/<stage>/<fingerprint>/`. The fingerprint hashes the stage's
config section, its inputs' fingerprints and the code the stage runs, so a changed config or a new teacher
gets a new folder and the old one stays. An output counts only once `_SUCCESS.json` is written last;
a complete output is skipped, and an interrupted stage resumes by keeping the shards it finished.
:func:`vae_of` follows the manifests back to the VAE behind an output.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import logging
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from infra import storage, tracking
from infra.config import ConfigError, PipelineConfig, section_dump

log = logging.getLogger("causvid")

SOURCE_PACKAGES = ("model", "pipelines", "training", "evaluation")
PROGRESS = "_progress.json"
PLUMBING = ("pipelines.workflow",)


@dataclass(frozen=True)
class Stage:
    """One node of the DAG: its config section, the stages it reads, and where its `run(ctx)` lives."""

    name: str
    entry: str
    inputs: Callable[[PipelineConfig], tuple[str, ...]]
    section: str
    description: str


@dataclass
class StageContext:
    """What a stage's `run(ctx) -> dict` receives: its config, its complete inputs, and where to write."""

    name: str
    config: PipelineConfig
    inputs: dict[str, str]
    output_uri: str
    fingerprint: str
    run_id: str | None = None
    extra_params: dict[str, Any] = field(default_factory=dict)

    def output(self, *parts: str) -> str:
        return storage.join(self.output_uri, *parts)

    def done(self, *parts: str) -> bool:
        """Whether a file of this output is already in place (a finished shard of an interrupted run)."""
        return storage.exists(self.output(*parts))

    def track_progress(self, unit: str, files: list[str]) -> None:
        """Declare the files whose presence marks each finished unit (a group, a shard), so that `causvid status`
        can tell how far an interrupted run got."""
        storage.write_json(self.output(PROGRESS), {"unit": unit, "files": files})


def _always(*names: str) -> Callable[[PipelineConfig], tuple[str, ...]]:
    return lambda _config: names


def _clips_inputs(config: PipelineConfig) -> tuple[str, ...]:
    return () if config.clips.manifest else ("synthetic",)


EVALUATED_MODELS = {
    "dmd_student": "dmd",
    "ode_init_student": "ode_init",
    "causal_teacher": "causal_teacher",
    "teacher": "teacher",
}
"""The models `evaluate.models` may name and the stage whose output holds each."""


def _evaluate_inputs(config: PipelineConfig) -> tuple[str, ...]:
    """The VAE, the teacher (an imported one's VAE decodes), and the stages of the models under test; the
    applications run on the DMD student."""
    evaluated = {EVALUATED_MODELS[m] for m in config.evaluate.models} | ({"dmd"} if config.evaluate.applications else set())
    return ("vae", "teacher", *(s for s in ("causal_teacher", "ode_init", "dmd") if s in evaluated))


def _dmd_inputs(config: PipelineConfig) -> tuple[str, ...]:
    """The causal teacher is an input only where it is the real score, so `--until dmd` trains it only then."""
    causal = ("causal_teacher",) if config.dmd.teacher == "causal" else ()
    return ("latents", "teacher", *causal, "ode_init")


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("synthetic", "pipelines.synthetic:run", _always(), "synthetic", "render the shapes world to MP4 files"),
        Stage("clips", "pipelines.clips:run", _clips_inputs, "clips", "curate videos into captioned clips (Parquet)"),
        Stage("vae", "training.vae:run", _always("clips"), "vae", "train the causal 3D VAE"),
        Stage("latents", "pipelines.latents:run", _always("clips", "vae"), "latents", "encode clips into latents"),
        Stage("teacher", "training.teacher:run", _always("latents"), "teacher", "train the bidirectional teacher"),
        Stage(
            "causal_teacher",
            "training.causal_teacher:run",
            _always("latents", "teacher"),
            "causal_teacher",
            "fine-tune a block-causal many-step teacher",
        ),
        Stage(
            "trajectories",
            "pipelines.trajectories:run",
            _always("latents", "teacher"),
            "trajectories",
            "teacher ODE trajectories at the student's timesteps",
        ),
        Stage("ode_init", "training.ode_init:run", _always("trajectories", "teacher"), "ode_init", "student ODE regression"),
        Stage(
            "dmd",
            "training.dmd:run",
            _dmd_inputs,
            "dmd",
            "asymmetric distribution matching distillation",
        ),
        Stage(
            "evaluate",
            "evaluation.rollout:run",
            _evaluate_inputs,
            "evaluate",
            "30-second rollouts and drift metrics",
        ),
    )
}


@lru_cache(maxsize=None)
def code_version(module: str) -> str:
    """Hash of the code a stage runs: its entry module and every project module it imports, transitively, each
    as its syntax tree without docstrings, so editing a comment, a docstring or the layout retrains nothing.

    Plumbing (`infra`, this workflow) moves data without changing it and is left out, so editing the CLI or the
    storage layer retrains nothing; config changes are caught by the section hash. Taken once per process.
    """
    top = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for name in sorted(project_imports(module)):
        digest.update(name.encode())
        digest.update(code_of(_module_file(top, name).read_text()).encode())
    return digest.hexdigest()[:12]


def code_of(source: str) -> str:
    """What a module does, as text: its syntax tree with docstrings dropped (comments and layout never reach it)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


@lru_cache(maxsize=1)
def code_revision() -> dict[str, Any]:
    """The exact code that ran, for manifests and MLflow: the git commit (and whether the tree had changes) where
    there is a checkout, and always the SHA-256 of every project source file (a submitted job has no `.git`)."""
    top = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(p for package in (*SOURCE_PACKAGES, "infra") for p in (top / package).rglob("*.py")):
        digest.update(str(path.relative_to(top)).encode())
        digest.update(path.read_bytes())
    revision: dict[str, Any] = {"source_sha256": digest.hexdigest()}
    git = ["git", "-C", str(top)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        changes = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return revision
    if commit.returncode == 0:
        revision.update(git_commit=commit.stdout.strip(), git_dirty=bool(changes.stdout.strip()))
    return revision


def project_imports(module: str) -> set[str]:
    """``module`` and the project modules it imports anywhere in its source (function-level imports too)."""
    top = Path(__file__).resolve().parent.parent
    found: set[str] = set()
    stack = [module]
    while stack:
        name = stack.pop()
        if name in found or not _is_source(top, name):
            continue
        found.add(name)
        tree = ast.parse(_module_file(top, name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                stack.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                stack.append(node.module)
                stack.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _is_source(top: Path, name: str) -> bool:
    package = name.split(".")[0]
    plumbing = any(name == p or name.startswith(p + ".") for p in PLUMBING)
    return package in SOURCE_PACKAGES and not plumbing and _module_file(top, name).is_file()


def _module_file(top: Path, name: str) -> Path:
    base = top.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def stage_order(until: str | None = None) -> list[str]:
    names = list(STAGES)
    return names if until is None else names[: names.index(until) + 1]


def _check_stage(name: str | None) -> None:
    if name is not None and name not in STAGES:
        raise ConfigError(f"unknown stage '{name}' (stages: {', '.join(STAGES)})")


@dataclass(frozen=True)
class Plan:
    """Fingerprints and output URIs of every stage for one config; an imported stage output keeps its own URI."""

    root: str
    fingerprints: dict[str, str]
    imported: dict[str, str] = field(default_factory=dict)

    def output_uri(self, stage: str) -> str:
        return self.imported.get(stage) or storage.join(self.root, stage, self.fingerprints[stage])


IMPORTABLE = ("vae", "teacher")


def imported_outputs(config: PipelineConfig) -> dict[str, str]:
    """Stage outputs the config takes from elsewhere (``vae.source``, ``teacher.source``), checked to be complete."""
    imported = {}
    for stage in IMPORTABLE:
        source = getattr(config, stage).source
        if not source:
            continue
        uri = storage.normalize(source)
        if not storage.is_complete(uri) or storage.read_manifest(uri).get("stage") != stage:
            raise ConfigError(
                f"config key '{stage}.source': {source} is not a complete {stage} output (run causvid import-teacher)"
            )
        imported[stage] = uri
    return imported


def plan(config: PipelineConfig, code: str | None = None) -> Plan:
    """Fingerprint every stage in DAG order: hash(stage, its section, its inputs' fingerprints, its code).

    ``code`` replaces every stage's code version (tests use it to hold the code fixed).
    """
    fingerprints: dict[str, str] = {}
    imported = imported_outputs(config)
    for name, stage in STAGES.items():
        if name in imported:
            fingerprints[name] = str(storage.read_manifest(imported[name])["fingerprint"])
            continue
        section = section_dump(getattr(config, stage.section))
        if name == "clips" and config.clips.manifest:
            section["manifest_sha256"] = hashlib.sha256(storage.read_bytes(config.clips.manifest)).hexdigest()
        payload = {
            "stage": name,
            "section": section,
            "inputs": {dep: fingerprints[dep] for dep in stage.inputs(config)},
            "code": code or code_version(stage.entry.partition(":")[0]),
            "model": section_dump(config.model),
        }
        fingerprints[name] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return Plan(root=storage.normalize(config.storage.root), fingerprints=fingerprints, imported=imported)


def _load_entry(entry: str) -> Callable[[StageContext], dict[str, Any]]:
    module_name, _, attr = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise NotImplementedError(f"stage module {module_name} is not implemented yet") from None
        raise
    return getattr(module, attr)


@dataclass
class StageState:
    name: str
    state: str
    uri: str
    detail: str = ""


def status(config: PipelineConfig) -> list[StageState]:
    """done: complete at the current fingerprint; partial: an interrupted run's progress there; stale: only other
    fingerprints complete; missing: none."""
    the_plan = plan(config)
    rows = []
    for name in STAGES:
        uri = the_plan.output_uri(name)
        if storage.is_complete(uri):
            rows.append(StageState(name, "done", uri, json.dumps(storage.read_manifest(uri).get("counts", {}))))
            continue
        progress = partial_progress(uri)
        if progress:
            rows.append(StageState(name, "partial", uri, progress))
            continue
        others = [d for d in storage.list_dirs(storage.join(the_plan.root, name)) if storage.is_complete(d)]
        state = "stale" if others else "missing"
        rows.append(StageState(name, state, uri, f"{len(others)} older output(s)" if others else ""))
    return rows


def partial_progress(output_uri: str) -> str:
    """`partial: 3 of 6 groups` for an output an interrupted run left, from its declared progress; else ''."""
    progress_uri = storage.join(output_uri, PROGRESS)
    if not storage.exists(progress_uri):
        return ""
    progress = storage.read_json(progress_uri)
    done = sum(storage.exists(storage.join(output_uri, name)) for name in progress["files"])
    return f"partial: {done} of {len(progress['files'])} {progress['unit']}"


def vae_of(output_uri: str) -> str | None:
    """The VAE weights behind a stage output, through the manifests: the one its latents were encoded with (the
    `latents` stage records it), else its own `vae` input's, else that of its `latents` or `teacher` input."""
    from model.weights import MODEL_FILE  # here, not above: the CLI reads this module's DAG without loading torch

    manifest = storage.read_manifest(output_uri)
    recorded = manifest.get("summary", {}).get("vae")
    if recorded and recorded != "None":
        return str(recorded)
    inputs = manifest.get("inputs", {})
    if inputs.get("vae"):
        return storage.join(inputs["vae"], MODEL_FILE)
    upstream = inputs.get("latents") or inputs.get("teacher")
    return vae_of(upstream) if upstream else None


def _upstream(config: PipelineConfig, names: Iterable[str]) -> set[str]:
    needed: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name not in needed:
            needed.add(name)
            stack.extend(STAGES[name].inputs(config))
    return needed


def select_stages(
    config: PipelineConfig, start: str | None = None, until: str | None = None, only: str | None = None
) -> list[str]:
    """Stages to visit, in DAG order: `only` one, or the ancestors of `until` (all by default) from `start` on."""
    for name in (start, until, only):
        _check_stage(name)
    if only:
        return [only]
    targets = [until] if until else list(STAGES)
    needed = _upstream(config, targets)
    order = [name for name in STAGES if name in needed]
    if start:
        order = [name for name in order if list(STAGES).index(name) >= list(STAGES).index(start)]
    return order


def run_stages(
    config: PipelineConfig,
    stages: list[str],
    force: Iterable[str] = (),
    parent_run_name: str = "workflow",
) -> dict[str, str]:
    """Run the given stages in order under one MLflow parent run; complete outputs are skipped."""
    force = set(force)
    for name in force:
        _check_stage(name)
    storage.apply_settings(config.storage)
    the_plan = plan(config)
    for name in force & set(the_plan.imported):
        raise ConfigError(f"stage '{name}' is imported from {the_plan.imported[name]} and cannot be forced")
    outputs: dict[str, str] = {}
    with tracking.workflow_run(config, parent_run_name, {"stages": ",".join(stages)}) as parent_id:
        for name in stages:
            outputs[name] = _run_one(config, the_plan, name, name in force, parent_id)
    return outputs


def _run_one(config: PipelineConfig, the_plan: Plan, name: str, force: bool, parent_id: str) -> str:
    stage = STAGES[name]
    uri = the_plan.output_uri(name)
    if storage.is_complete(uri) and not force:
        log.info("%-15s complete, skipped  %s", name, uri)
        return uri
    if force:
        storage.delete_tree(uri)
    swept = storage.sweep_staging(uri)
    if swept:
        log.info("%-15s removed %d staging file(s) of an interrupted run", name, swept)
    inputs = {dep: the_plan.output_uri(dep) for dep in stage.inputs(config)}
    for dep, dep_uri in inputs.items():
        if not storage.is_complete(dep_uri):
            raise storage.IncompleteOutputError(
                f"stage '{name}' needs '{dep}' at {dep_uri}, which is not complete; run `causvid run --until {name}`"
            )
    run_fn = _load_entry(stage.entry)
    log.info("%-15s running -> %s", name, uri)
    started = time.time()
    section = getattr(config, stage.section)
    with tracking.stage_run(config, name, section_dump(section), inputs, uri, parent_id) as run_id:
        ctx = StageContext(name, config, inputs, uri, the_plan.fingerprints[name], run_id)
        result = run_fn(ctx) or {}
        seconds = time.time() - started
        manifest = {
            "stage": name,
            "fingerprint": the_plan.fingerprints[name],
            "inputs": inputs,
            "config": section_dump(section),
            "counts": result.get("counts", {}),
            **({"files": result["files"]} if "files" in result else {}),
            "summary": result.get("summary", {}),
            "mlflow_run_id": run_id,
            "code": code_revision(),
            "seconds": round(seconds, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        tracking.log_stage_result(manifest)
        storage.write_manifest(uri, manifest)
    log.info("%-15s done in %.1f s  %s", name, seconds, json.dumps(manifest["counts"]))
    return uri
