"""DiT equivalences: masks, KV-cached chunk-by-chunk inference, sliding windows, causality, guidance."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from model.attention import BlockCausalLayout, block_causal_attention, block_causal_mask, token_mask
from model.dit import DiT, DiTConfig

ATOL = 1e-5


def _latents(batch: int = 2, frames: int = 6, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 4, 8, 8, generator=g), torch.rand(batch, frames, generator=g)


@pytest.mark.parametrize("frames,chunk", [(1, 1), (5, 1), (6, 2), (7, 3), (9, 3), (10, 4), (4, 8)])
def test_block_causal_mask_matches_formula(frames: int, chunk: int) -> None:
    mask = block_causal_mask(frames, chunk)
    expected = torch.tensor([[j // chunk <= i // chunk for j in range(frames)] for i in range(frames)])
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("window,sink", [(1, False), (2, False), (2, True)])
def test_windowed_mask_matches_formula(window: int, sink: bool) -> None:
    frames, chunk = 11, 2
    mask = block_causal_mask(frames, chunk, window_chunks=window, sink=sink)
    for i in range(frames):
        for j in range(frames):
            ci, cj = i // chunk, j // chunk
            ok = cj <= ci and (ci - cj <= window or (sink and cj == 0))
            assert bool(mask[i, j]) == ok


def test_token_mask_expands_frames() -> None:
    tok = token_mask(block_causal_mask(4, 2), 3)
    assert tok.shape == (12, 12)
    for qi in range(12):
        for ki in range(12):
            assert bool(tok[qi, ki]) == ((ki // 3) // 2 <= (qi // 3) // 2)


def test_cached_chunks_equal_full_block_causal_forward(dit: DiT, text: tuple) -> None:
    x, t = _latents(frames=7)
    with torch.no_grad():
        full = dit(x, t, *text, mode="block_causal")
        cache = dit.new_cache()
        for start in range(0, 7, 2):
            sl = slice(start, start + 2)
            out = dit(x[:, sl], t[:, sl], *text, mode="block_causal", cache=cache)
            assert torch.allclose(out, full[:, sl], atol=ATOL), f"chunk at frame {start}"
            dit(x[:, sl], t[:, sl], *text, mode="block_causal", cache=cache, update_cache=True)
    assert cache.num_frames == 7 and cache.chunk_frames == [2, 2, 2, 1]


@pytest.mark.parametrize("window", [1, 2])
def test_sliding_window_cache_equals_windowed_full_forward(dit: DiT, text: tuple, window: int) -> None:
    x, t = _latents(frames=10)
    with torch.no_grad():
        full = dit(x, t, *text, mode="block_causal", window_chunks=window)
        cache = dit.new_cache(window_chunks=window)
        outs = [dit(x[:, s : s + 2], t[:, s : s + 2], *text, cache=cache, update_cache=True) for s in range(0, 10, 2)]
    assert torch.allclose(torch.cat(outs, 1), full, atol=ATOL)
    assert cache.chunk_frames == [2] * window
    assert cache.layers[0].k.shape[2] == window * 2 * 16


@pytest.mark.parametrize("sink", [False, True])
def test_sliding_window_equals_recompute_over_window_frames(text: tuple, sink: bool, make_dit: Callable) -> None:
    """With one layer the cached keys depend only on their own frames, so a rollout equals a fresh forward
    over exactly the frames in the window (sink first), including the rotary positions relative to the window."""
    model = make_dit(depth=1)
    x, t = _latents(frames=12)
    window = 3
    with torch.no_grad():
        cache = model.new_cache(window_chunks=window, sink=sink)
        for s in range(0, 10, 2):
            model(x[:, s : s + 2], t[:, s : s + 2], *text, mode="block_causal", cache=cache, update_cache=True)
        last = model(x[:, 10:12], t[:, 10:12], *text, mode="block_causal", cache=cache)
        kept = ([0, 1, 6, 7, 8, 9] if sink else [4, 5, 6, 7, 8, 9]) + [10, 11]
        fresh = model(x[:, kept], t[:, kept], *text, mode="block_causal")
    assert cache.num_frames == window * 2
    assert torch.allclose(last, fresh[:, -2:], atol=ATOL)


def test_long_rollout_positions_stay_in_training_range(dit: DiT, text: tuple) -> None:
    x, t = _latents(frames=2)
    cache = dit.new_cache(window_chunks=2, sink=True)
    with torch.no_grad():
        for _ in range(12):
            dit(x, t, *text, mode="block_causal", cache=cache, update_cache=True)
    assert cache.chunks_seen == 12
    assert cache.num_frames + 2 <= 3 * 2


def test_bidirectional_sees_the_future_block_causal_does_not(dit: DiT, text: tuple) -> None:
    x, t = _latents(frames=6)
    later = x.clone()
    later[:, 5] += 1.0
    with torch.no_grad():
        bi, bi2 = dit(x, t, *text, mode="bidirectional"), dit(later, t, *text, mode="bidirectional")
        bc, bc2 = dit(x, t, *text, mode="block_causal"), dit(later, t, *text, mode="block_causal")
        earlier = x.clone()
        earlier[:, 0] += 1.0
        bc3 = dit(earlier, t, *text, mode="block_causal")
    assert (bi[:, 0] - bi2[:, 0]).abs().max() > 1e-3
    assert torch.allclose(bc[:, :4], bc2[:, :4], atol=ATOL)
    assert (bc[:, 4:] - bc2[:, 4:]).abs().max() > 1e-3
    assert (bc[:, 2:] - bc3[:, 2:]).abs().max() > 1e-3


def test_per_frame_timesteps_modulate_their_own_frames(dit: DiT, text: tuple) -> None:
    x, t = _latents(frames=6)
    t2 = t.clone()
    t2[:, 4:] = 0.0
    with torch.no_grad():
        a, b = dit(x, t, *text, mode="block_causal"), dit(x, t2, *text, mode="block_causal")
    assert torch.allclose(a[:, :4], b[:, :4], atol=ATOL)
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3


def test_student_loads_teacher_state_dict(dit: DiT, text: tuple, make_dit: Callable) -> None:
    student = make_dit(seed=7, attention_mode="block_causal")
    student.load_state_dict(dit.state_dict())
    x, t = _latents()
    with torch.no_grad():
        assert torch.equal(student(x, t, *text), dit(x, t, *text, mode="block_causal"))
        assert not torch.allclose(student(x, t, *text), dit(x, t, *text), atol=1e-3)


def test_guided_velocity_is_the_cfg_combination(dit: DiT, text: tuple) -> None:
    x, t = _latents()
    emb, mask = text
    with torch.no_grad():
        cond = dit(x, t, emb, mask)
        null, null_mask = dit.null_text(2, emb.shape[1])
        uncond = dit(x, t, null, null_mask)
        assert torch.allclose(dit.guided_velocity(x, t, emb, mask, 4.0), uncond + 4.0 * (cond - uncond), atol=1e-4)
        assert torch.equal(dit.guided_velocity(x, t, emb, mask, 1.0), cond)


def test_null_text_and_caption_dropout(dit: DiT, text: tuple) -> None:
    emb, mask = text
    null, null_mask = dit.null_text(2, 5)
    assert null.shape == (2, 5, 16) and null_mask.tolist() == [[True, False, False, False, False]] * 2
    assert torch.equal(null[0, 0], dit.null_text_embedding[0]) and not null[:, 1:].any()
    dropped, dropped_mask = dit.drop_text(emb, mask, torch.tensor([True, False]))
    assert torch.equal(dropped[0], null[0]) and torch.equal(dropped[1], emb[1])
    assert torch.equal(dropped_mask[0], null_mask[0]) and torch.equal(dropped_mask[1], mask[1])


def test_padded_text_tokens_are_ignored(dit: DiT, make_text: Callable) -> None:
    emb, mask = make_text(batch=1, length=6)
    mask[:, 3:] = False
    other = emb.clone()
    other[:, 3:] = torch.randn(1, 3, 16)
    x, t = _latents(batch=1)
    with torch.no_grad():
        assert torch.allclose(dit(x, t, emb, mask), dit(x, t, other, mask), atol=ATOL)


def test_batched_cache_equals_per_sample(dit: DiT, text: tuple) -> None:
    x, t = _latents(frames=4)
    emb, mask = text
    with torch.no_grad():
        cache = dit.new_cache()
        dit(x[:, :2], t[:, :2], emb, mask, mode="block_causal", cache=cache, update_cache=True)
        both = dit(x[:, 2:], t[:, 2:], emb, mask, mode="block_causal", cache=cache)
        for b in range(2):
            c = dit.new_cache()
            one = slice(b, b + 1)
            dit(x[one, :2], t[one, :2], emb[one], mask[one], mode="block_causal", cache=c, update_cache=True)
            single = dit(x[one, 2:], t[one, 2:], emb[one], mask[one], mode="block_causal", cache=c)
            assert torch.allclose(both[one], single, atol=ATOL)


def test_gradient_checkpointing_keeps_gradients(text: tuple, make_dit: Callable) -> None:
    x, t = _latents()
    grads = []
    for ckpt in (False, True):
        model = make_dit().train()
        model.gradient_checkpointing = ckpt
        model(x, t, *text, mode="block_causal").square().mean().backward()
        grads.append(model.blocks[0].self_attn.q.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_adaln_zero_init_predicts_zero(make_dit: Callable, make_text: Callable) -> None:
    model = make_dit()
    model.initialize(adaln_zero=True)
    x, t = _latents()
    with torch.no_grad():
        assert not model(x, t, *make_text()).any()


@pytest.mark.parametrize(
    "frames,chunk,past,window,sink",
    [(7, 2, 0, None, False), (9, 3, 0, 1, False), (11, 2, 0, 2, True), (5, 2, 4, None, False), (6, 3, 6, None, False)],
)
def test_chunked_block_causal_attention_equals_masked_sdpa(
    frames: int, chunk: int, past: int, window: int | None, sink: bool
) -> None:
    g = torch.Generator().manual_seed(3)
    s = 4
    q = torch.randn(2, 3, frames * s, 8, generator=g)
    k, v = (torch.randn(2, 3, (past + frames) * s, 8, generator=g) for _ in range(2))
    layout = BlockCausalLayout.of(frames, chunk, s, past, window_chunks=window, sink=sink)
    mask = token_mask(block_causal_mask(frames, chunk, window_chunks=window, sink=sink), s)
    mask = torch.cat([mask.new_ones(mask.shape[0], past * s), mask], dim=1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (block_causal_attention(q, k, v, layout) - expected).abs().max().item() < 1e-6


def test_block_causal_forward_at_wans_size_holds_no_token_by_token_tensor() -> None:
    from model.presets import get_preset

    preset = get_preset("wan2.1-t2v-1.3b")
    dit = preset.build_dit("meta", depth=1, attention_mode="block_causal")
    f, c, h, w = preset.latent_shape()
    tokens = f * (h // 2) * (w // 2)
    shapes: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        dit(torch.empty(1, f, c, h, w, device="meta"), torch.empty(1, f, device="meta"),
            torch.empty(1, 512, 4096, device="meta"), torch.ones(1, 512, dtype=torch.bool, device="meta"))
    assert tokens == 32760 and shapes
    assert not any(len(s) >= 2 and s[-2:] == (tokens, tokens) for s in shapes)


@pytest.mark.parametrize("architecture", ["causvid", "wan2.1"])
def test_bf16_dit_reads_an_fp32_batch_and_matches_autocast(make_dit: Callable[..., DiT], text: tuple, architecture: str) -> None:
    x, t = _latents(frames=6)
    fp32 = make_dit(architecture=architecture, attention_mode="block_causal")
    with torch.no_grad():
        reference = fp32(x, t, *text)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = fp32(x, t, *text)
        bf16 = fp32.to(torch.bfloat16)
        whole = bf16(x, t, *text)
        cache = bf16.new_cache()
        chunks = []
        for start in range(0, 6, 2):
            sl = slice(start, start + 2)
            chunks.append(bf16(x[:, sl], t[:, sl], *text, cache=cache))
            bf16(x[:, sl], t[:, sl], *text, cache=cache, update_cache=True)
    scale = reference.abs().max().item()
    assert autocast.dtype == whole.dtype == torch.bfloat16
    assert (autocast.float() - reference).abs().max().item() < 0.02 * scale  # measured 0.6 %
    assert (whole.float() - reference).abs().max().item() < 0.03 * scale  # measured 0.8-1.0 %
    assert (torch.cat(chunks, dim=1).float() - whole.float()).abs().max().item() < 0.005 * scale


def test_cached_caption_is_reused_without_gradients_and_recomputed_with_them(dit: DiT, text: tuple) -> None:
    x, t = _latents(frames=2)
    cache = dit.new_cache()
    with torch.no_grad():
        first = dit(x, t, *text, cache=cache)
        kept = cache.text_kv
        again = dit(x, t, *text, cache=cache)
    assert cache.text_kv is kept and torch.equal(first, again)
    with_grad = dit(x, t, *text, cache=cache)
    with_grad.square().mean().backward()
    assert torch.allclose(with_grad, first, atol=ATOL)
    assert dit.blocks[0].cross_attn.k.weight.grad.abs().sum() > 0 and dit.text_embed[0].weight.grad is not None


def test_pooled_caption_conditioning_starts_as_identity_then_keeps_cache_and_padding_exact(
    dit: DiT, make_text: Callable, make_dit: Callable
) -> None:
    pooled = make_dit(pooled_text=True)
    missing, unexpected = pooled.load_state_dict(dit.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("text_pool.") for k in missing) and missing
    emb, mask = make_text(batch=2, length=6)
    mask[:, 4:] = False
    x, t = _latents(frames=6)
    with torch.no_grad():
        assert torch.allclose(pooled(x, t, emb, mask), dit(x, t, emb, mask), atol=ATOL)
        torch.nn.init.normal_(pooled.text_pool[-1].weight, std=0.5)
        conditioned = pooled(x, t, emb, mask, mode="block_causal")
        assert not torch.allclose(conditioned, dit(x, t, emb, mask, mode="block_causal"), atol=1e-3)
        other = emb.clone()
        other[:, 4:] = torch.randn(2, 2, 16)
        assert torch.allclose(pooled(x, t, other, mask, mode="block_causal"), conditioned, atol=ATOL)
        cache = pooled.new_cache()
        for start in range(0, 6, 2):
            sl = slice(start, start + 2)
            out = pooled(x[:, sl], t[:, sl], emb, mask, mode="block_causal", cache=cache)
            assert torch.allclose(out, conditioned[:, sl], atol=ATOL), f"chunk at frame {start}"
            pooled(x[:, sl], t[:, sl], emb, mask, mode="block_causal", cache=cache, update_cache=True)


def test_absolute_positions_are_dits_sincos_grid_per_frame_and_keep_streaming_exact(
    dit: DiT, text: tuple, make_dit: Callable
) -> None:
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    placed = make_dit(absolute_positions=True)
    assert torch.allclose(placed.spatial_positions(4, 4, torch.zeros(())), get_2d_sincos_pos_embed(64, 4, base_size=4).float())
    grid = placed.spatial_positions(3, 5, torch.zeros(())).view(3, 5, 64)
    assert torch.equal(grid[:1, :, :32].expand(3, 5, 32), grid[..., :32]), "the first half encodes the column"
    assert torch.equal(grid[:, :1, 32:].expand(3, 5, 32), grid[..., 32:]), "the second half encodes the row"
    x, t = _latents(frames=6)
    same = torch.zeros_like(x)
    tokens = placed.embed_patches(same).view(2, 6, 16, 64)
    assert torch.equal(tokens, tokens[:, :1].expand_as(tokens)), "every frame gets the same positions"
    assert len(torch.unique(tokens[0, 0], dim=0)) == 16, "identical patches differ by where they are"
    assert torch.equal(make_dit().embed_patches(same), torch.zeros(2, 96, 64)), "off: a token knows only its patch"
    with pytest.raises(ValueError, match="causvid architecture"):
        DiTConfig(absolute_positions=True, architecture="wan2.1")
    emb, mask = text
    with torch.no_grad():
        full = placed(x, t, emb, mask, mode="block_causal")
        assert not torch.allclose(full, dit(x, t, emb, mask, mode="block_causal"), atol=1e-3)
        cache = placed.new_cache()
        for start in range(0, 6, 2):
            sl = slice(start, start + 2)
            assert torch.allclose(placed(x[:, sl], t[:, sl], emb, mask, mode="block_causal", cache=cache), full[:, sl], atol=ATOL)
            placed(x[:, sl], t[:, sl], emb, mask, mode="block_causal", cache=cache, update_cache=True)
