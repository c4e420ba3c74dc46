"""Typed configuration for every stage, loaded from YAML and overridable with `--set a.b=c`.

Each stage reads only its own section; the section (plus the fingerprints of the stage's inputs)
is what the stage's output fingerprint hashes, so changing `dmd.lr` re-runs `dmd` and what follows
it, and nothing before it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


EMBEDDED_DEFAULT = Path(str(resources.files("configs").joinpath("tiny.yaml")))
"""The config of every command run without `--config`: the embedded default's values live in this one file
(`configs/tiny.yaml`, package data of `configs`), and the field defaults below only fill in the keys it leaves out."""


class ConfigError(ValueError):
    """A user mistake in a config file or override; its message is one line that says how to fix it."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class StorageConfig(Section):
    """Where stage outputs live: a local folder (relative to the working directory) or `s3://bucket/prefix`."""

    root: str = "causvid-data"
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint; wins over $AWS_ENDPOINT_URL; default AWS itself."
    )
    s3_region: str | None = Field(default=None, description="Wins over $AWS_REGION / $AWS_DEFAULT_REGION.")


class TrackingConfig(Section):
    """MLflow: `uri` wins, then $MLFLOW_TRACKING_URI, then a SQLite store under a local storage root."""

    uri: str | None = None
    experiment: str = "causvid"


