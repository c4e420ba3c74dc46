"""bf16 inference (weights cast, not autocast) stays within a stated tolerance of fp32 for each network the
benchmark runs: the student's cached chunks, the teacher's CFG step and the VAE decode, on the tiny preset; and
the compiled networks the benchmark runs by default stream what the eager ones stream."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from model.precision import (
    for_inference,
    has_native_bf16,
    in_precision,
    precision_note,
    resolve_precision,
    weights_dtype,
)
from model.presets import get_preset
from model.streaming import stream
from model.vae import VAE
from training import sampling

PRESET = get_preset("tiny")


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, VAE, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    dit = PRESET.build_dit()
    dit.initialize(adaln_zero=False)
    vae = PRESET.build_vae()
    for gain in (m.gain for m in vae.modules() if hasattr(m, "gain")):
        torch.nn.init.normal_(gain, std=0.5)  # open the residual branches a trained VAE uses
    g = torch.Generator().manual_seed(1)
    text = (torch.randn(1, PRESET.text_len, PRESET.text_dim, generator=g), torch.ones(1, PRESET.text_len, dtype=torch.bool))
    return dit.eval(), vae.eval(), text


def _bf16(module: torch.nn.Module) -> torch.nn.Module:
    return for_inference(copy.deepcopy(module), "bf16")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_bf16_student_chunks_stay_within_two_percent_of_fp32(models: tuple) -> None:
    dit, _, text = models

    def rollout(model: torch.nn.Module) -> list[torch.Tensor]:
        chunks = stream(
            model, text, num_chunks=4, latent_shape=PRESET.latent_shape()[1:], schedule=PRESET.schedule(),
            window_chunks=PRESET.window_chunks, generator=torch.Generator().manual_seed(0),
        )
        return [c.latents for c in chunks]

    for fp32, bf16 in zip(rollout(dit), rollout(_bf16(dit))):
        assert bf16.dtype == torch.float32
        assert _relative(bf16, fp32) < 0.02  # measured 0.5-0.6 % over 4 chunks, the window full


def test_bf16_teacher_cfg_step_stays_within_four_percent_of_fp32(models: tuple) -> None:
    dit, _, text = models
    f, c, h, w = PRESET.latent_shape()
    x = torch.randn(1, f, c, h, w, generator=torch.Generator().manual_seed(2))
    t = torch.full((1, f), 0.7)
    with torch.no_grad():
        fp32 = dit.guided_velocity(x, t, *text, PRESET.guidance_scale, mode="bidirectional")
        bf16 = _bf16(dit).guided_velocity(x, t, *text, PRESET.guidance_scale, mode="bidirectional")
    assert _relative(bf16, fp32) < 0.04  # measured 1.4 %: guidance 5 amplifies the conditional difference


def test_bf16_streaming_decode_stays_within_tolerance_of_fp32(models: tuple) -> None:
    _, vae, _ = models
    latents = torch.randn(1, 6, *PRESET.latent_shape()[1:], generator=torch.Generator().manual_seed(3))
    bf16 = _bf16(vae)
    with torch.no_grad():
        fp32 = vae.decode(latents)
        decoder = bf16.stream_decoder()
        streamed = torch.cat([decoder.push(latents[:, :3]), decoder.push(latents[:, 3:])], dim=1)
    assert weights_dtype(bf16) == torch.bfloat16 and streamed.dtype == torch.float32
    assert _relative(streamed, fp32) < 0.04  # measured 1.6 % of the largest value, at the worst pixel
    assert (streamed - fp32).abs().mean() < 0.01  # measured 0.006: under one grey level of 255
    assert torch.allclose(streamed, bf16.decode(latents), atol=0.02)  # streaming equals the whole clip in bf16 too
    assert bf16.encode(fp32.clamp(-1, 1)).dtype == torch.float32



def test_compiled_blocks_and_decoder_stream_what_eager_ones_stream(models: tuple) -> None:
    dit, vae, text = models

    def rollout(model: torch.nn.Module, decoder: VAE) -> list[tuple[torch.Tensor, torch.Tensor]]:
        chunks = stream(
            model, text, num_chunks=4, latent_shape=PRESET.latent_shape()[1:], schedule=PRESET.schedule(),
            window_chunks=PRESET.window_chunks, vae=decoder, generator=torch.Generator().manual_seed(0),
        )
        return [(c.latents, c.video) for c in chunks]

    compiled_dit, compiled_vae = copy.deepcopy(dit), copy.deepcopy(vae)
    compiled_dit.compile_blocks()
    compiled_vae.compile_decoder()
    # four chunks: no cache, a growing one, then a full window that evicts (each a shape of its own)
    for (latents, video), (compiled_latents, compiled_video) in zip(rollout(dit, vae), rollout(compiled_dit, compiled_vae)):
        assert _relative(compiled_latents, latents) < 1e-4  # fp32: only the order of fused operations differs
        assert _relative(compiled_video, video) < 1e-4
    assert compiled_vae.decoder_compiled and not vae.decoder_compiled


def test_stage_samples_run_in_bf16_on_copies_and_leave_the_callers_weights_fp32(models: tuple) -> None:
    dit, vae, text = models
    shape = (3, *PRESET.latent_shape()[1:])
    kwargs = dict(schedule=PRESET.schedule(), steps=3, guidance_scale=PRESET.guidance_scale, seed=0)
    default = sampling.generate_videos(dit, vae, *text, shape, **kwargs)
    bf16 = sampling.generate_videos(_bf16(dit), _bf16(vae), *text, shape, **kwargs)
    fp32 = sampling.generate_videos(dit, vae, *text, shape, precision="fp32", **kwargs)
    assert weights_dtype(dit) == weights_dtype(vae) == torch.float32
    assert in_precision(dit, "fp32") is dit and weights_dtype(in_precision(dit, "bf16")) == torch.bfloat16
    assert np.array_equal(default, bf16 if has_native_bf16(torch.device("cpu")) else fp32)
    assert not np.array_equal(bf16, fp32)
    assert np.abs(bf16.astype(int) - fp32.astype(int)).mean() < 1.5  # grey levels of 255; measured 0.8
    with pytest.raises(ValueError, match="precision must be one of"):
        in_precision(dit, "fp16")


def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively() -> None:
    cpu = torch.device("cpu")
    native = has_native_bf16(cpu)
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert (resolve_precision("fp32", cpu), resolve_precision("bf16", cpu)) == ("fp32", "bf16")
    assert precision_note("fp32", cpu) == "precision fp32"
    assert precision_note("auto", cpu) == f"precision {'bf16' if native else 'fp32'} (auto)"
    emulated = precision_note("bf16", cpu)
    assert (emulated == "precision bf16") == native and emulated.startswith("precision bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", cpu)
