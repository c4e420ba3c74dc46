"""A pretrained Wan teacher (a tiny random diffusers one) imported and taken by every stage from trajectories on."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from evaluation.checkpoint import resolve_checkpoint
from infra import storage, tracking
from infra.cli import main
from infra.config import ConfigError, load_config
from model.presets import get_preset
from model.wan import WanVAE, dit_from_diffusers
from model.weights import MODEL_FILE, SAFETENSORS_FILE, load_model, save_model, weights_digest
from pipelines.workflow import plan, run_stages
from tests.world import FAST, random_dit, write_world

TINY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=8, out_channels=8,
    text_dim=384, freq_dim=64, ffn_dim=128, num_layers=2, rope_max_seq_len=64,
)
TINY_WAN_VAE = dict(  # the tiny preset's latent space: 8 channels, space / 4, time / 4
    base_dim=8, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
    latents_mean=[0.0] * 8, latents_std=[1.0] * 8,
)
EVALUATE = ("evaluate.seconds=2", "evaluate.num_prompts=1", "evaluate.causal_teacher_steps=2", "evaluate.applications=false")
LEANER = ("trajectories.num_prompts=4", "ode_init.eval_prompts=0")


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wan")
    torch.manual_seed(0)
    WanTransformer3DModel(**TINY_WAN).save_pretrained(folder / "transformer")
    AutoencoderKLWan(**TINY_WAN_VAE).save_pretrained(folder / "vae")
    return folder


def test_imported_wan_teacher_runs_trajectories_to_evaluate(
    ray_local: None, wan_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse in a storm at night\n\n")
    settings = [f"storage.root={root}", "model.preset=tiny-wan2.1", *FAST, *LEANER, *EVALUATE,
                f"evaluate.prompts_file={prompts}"]
    base = load_config(None, settings)
    assert main(["import-teacher", "--format", "diffusers", str(wan_folder), *(f"--set={s}" for s in settings[:2])]) == 0
    uri = capsys.readouterr().out.strip().splitlines()[-1]
    manifest = storage.read_manifest(uri)
    digest = weights_digest(storage.read_bytes(storage.join(uri, SAFETENSORS_FILE)))
    assert manifest["fingerprint"] == digest[:16] == uri.rsplit("/", 1)[1]

    teacher = load_model(storage.join(uri, MODEL_FILE))
    direct = dit_from_diffusers(wan_folder, chunk_frames=3, text_len=32)
    assert teacher.cfg == direct.cfg == get_preset("tiny-wan2.1").dit
    for key, value in direct.state_dict().items():
        if key != "null_text_embedding":
            assert torch.equal(teacher.state_dict()[key], value), key
    vae = load_model(storage.join(uri, "vae", MODEL_FILE))
    assert isinstance(vae, WanVAE) and manifest["summary"]["vae"] == storage.join(uri, "vae", MODEL_FILE)
    assert vae.encode(torch.zeros(1, 5, 3, 64, 64)).shape == (1, 2, 8, 16, 16)
    empty, empty_mask = get_preset("tiny").text_encoder_for().encode([""])
    assert torch.equal(teacher.null_text_embedding, empty[0] * empty_mask[0, :, None])

    config = load_config(None, [*settings, f"teacher.source={uri}"])
    write_world(base)
    the_plan = plan(config)
    assert the_plan.output_uri("teacher") == uri and the_plan.fingerprints["teacher"] == manifest["fingerprint"]
    assert the_plan.fingerprints["trajectories"] != plan(base).fingerprints["trajectories"]
    with_vae = plan(load_config(None, [*settings, f"teacher.source={uri}", f"vae.source={uri}/vae"]))
    assert with_vae.output_uri("vae") == f"{uri}/vae" and with_vae.fingerprints["latents"] != the_plan.fingerprints["latents"]
    causal = the_plan.output_uri("causal_teacher")
    save_model(storage.join(causal, MODEL_FILE), random_dit(2, "block_causal"), kind="dit", preset="tiny", step=0)
    storage.write_manifest(causal, {"fingerprint": the_plan.fingerprints["causal_teacher"], "summary": {}})
    storage.write_manifest(the_plan.output_uri("vae"), {"fingerprint": the_plan.fingerprints["vae"], "summary": {}})

    outputs = run_stages(config, ["trajectories", "ode_init", "dmd", "evaluate"])
    assert storage.read_manifest(outputs["trajectories"])["inputs"]["teacher"] == uri
    student = load_model(storage.join(outputs["dmd"], MODEL_FILE))
    assert student.cfg.architecture == "wan2.1" and student.attention_mode == "block_causal"
    assert torch.equal(student.null_text_embedding, teacher.null_text_embedding)
    summary = storage.read_json(storage.join(outputs["evaluate"], "summary.json"))
    assert set(summary["models"]) == {"dmd_student", "ode_init_student", "causal_teacher", "teacher"}
    student = summary["models"]["dmd_student"]
    assert "color_acc" not in student and "persistence" not in student  # no oracle for free-form captions
    assert 0.0 <= student["temporal_flickering"] <= 1.0 and student["seconds_of_video"] == 2

    tracking.configure(config)
    model_id = mlflow.get_run(manifest["mlflow_run_id"]).outputs.model_outputs[0].model_id
    vae = storage.join(plan(base).output_uri("vae"), MODEL_FILE)
    assert resolve_checkpoint(f"models:/{model_id}", vae=vae, config=config).model_uri == storage.join(uri, MODEL_FILE)
    with pytest.raises(ConfigError, match="cannot be forced"):
        run_stages(config, ["teacher"], force=["teacher"])


def test_a_teacher_for_another_preset_is_one_line_naming_both(wan_folder: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import-teacher", str(wan_folder), "--set", f"storage.root={tmp_path}", "--set", "model.preset=tiny"]) == 2
    assert capsys.readouterr().err.strip() == (
        "causvid: error: the imported transformer is not preset tiny's DiT: dim 64 (preset 128), depth 2 (preset 4), "
        "heads 2 (preset 4), ffn_dim 128 (preset 512), freq_dim 64 (preset 128), null_text_len 32 (preset 1), "
        "architecture wan2.1 (preset causvid), pooled_text False (preset True), absolute_positions False (preset True)"
    )