class RayConfig(Section):
    """`address` (or $RAY_ADDRESS) connects to a cluster; without it a local Ray is started."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    dashboard: bool = Field(
        default=True, description="The local Ray's dashboard, on 127.0.0.1 only; Ray Train's state queries need it."
    )


class ModelConfig(Section):
    """The preset (shapes, text encoder, schedule) of every stage; `text_path` is the local folder of its t5/umt5
    text encoder (a transformers folder, or a diffusers pipeline folder with text_encoder/ and tokenizer/)."""

    preset: str = "tiny"
    text_path: str | None = None


class SyntheticConfig(Section):
    """The shapes world: captioned synthetic videos written as real H.264 MP4 files."""

    num_videos: int = Field(default=64, ge=1)
    seconds: float = Field(default=10.0, gt=0)
    fps: int = Field(default=12, ge=1)
    size: int = Field(default=64, ge=16)
    seed: int = 0
    videos_per_task: int = Field(default=8, ge=1)


class ClipsConfig(Section):
    """Clip curation: probe, filter, resample, resize/crop, cut, caption and text-embed real video files."""

    manifest: str | None = Field(
        default=None, description="CSV/JSONL/Parquet of `uri,caption`; default: the synthetic stage's manifest."
    )
    fps: int | None = Field(default=None, ge=1, description="Frame rate of the clips (default: the preset's).")
    height: int | None = Field(default=None, ge=16, description="Clip height (default: the preset's).")
    width: int | None = Field(default=None, ge=16, description="Clip width (default: the preset's).")
    size: int | None = Field(default=None, ge=16, description="Square clips: height = width = size.")
    clip_frames: int | None = Field(
        default=None, ge=1, description="1 + 4n frames, so the VAE maps it to 1 + n latents (default: the preset's)."
    )
    crf: int | None = Field(
        default=None,
        ge=0,
        le=51,
        description="Each clip's frames are stored as H.264: lossless RGB by default, or 4:2:0 at this CRF (far smaller).",
    )

    @field_validator("clip_frames")
    @classmethod
    def _one_plus_four_n(cls, value: int | None) -> int | None:
        if value is not None and value % 4 != 1:
            below = value - (value - 1) % 4
            raise ValueError(f"must be 1 + 4n, e.g. {below} or {below + 4}, so the VAE maps it to 1 + n latent frames")
        return value

    stride_frames: int = Field(default=32, ge=1)
    min_seconds: float = Field(default=1.0, ge=0)
    min_side: int = Field(default=32, ge=1)
    static_threshold: float = Field(
        default=0.002, ge=0, description="A clip whose mean absolute frame difference (0..1) is below this is static."
    )
    blank_threshold: float = Field(
        default=0.02, ge=0, description="A frame whose pixel standard deviation (0..1) is below this is blank."
    )
    rows_per_shard: int = Field(default=64, ge=1)
    videos_per_task: int = Field(default=8, ge=1, description="Videos per Ray task; also the unit of resumption.")


class TrainConfig(Section):
    """What every Ray Train + DeepSpeed stage shares; `batch_size` is per worker (DeepSpeed's micro batch)."""

    steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=4, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=10, ge=0, description="Linear learning-rate warmup from 0.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="After the warmup: constant, or a cosine decay to `min_lr_ratio` of `lr`."
    )
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="bf16: autocast compute (AMX on CPU, tensor cores on GPU), fp32 master weights; auto: bf16 where "
        "the device computes it natively, fp32 elsewhere (a CPU without AVX512-BF16 or AMX emulates every bf16 matmul).",
    )
    compile: bool = Field(default=False, description="torch.compile the trained networks (pays off on long runs).")
    cpus_per_worker: int = Field(default=1, ge=1, description="CPUs each worker reserves; its torch threads.")
    eval_every: int = Field(default=0, ge=0, description="Score the learning curve every N steps (0: off).")
    grad_clip: float = Field(default=1.0, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    checkpoint_every: int = Field(default=50, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=2, ge=-1, description="Worker failures to recover from (-1: always).")
    log_every: int = Field(default=10, ge=1)
    sample_every: int = Field(default=0, ge=0, description="Log sample videos every N steps (0: at the end only).")
    shuffle_buffer: int = Field(default=64, ge=0, description="Rows in each worker's local shuffle buffer (0: off).")
    cache_shard: bool = Field(
        default=True,
        description="Hold each worker's shard in memory after one pass and shuffle it whole every epoch; turn off "
        "for datasets larger than a worker's memory (they stream through Ray Data every epoch).",
    )
    seed: int = 0


class VaeConfig(TrainConfig):
    """The causal 3D VAE; trains on random `train_frames`-frame crops of the clips (1 + 4n frames)."""

    kl_weight: float = Field(default=1e-6, ge=0)
    edge_weight: float = Field(default=0.5, ge=0, description="L1 on spatial gradients; keeps object edges crisp.")
    train_frames: int = Field(default=9, ge=1)
    eval_clips: int = Field(default=16, ge=1, description="Held-out clips for PSNR and oracle accuracy.")
    stats_clips: int = Field(default=64, ge=2, description="Training clips that measure the latent mean and std.")
    source: str | None = Field(
        default=None, description="An imported VAE (`causvid import-teacher` writes one in <teacher>/vae) used instead."
    )


class LatentsConfig(Section):
    """Encoding the clips into latents with the trained VAE (a Ray Data job, one actor per free CPU)."""

    batch_size: int = Field(default=8, ge=1, description="Clips per VAE batch inside an actor.")


class CurriculumPhase(Section):
    """One phase of a teacher's curriculum: `steps` steps on the first `latent_frames` latent frames of each clip."""

    latent_frames: int = Field(ge=1)
    steps: int = Field(ge=1)
    image_every: int = Field(
        default=0,
        ge=0,
        description="Every n-th step of the phase trains on single frames (images), so that a video phase keeps "
        "what an image phase taught (joint image-video training); 0: never.",
    )


class TeacherConfig(TrainConfig):
    """Flow-matching DiT teacher; evaluated by the pixel oracle on CFG samples of held-out prompts."""

    source: str | None = Field(
        default=None,
        description="An imported teacher (`causvid import-teacher`) that every reader of the teacher takes instead.",
    )
    text_dropout: float = Field(default=0.1, ge=0, le=1)
    eval_prompts: int = Field(default=64, ge=0)
    eval_steps: int | None = Field(default=None, ge=1, description="Euler steps of the evaluation samples (preset's).")
    guidance_scale: float | None = Field(default=None, ge=0, description="CFG scale of the samples (preset's).")
    eval_latent_frames: int | None = Field(default=None, ge=1, description="Sample length (preset's clip length).")
    eval_batch_size: int = Field(default=16, ge=1)
    curve_prompts: int = Field(default=16, ge=1, description="Held-out prompts of the learning curve (`eval_every`).")
    curve_steps: int = Field(default=20, ge=1, description="Euler steps of the learning curve's samples.")
    ema_decay: float | None = Field(
        default=None, gt=0, lt=1, description="Sample, score and export a moving average of the DiT's weights."
    )
    curriculum: list[CurriculumPhase] = Field(
        default_factory=list,
        description="Phases on the first `latent_frames` of each clip, in order, then whole clips: one latent frame "
        "is an image, on which the DiT learns to draw shapes at several times the samples per second.",
    )


class CausalTeacherConfig(TeacherConfig):
    """Block-causal fine-tune of the teacher, each chunk at its own noise level."""

    source: Literal[None] = Field(default=None, description="Only the teacher is imported.")
    text_dropout: float = Field(default=0.1, ge=0, le=1)
    eval_prompts: int = Field(default=16, ge=0)


class TrajectoriesConfig(Section):
    """Teacher ODE trajectories: the states at the student's timesteps and the final x0, per prompt.

    Prompt i is latents row ``i mod rows`` (captions and text embeddings of the latents output) with its own
    noise seed; shard k holds prompts ``[k * rows_per_shard, (k + 1) * rows_per_shard)``, the unit of resumption.
    """

    num_prompts: int = Field(default=64, ge=1)
    ode_steps: int = Field(default=48, ge=1, description="Euler steps from t = 1 to 0 (the student's times are added).")
    cfg_scale: float | None = Field(default=None, ge=0, description="Teacher CFG scale (default: the preset's).")
    rows_per_shard: int = Field(default=16, ge=1)
    batch_size: int = Field(default=8, ge=1, description="Prompts per teacher batch inside an actor.")
    actors: int | None = Field(default=None, ge=1, description="Teacher actors (default: one per free CPU or GPU).")
    use_gpu: bool = False
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="fp32",
        description="bf16: the teacher's ODE under bf16 autocast (its fp32 weights kept); states stored fp32; auto: "
        "bf16 where the device computes it natively.",
    )
    seed: int = 0


class StudentConfig(TrainConfig):
    """What the student stages share: the oracle evaluation of 4-step streaming samples after training."""

    eval_prompts: int = Field(default=64, ge=0, description="Held-out prompts (the teacher's evaluation prompts).")
    eval_latent_frames: int | None = Field(default=None, ge=1, description="Sample length (preset's clip length).")
    eval_batch_size: int = Field(default=16, ge=1)
    sample_prompts: int = Field(default=2, ge=0, description="Prompts of the sample videos logged while training.")
    curve_prompts: int = Field(
        default=16, ge=1, description="Held-out prompts of the learning curve (`eval_every`): 4-step streaming samples."
    )


class OdeInitConfig(StudentConfig):
    """ODE regression of the block-causal student onto the teacher's trajectories."""


class DmdConfig(StudentConfig):
    """Asymmetric DMD: causal generator, real score = `teacher` (or none: regression only), online critic.

    The recipe's defaults are CausVid's (tianweiy/CausVid, configs/wan_causal_dmd.yaml): equal generator and
    critic learning rates, 5 critic updates per generator update, each on its own fresh batch, a real-score
    guidance below the trajectories' (4.5 against 6.0), clean context chunks, gradients clipped at norm 10.
    """

    teacher: Literal["bidirectional", "causal", "none"] = "bidirectional"
    ode_init: bool = Field(default=True, description="Start from the ODE-initialised student (else the teacher).")
    guidance_scale: float | None = Field(
        default=None, ge=0, description="Real-score CFG scale (default: 0.75 of the trajectories' scale, as CausVid)."
    )
    critic_steps: int = Field(default=5, ge=1, description="Critic updates per generator update.")
    critic_lr: float | None = Field(default=None, gt=0, description="Critic learning rate (default: `lr`, as CausVid).")
    fresh_critic_batches: bool = Field(
        default=True, description="Each critic update draws its own batch, apart from the generator update's."
    )
    critic_warmup_steps: int = Field(default=0, ge=0, description="First steps that update the critic only.")
    clean_context: bool = Field(
        default=True, description="Chunks may draw t = 0 (clean latents as context, masked from the loss), as CausVid."
    )
    rollout: Literal["data", "self"] = Field(
        default="data", description="Generator inputs: noised data chunks, or its own KV-cached rollout (Self-Forcing)."
    )
    regression_weight: float = Field(
        default=0.0, ge=0, description="ODE-regression anchor added to the DMD loss (trains on the trajectories)."
    )
    grad_clip: float = Field(default=10.0, gt=0)
    t_min: float = Field(default=0.02, ge=0, le=1, description="DMD noise levels, unshifted; the shift applies.")
    t_max: float = Field(default=0.98, ge=0, le=1)
    t_buckets: int = Field(default=4, ge=1, description="Critic loss is logged per bucket of t.")
    ema_decay: float | None = Field(default=None, gt=0, lt=1, description="Evaluate and export an EMA of the generator.")
    diagnostics_every: int = Field(default=0, ge=0, description="Log x0 / x0_real / x0_fake and latent stats every N steps.")


class EvaluateConfig(Section):
    """Long rollouts of each model under test on held-out prompts, scored per second."""

    seconds: float = Field(default=30.0, gt=0)
    num_prompts: int = Field(default=8, ge=1)
    prompts_file: str | None = Field(
        default=None,
        description="Captions, one a line (local or s3://); without it the shapes world's held-out prompts. The oracle "
        "metrics need the shapes world and are skipped for a prompts file; the weight-free and CLIP metrics stay.",
    )
    seed: int = 1234
    models: list[Literal["dmd_student", "ode_init_student", "causal_teacher", "teacher"]] = [
        "dmd_student",
        "ode_init_student",
        "causal_teacher",
        "teacher",
    ]
    causal_teacher_steps: int = Field(default=16, ge=1, description="Euler steps per chunk of the causal teacher.")
    clip_checkpoint: str | None = Field(default=None, description="Local open_clip weights; CLIP metrics are skipped without.")
    applications: bool = Field(
        default=True, description="Measure the DMD student's zero-shot applications (applications.json, applications/...)."
    )
    applications_prompts: int = Field(default=2, ge=1, description="Held-out prompts per application.")
    applications_seconds: float = Field(
        default=8.0, gt=0, description="Length of each application rollout; dynamic prompting switches halfway."
    )
    applications_strength: float = Field(default=0.5, gt=0, le=1, description="Video-to-video noise strength.")


class PipelineConfig(Section):
    """The whole workflow's configuration; `configs/tiny.yaml` is the embedded default."""

    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    model: ModelConfig = ModelConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    clips: ClipsConfig = ClipsConfig()
    vae: VaeConfig = VaeConfig()
    latents: LatentsConfig = LatentsConfig()
    teacher: TeacherConfig = TeacherConfig()
    causal_teacher: CausalTeacherConfig = CausalTeacherConfig()
    trajectories: TrajectoriesConfig = TrajectoriesConfig()
    ode_init: OdeInitConfig = OdeInitConfig()
    dmd: DmdConfig = DmdConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML config (or the defaults) and apply `key.path=value` overrides, values parsed as YAML."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (pass an existing YAML file, e.g. configs/tiny.yaml)")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{where}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, e.g. `dmd: {{lr: 1e-5}}`")
        data = loaded or {}
    for item in overrides:
        _apply_override(data, item)
    return validate_config(data)


def validate_config(data: dict[str, Any]) -> PipelineConfig:
    """Validate a plain dict, turning pydantic's report into one line that names the key."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. dmd.lr=1e-5")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = raw


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(first["loc"][:-1])
        return f"unknown config key '{loc}' (allowed here: {', '.join(allowed)})"
    if kind == "literal_error":
        expected = first.get("ctx", {}).get("expected", "")
        return f"config key '{loc}': must be one of {expected} (got {first['input']!r})"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    message = first["msg"].removeprefix("Value error, ")
    return f"config key '{loc}': {message} (got {first['input']!r}){more}"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = PipelineConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def section_dump(section: BaseModel) -> dict[str, Any]:
    """A section as plain JSON-able data, the form that fingerprints and MLflow params use."""
    return section.model_dump(mode="json")
