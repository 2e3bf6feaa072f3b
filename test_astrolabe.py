"""The paper's mechanisms, in the paper's order. CPU, tiny seeded models, fresh random inputs; each test compares
against an independent reference (diffusers' own forward with a dense mask built here, separate full copies,
independent rollouts, hand tables, autograd, transformers' stock Qwen2-VL forward).

First the independent dense teacher-forcing reference; then Sec. 3's rolling KV cache (sink + window), Eq. 3's
shared prefix and group rollout, Streaming Long Tuning's clip forward, Eq. 1-2's negative-aware policy loss, Eq. 4's
advantages, selective KL with the uncertainty mask and the dynamic reference, and the rewards. Everything else
(loaders, decoding, the trainer, checkpoints, several processes, bad input, ...) is under tests/, one concern per
file; the plain helpers this file shares with them are in tests/helpers.py."""
import copy
import json
import math
import os
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import config
import model as M
import policy as policy_mod
import reward_models
import rewards
from loss import Controller, advantages, copy_, ema_, kl_loss, policy_loss
from reward_models import HPSV3_TEXT, VIDEOALIGN_TEXT, VideoAlign, sample_indices, to_patches, top30_mean
from rewards import build_reward, smoothness
from rollout import clip_velocity, draw_noise, generate, group_rollout, new_cache

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))  # for tests/helpers.py
from helpers import N, PIXELS, text_kv, video  # noqa: E402
from helpers import hps, tok, va  # noqa: E402,F401 (pytest fixtures, shared with the other files that score)

torch.set_num_threads(1)  # tiny tensors: threads cost more than they give, and CI has 2 cores


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    return M.load_tiny(seed=0)


# ------------------------------------------------------------------ the independent dense teacher-forcing reference
class MaskedAttention:
    """A diffusers attention processor with a dense mask and explicit RoPE positions (test-only)."""

    def __init__(self, mask, cos, sin):
        self.mask, self.cos, self.sin = mask, cos, sin

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        def rope(x):  # diffusers' interleaved real formula, written out
            x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
            c, s = self.cos[..., 0::2], self.sin[..., 1::2]
            return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)
        q = rope(attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1)))
        k = rope(attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1)))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=self.mask)
        return attn.to_out[0](o.transpose(1, 2).flatten(2))


def teacher_forcing_reference(wan, clean, noisy, t_noisy, text, sink, window):
    """One full-sequence diffusers forward over [clean frames, noisy frames] (both at positions
    0..F-1) with a dense sink+window block-causal mask: a clean block sees the clean frames up to its
    end inside its window; a noisy block sees the clean frames of earlier blocks inside its window
    and itself. Returns (clean outputs, noisy outputs)."""
    tr = wan.model.transformer
    _, C, Fr, H, W = clean.shape
    tpf = (H // 2) * (W // 2)
    frame = torch.arange(2 * Fr).repeat_interleave(tpf) % Fr
    noisy_tok = torch.arange(2 * Fr).repeat_interleave(tpf) >= Fr
    block = frame // N
    end = (block + 1) * N  # one past the query block's last frame
    kf = frame[None, :]
    in_window = (kf < sink) | (kf >= end[:, None] - window)
    clean_key = ~noisy_tok[None, :]
    mask = torch.where(noisy_tok[:, None],
                       (clean_key & (kf < block[:, None] * N) & in_window) | (noisy_tok[None, :] & (block[None, :] == block[:, None])),
                       clean_key & (kf < end[:, None]) & in_window)
    cos, sin = tr.rope(torch.zeros(1, C, Fr, H, W))
    cos, sin = torch.cat([cos, cos], 1), torch.cat([sin, sin], 1)
    saved = [b.attn1.processor for b in tr.blocks]
    for b in tr.blocks:
        b.attn1.processor = MaskedAttention(mask, cos, sin)
    t = torch.cat([torch.zeros(Fr), t_noisy.repeat_interleave(N)]).repeat_interleave(tpf)[None]
    try:
        with torch.no_grad():
            out = tr(torch.cat([clean, noisy], 2), t, text, return_dict=False)[0]
    finally:
        for b, p in zip(tr.blocks, saved):
            b.attn1.processor = p
    return out[:, :, :Fr], out[:, :, Fr:], mask


def cached_block_by_block(wan, clean, noisy, t_noisy, kv, sink, window):
    m = wan.model
    cache = new_cache(m, 1, clean.shape[1:], sink, window, N)
    outs_clean, outs_noisy, frames_seen = [], [], []
    with torch.no_grad():
        for b in range(clean.shape[2] // N):
            s = b * N
            cache.begin_block(s, N)
            frames_seen.append(list(cache.frames))
            outs_noisy.append(m(noisy[:, :, s:s + N], t_noisy[b], kv, cache, s, store=True))
            outs_clean.append(m(clean[:, :, s:s + N], 0.0, kv, cache, s, store=True))  # context pass
    return torch.cat(outs_clean, 2), torch.cat(outs_noisy, 2), frames_seen, cache


@pytest.mark.parametrize("sink,window,blocks", [(3, 9, 3), (0, 21, 4), (3, 9, 6), (3, 6, 5)])
def test_cache_path_equals_dense_teacher_forcing(wan, sink, window, blocks):
    """(3, 9, 3) and (0, 21, 4): the window covers the video, i.e. full block-causal attention."""
    torch.manual_seed(sink * 100 + window + blocks)
    shape = (1, 16, blocks * N, 8, 8)
    clean, noisy = torch.randn(shape), torch.randn(shape)
    t_noisy = torch.tensor(M.SIGMAS)[torch.randint(0, 4, (blocks,))] * 1000
    text = wan.text_encoder(["a red car drives through the rain"])
    ref_clean, ref_noisy, _ = teacher_forcing_reference(wan, clean, noisy, t_noisy, text, sink, window)
    out_clean, out_noisy, _, _ = cached_block_by_block(wan, clean, noisy, t_noisy, wan.model.text_kv(text), sink, window)
    torch.testing.assert_close(out_noisy, ref_noisy, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_clean, ref_clean, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ Sec. 3: the rolling KV cache, sink + window
def test_sink_and_window_frames(wan):
    """sink 3, window 9: block 5 (frames 15-17) attends to frames 0-2 and 9-17 and nothing else."""
    torch.manual_seed(1)
    shape = (1, 16, 18, 8, 8)
    clean, noisy = torch.randn(shape), torch.randn(shape)
    t = torch.full((6,), 937.5)
    text = wan.text_encoder(["a cat"])
    _, _, mask = teacher_forcing_reference(wan, clean, noisy, t, text, 3, 9)
    _, _, seen, cache = cached_block_by_block(wan, clean, noisy, t, wan.model.text_kv(text), 3, 9)
    assert seen[5] == [0, 1, 2] + list(range(9, 18))
    tpf = 16
    row = mask[(18 + 15) * tpf]  # first token of noisy block 5 in the dense reference
    clean_frames = sorted(set((row[:18 * tpf].nonzero().flatten() // tpf).tolist()))
    noisy_frames = sorted(set((row[18 * tpf:].nonzero().flatten() // tpf).tolist()))
    assert clean_frames + noisy_frames == [0, 1, 2] + list(range(9, 18))


def test_sink_slots_never_move_and_keys_keep_absolute_positions(wan):
    torch.manual_seed(2)
    m = wan.model
    kv = text_kv(wan)
    cache = new_cache(m, 1, (16, 18, 8, 8), 3, 6, N)
    x = torch.randn(1, 16, 18, 8, 8)
    sink_k = None
    with torch.no_grad():
        for b in range(6):
            cache.begin_block(b * N, N)
            m(x[:, :, b * N:(b + 1) * N], 0.0, kv, cache, b * N, store=True)
            if b == 0:
                sink_k = torch.stack([k[:, :3 * 16] for k in cache.k]).clone()
        assert cache.frames[:3] == [0, 1, 2]
        torch.testing.assert_close(torch.stack([k[:, :3 * 16] for k in cache.k]), sink_k, atol=0, rtol=0)
        # layer-0 keys depend only on the block's own input: recompute frames 15-17 alone at
        # absolute position 15, and at the slot position they occupy (wrong) for contrast.
        slot = cache.frames.index(15)
        for start, same in ((15, True), (slot, False)):
            alone = new_cache(m, 1, (16, 3, 8, 8), 0, 3, N)
            alone.begin_block(start, N)
            m(x[:, :, 15:18], 0.0, kv, alone, start, store=True)
            held = cache.k[0][:, slot * 16:(slot + 3) * 16]
            assert torch.allclose(alone.k[0][:, :48], held, atol=1e-6) == same


def test_long_rollout_keeps_cache_bytes_constant(wan):
    m, kv = wan.model, text_kv(wan)
    noise = draw_noise(40, 1, (16, 24, 8, 8))
    cache = new_cache(m, 1, (16, 24, 8, 8), 3, 6, N)
    used, out = [], []
    for b in range(8):  # one block per call == one long call (the noise is sliced the same way)
        out.append(generate(m, kv, noise[:, :, :, b * N:(b + 1) * N], cache, start_frame=b * N))
        used.append(cache.bytes_in_use())
    assert used[1] < used[2] and len(set(used[2:])) == 1  # full at sink 3 + window 6 = 9 frames
    short = generate(m, kv, noise[:, :, :, :9], new_cache(m, 1, (16, 9, 8, 8), 3, 6, N))
    torch.testing.assert_close(torch.cat(out[:3], 2), short, atol=1e-5, rtol=0)
    one_call = generate(m, kv, noise, new_cache(m, 1, (16, 24, 8, 8), 3, 6, N))
    torch.testing.assert_close(torch.cat(out, 2), one_call, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ Eq. 3: one shared prefix, a group of candidates
def test_group_expansion_equals_separate_copies(wan):
    torch.manual_seed(3)
    m, kv, G = wan.model, text_kv(wan), 3
    history = new_cache(m, 1, (16, 6, 8, 8), 3, 9, N)
    generate(m, kv, draw_noise(10, 1, (16, 6, 8, 8)), history)
    noise = draw_noise(11, G, (16, 6, 8, 8))
    group = history.fork(G, 6, N)
    out = generate(m, kv, noise, group, start_frame=6)
    for i in range(G):
        own = copy.deepcopy(history)  # a full, separate copy of the history cache
        ref = generate(m, kv, noise[i:i + 1], own, start_frame=6)
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-5, rtol=0)
    assert all(p.data_ptr() == k.data_ptr() for p, k in zip(group.prefix[0], history.k))  # shared, no copy
    per_frame = 2 * m.transformer.config.num_layers * 16 * 2 * 16 * 4  # K+V, layers, tokens, heads, dim, fp32
    assert group.bytes_in_use() == G * 6 * per_frame  # only the candidates' own clip frames


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rollout_join_of_the_shared_prefix_equals_the_expanded_concatenation(dtype, monkeypatch):
    """KVCache.attend's join (the sink's and the window's prefix ranges, then each candidate's own frames, copied
    candidate by candidate from dense pieces) holds exactly what torch.cat of the prefix expanded to the batch holds,
    and hands torch.cat only contiguous inputs (the condition of PyTorch's vectorised CUDA cat; the expanded prefix
    is not)."""
    from kv_cache import join_rows
    g = torch.Generator().manual_seed(5)
    shared, own = torch.randn(1, 40, 2, 8, generator=g).to(dtype), torch.randn(3, 12, 2, 8, generator=g).to(dtype)
    tokens = ((0, 6), (14, 40))
    cat, inputs = torch.cat, []
    monkeypatch.setattr(torch, "cat", lambda xs, *a, **k: (inputs.extend(xs), cat(xs, *a, **k))[1])
    joined = join_rows(shared, tokens, own[:, :9])
    monkeypatch.undo()
    assert len(inputs) == 9 and all(x.is_contiguous() for x in inputs)
    ref = torch.cat([shared[:, a:b].expand(3, -1, -1, -1) for a, b in tokens] + [own[:, :9]], 1)
    assert joined.shape == ref.shape == (3, 41, 2, 8) and joined.is_contiguous()
    assert torch.equal(joined, ref)


def test_group_candidate_equals_independent_rollout(wan):
    """Candidate i == regenerating the same history from scratch, then candidate i's noise."""
    m, kv = wan.model, text_kv(wan)
    hist_noise, clip_noise = draw_noise(20, 1, (16, 6, 8, 8)), draw_noise(21, 3, (16, 6, 8, 8))
    g = group_rollout(m, kv, hist_noise, clip_noise, sink_frames=3, window_frames=6, micro_batch=2)
    for i in range(3):
        cache = new_cache(m, 1, (16, 12, 8, 8), 3, 6, N)
        full = generate(m, kv, torch.cat([hist_noise, clip_noise[i:i + 1]], dim=3), cache)
        torch.testing.assert_close(g.history, full[:, :, :6], atol=1e-5, rtol=0)
        torch.testing.assert_close(g.clips[i:i + 1], full[:, :, 6:], atol=1e-5, rtol=0)


def test_same_seed_any_micro_batch_gives_identical_outputs(wan):
    m, kv = wan.model, text_kv(wan)
    hist_noise, clip_noise = draw_noise(30, 1, (16, 3, 8, 8)), draw_noise(31, 4, (16, 6, 8, 8))
    a = group_rollout(m, kv, hist_noise, clip_noise, 3, 9, micro_batch=1).clips
    b = group_rollout(m, kv, hist_noise, clip_noise, 3, 9, micro_batch=4).clips
    c = group_rollout(m, kv, draw_noise(30, 1, (16, 3, 8, 8)), draw_noise(31, 4, (16, 6, 8, 8)), 3, 9, micro_batch=3).clips
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=0)
    assert not torch.allclose(a[0], a[1])  # different candidates really differ


# --------------------------------------------- Streaming Long Tuning: the clip's training forward, the history detached
@pytest.mark.parametrize("clip", [6, 3])
def test_train_forward_matches_rollout_velocity(wan, clip):
    """At theta = theta_old, the training forward on the x_t the sampler saw at step k returns the
    sampler's own velocity, for every block of the clip (same attention layout); with a one-block clip,
    clip_cache recomputes no clip K/V at all (the block reads only the history)."""
    w = copy.deepcopy(wan)
    policy = policy_mod.Policy(config.parse_config(["--lora_rank=4", "--lora_alpha=4"]), w, 1)
    with torch.no_grad():  # make theta = theta_old non-trivial: LoRA B starts at zero
        for p_default, p_old in zip(policy.params("default"), policy.params("old")):
            p_default.normal_(0, 0.05)
            p_old.copy_(p_default)
    old = policy.net("old")
    kv = old.text_kv(w.text_encoder(["a red car"]))
    seen, k = [], 2
    forward = old.forward

    def record(x, timestep, text_kv, cache=None, start_frame=0, store=False):
        v = forward(x, timestep, text_kv, cache, start_frame, store)
        if start_frame >= 3 and timestep == M.SIGMAS[k] * 1000:
            seen.append((start_frame, x.clone(), v.clone()))
        return v
    old.forward = record
    g = group_rollout(old, kv, draw_noise(60, 1, (16, 3, 8, 8)), draw_noise(61, 2, (16, clip, 8, 8)), 3, 3 + clip)
    del old.forward
    assert [s for s, _, _ in seen] == list(range(3, 3 + clip, 3))
    x_t = torch.cat([x for _, x, _ in seen], dim=2)
    cache = g.clip_cache(old, kv, 0, 2)  # the clean clip K/V, recomputed as the trainer does
    policy.net("default")
    v = policy_mod.ClipForward(policy.model, N)(w.text_encoder(["a red car"]), x_t, torch.full((2,), M.SIGMAS[k]), cache, 3)
    torch.testing.assert_close(v, torch.cat([v for _, _, v in seen], dim=2), atol=1e-5, rtol=0)


def test_rollouts_and_clip_cache_skip_only_the_context_pass_nothing_reads(wan):
    """The candidates' last clip block is written into a cache nobody reads (the rollout drops its buffers, and in
    the training forward a block attends only to the blocks before it): it gets no context pass, the history's last
    block and every earlier clip block do. The training forward still returns the sampler's velocities
    (test_train_forward_matches_rollout_velocity)."""
    m, kv = wan.model, text_kv(wan)
    passes, forward = [], m.forward

    def record(x, timestep, text_kv, cache=None, start_frame=0, store=False):
        if timestep == 0.0:
            passes.append((start_frame, x.shape[0]))
        return forward(x, timestep, text_kv, cache, start_frame, store)
    m.forward = record
    try:  # history 6 frames, clips of 3 blocks, 4 candidates in micro-batches of 3
        g = group_rollout(m, kv, draw_noise(70, 1, (16, 6, 8, 8)), draw_noise(71, 4, (16, 9, 8, 8)), 3, 12,
                          micro_batch=3)
        assert passes == [(0, 1), (3, 1), (6, 3), (9, 3), (6, 1), (9, 1)]
        passes.clear()
        g.clip_cache(m, kv, 1, 2)
        assert passes == [(6, 2), (9, 2)]
    finally:
        del m.forward


def test_no_gradient_reaches_history(wan):
    torch.manual_seed(4)
    m = wan.model
    params = [p for p in m.parameters()]

    def run(detach):
        for p in params:
            p.grad = None
        kv = text_kv(wan)  # with gradients: the trainable text-side projections get them too
        x_hist = torch.randn(1, 16, 3, 8, 8, requires_grad=True)
        history = new_cache(m, 1, (16, 3, 8, 8), 3, 9, N)
        history.begin_block(0, N)  # a history computed WITH autograd on, as a leaky trainer would
        m(x_hist, 0.0, kv, history, 0, store=True)
        group = history.fork(2, 6, N)
        if detach:
            group.detach_()
        with torch.no_grad():
            generate(m, kv, draw_noise(5, 2, (16, 6, 8, 8)), group, start_frame=3)
        v = clip_velocity(m, torch.randn(2, 16, 6, 8, 8), torch.tensor([0.9, 0.6]), kv, group, 3)
        v.square().mean().backward()
        return x_hist.grad, m.transformer.blocks[0].attn1.to_q.weight.grad

    leak, _ = run(detach=False)
    assert leak is not None and leak.abs().sum() > 0  # the check can fail: without detach, gradient leaks
    hist_grad, clip_grad = run(detach=True)
    assert hist_grad is None
    assert clip_grad is not None and clip_grad.abs().sum() > 0
    for p in params:
        p.grad = None


def test_history_gets_no_gradient_clip_parameters_do(wan):
    w = copy.deepcopy(wan)
    policy = policy_mod.Policy(config.parse_config([]), w, 1)
    with torch.enable_grad():
        old = policy.net("old")
        kv = old.text_kv(w.text_encoder(["a cat"]))
        g = group_rollout(old, kv, draw_noise(1, 1, (16, 6, 8, 8)), draw_noise(2, 2, (16, 3, 8, 8)), 3, 9)
        cache = g.clip_cache(old, kv, 0, 2)
    history_kv = g.cache.k + g.cache.v
    assert all(t.grad_fn is None and not t.requires_grad for t in history_kv + cache.k + cache.v + [g.history])
    policy.net("default")
    with torch.no_grad():
        for p in policy.params("default"):
            p.normal_(0, 0.05)  # LoRA B = 0 would zero the A gradients
    v = policy_mod.ClipForward(policy.model, N)(w.text_encoder(["a cat"]), torch.randn(2, 16, 3, 8, 8),
                                                torch.tensor([0.9, 0.6]), cache, 6)
    v.square().mean().backward()
    grads = [p.grad for p in policy.params("default")]
    assert all(gr is not None for gr in grads) and all(gr.abs().sum() > 0 for gr in grads)
    assert all(p.grad is None for p in policy.params("old") + policy.params("ref"))
    assert all(t.grad is None for t in history_kv + cache.prefix[0] + cache.prefix[1])


# ------------------------------------------------------------------ Eq. 1-2: the negative-aware policy loss
@pytest.mark.parametrize("r, effect", [(0.75, "closer"), (0.25, "farther"), (0.5, "none")])
def test_direction_on_toy_velocity_model(r, effect):
    """A > 0 (r > 1/2) moves v_theta toward eps - x0, A < 0 away, A = 0 at theta = theta_old gives no gradient."""
    torch.manual_seed(0)
    B, D, t = 6, 10, 0.625
    model = torch.nn.Linear(D, D)  # toy velocity model v(x_t)
    old = copy.deepcopy(model)  # theta_old = theta
    x0, eps = torch.randn(B, D), torch.randn(B, D)
    x_t = (1 - t) * x0 + t * eps
    dist_to_target = lambda: (model(x_t) - (eps - x0)).norm().item()
    before = dist_to_target()
    with torch.no_grad():
        x0_old = x_t - t * old(x_t)
    loss = policy_loss(x_t - t * model(x_t), x0_old, x0, torch.full((B,), r))
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    if effect == "none":
        assert grad.abs().max() < 1e-7
        return
    assert grad.abs().max() > 1e-3
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    after = dist_to_target()
    assert (after < before - 1e-4) if effect == "closer" else (after > before + 1e-4)


def test_analytic_gradient_at_theta_old():
    """dL_i/dx0_theta = (2 beta / D)(2 r_i - 1)(x0_old - x0) at x0_theta = x0_old (L = mean of L_i, so times B)."""
    torch.manual_seed(1)
    B, shape, beta = 5, (3, 2, 4, 4), 0.7
    D = math.prod(shape)
    x0, x0_old = torch.randn(B, *shape), torch.randn(B, *shape)
    r = torch.rand(B)
    x0_theta = x0_old.clone().requires_grad_()
    policy_loss(x0_theta, x0_old, x0, r, beta=beta).backward()
    expected = (2 * beta / D) * (2 * r - 1).view(-1, 1, 1, 1, 1) * (x0_old - x0)
    torch.testing.assert_close(x0_theta.grad * B, expected, rtol=1e-5, atol=1e-7)


def test_policy_loss_value_and_micro_batches():
    torch.manual_seed(2)
    B = 6
    x0_theta, x0_old, x0, r = torch.randn(B, 3, 5), torch.randn(B, 3, 5), torch.randn(B, 3, 5), torch.rand(B)
    beta = 0.8
    # independent per-sample loop
    ref = 0.0
    for i in range(B):
        plus = (1 - beta) * x0_old[i] + beta * x0_theta[i]
        minus = (1 + beta) * x0_old[i] - beta * x0_theta[i]
        ref += r[i] * ((plus - x0[i]) ** 2).mean() + (1 - r[i]) * ((minus - x0[i]) ** 2).mean()
    full = policy_loss(x0_theta, x0_old, x0, r, beta=beta)
    torch.testing.assert_close(full, ref / B)
    parts = sum(policy_loss(x0_theta[s], x0_old[s], x0[s], r[s], beta=beta, n=B) for s in (slice(0, 4), slice(4, 6)))
    torch.testing.assert_close(parts, full)


# ------------------------------------------------------------------ Eq. 4: advantages
def test_advantages_hand_table():
    # group 1: fifteen 0 and one 16 (mean 1); group 2: eight 1 and eight 3 (mean 2).
    # global mean 1.5, population variance (15 * 1.5^2 + 14.5^2 + 8 * 0.5^2 + 8 * 1.5^2) / 32 = 264 / 32 = 8.25
    g1 = [0.0] * 15 + [16.0]
    g2 = [1.0, 3.0] * 8
    A, r = advantages(torch.tensor(g1 + g2), group_size=16)
    s = math.sqrt(8.25) + 1e-4
    exp_A = [-1 / s] * 15 + [5.0] + [-1 / s, 1 / s] * 8  # 15 / s = 5.22 is clipped to A_max = 5
    exp_r = [0.5 - 0.1 / s] * 15 + [1.0] + [0.5 - 0.1 / s, 0.5 + 0.1 / s] * 8
    torch.testing.assert_close(A, torch.tensor(exp_A))
    torch.testing.assert_close(r, torch.tensor(exp_r))


# ---------------------------------------------------- selective KL, the uncertainty mask, the dynamic reference and EMA
# ---- selective KL ----

def test_kl_loss_masked_mean_and_zero():
    torch.manual_seed(3)
    th, ref = torch.randn(6, 2, 3), torch.randn(6, 2, 3)
    mask = torch.tensor([True, False, True, False, False, True])
    expected = 1e-4 * sum(((th[i] - ref[i]) ** 2).mean() for i in (0, 2, 5)) / 3
    torch.testing.assert_close(kl_loss(th, ref, mask), expected)
    parts = kl_loss(th[:3], ref[:3], mask[:3], n_masked=3) + kl_loss(th[3:], ref[3:], mask[3:], n_masked=3)
    torch.testing.assert_close(parts, expected)
    zero = kl_loss(th, None, torch.zeros(6, dtype=torch.bool))  # no reference forward needed
    assert zero.item() == 0.0


# ---- the uncertainty mask ----

def np_ranks(x):  # ascending ranks 1..N of distinct values, independent of loss._rank
    return np.argsort(np.argsort(x, kind="stable"), kind="stable") + 1.0


def test_rank_sign_and_threshold():
    g = np.random.default_rng(4)
    N, K = 40, 2
    P, X = g.normal(size=N), g.normal(size=(N, K))
    P[0], X[0] = P.max() + 1, X.min() - 1  # primary's top, auxiliaries' bottom: hacking suspect
    P[1], X[1] = P.min() - 1, X.max() + 1  # the reverse: not suspicious
    mask = Controller().uncertainty_mask(torch.tensor(P), torch.tensor(X))
    assert mask[0] and not mask[1]
    d = np_ranks(P) - np.mean([np_ranks(X[:, k]) for k in range(K)], axis=0)
    tau = np.percentile(d[d >= 0], 100 * (1 - 0.1))  # first step: rho = 0.1 unchanged
    np.testing.assert_array_equal(mask.numpy(), d > tau)
    assert 0 < mask.sum() < N


def test_ties_share_ranks():
    # the auxiliary cannot tell samples apart: average ranks give d = rank(primary) - (N + 1) / 2
    ctrl = Controller(rho=0.2)
    P = torch.tensor([3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0])
    mask = ctrl.uncertainty_mask(P, torch.ones(8, 1))
    d = np_ranks(P.numpy()) - 4.5
    np.testing.assert_array_equal(mask.numpy(), d > np.percentile(d[d >= 0], 80))


def swap_step(ctrl, N, s):
    """auxiliary = primary with samples 0 and s swapped: mean non-negative d = s / (N - 1)."""
    aux = torch.arange(N, dtype=torch.float32)
    aux[[0, s]] = aux[[s, 0]]
    ctrl.uncertainty_mask(torch.arange(N, dtype=torch.float32), aux[:, None])


def test_rho_direction_and_bounds():
    up, down, N = Controller(), Controller(), 64
    for k, s in enumerate(range(1, 31)):  # growing discrepancy: x1.1 each step after the first, capped at 0.2
        swap_step(up, N, s)
        assert up.rho == pytest.approx(min(0.1 * 1.1 ** k, 0.2))
    for k, s in enumerate(range(60, 30, -1)):  # shrinking: x0.9, floored at 0.02
        swap_step(down, N, s)
        assert down.rho == pytest.approx(max(0.1 * 0.9 ** k, 0.02))

    g = torch.Generator().manual_seed(5)
    ctrl, past, rho = Controller(), [], 0.1  # random steps against an exact (Fraction) re-implementation
    for _ in range(200):
        P, X = torch.randn(24, generator=g), torch.randn(24, 3, generator=g) * torch.rand(1, generator=g)
        ctrl.uncertainty_mask(P, X)
        rp, rx = np_ranks(P.numpy()), [np_ranks(X[:, k].numpy()) for k in range(3)]
        d = [Fraction(int(3 * rp[i] - sum(r[i] for r in rx)), 3) for i in range(24)]
        m = sum(x for x in d if x >= 0) / sum(1 for x in d if x >= 0)
        if past:
            rho = rho * 1.1 if m > max(past[-20:]) else rho * 0.9 if m < min(past[-20:]) else rho
            rho = min(max(rho, 0.02), 0.2)
        past.append(m)
        assert 0.02 <= ctrl.rho <= 0.2 and ctrl.rho == pytest.approx(rho)


# ---- the dynamic reference and EMA ----

def test_reference_reset_triggers():
    ctrl = Controller(tau_kl=0.15, k_max=15)
    kl = [0.01] * 14 + [0.01] + [0.15, 0.2] + [0.1] * 14 + [0.16, 0.0]
    want = [False] * 14 + [True] + [False, True] + [False] * 14 + [True, False]
    # step 15: K_max since start; 0.15 does not exceed tau; 0.2 does; the clock restarts after each reset
    assert [ctrl.should_reset_reference(v) for v in kl] == want
    with pytest.raises(ValueError, match="nan"):
        ctrl.should_reset_reference(float("nan"))


def test_state_dict_resume():
    g = torch.Generator().manual_seed(6)
    steps = [(torch.randn(16, generator=g), torch.randn(16, 2, generator=g), float(torch.rand(1, generator=g)) * 0.2)
             for _ in range(30)]
    a = Controller()
    for P, X, kl in steps[:12]:
        a.uncertainty_mask(P, X)
        a.should_reset_reference(kl)
    b = Controller()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # plain numbers: saveable anywhere
    for P, X, kl in steps[12:]:
        assert torch.equal(a.uncertainty_mask(P, X), b.uncertainty_mask(P, X))
        assert a.should_reset_reference(kl) == b.should_reset_reference(kl)
        assert a.state_dict() == b.state_dict()


def test_ema_and_copy():
    torch.manual_seed(7)
    old = [torch.randn(3, 4), torch.randn(5)]
    new = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    expected = [0.9 * o + 0.1 * p.detach() for o, p in zip(old, new)]
    ema_(old, new, gamma=0.9)
    for o, e in zip(old, expected):
        torch.testing.assert_close(o, e)
    copy_(old, new)
    assert all(torch.equal(o, p) for o, p in zip(old, new))
    with pytest.raises(ValueError, match="shape"):
        ema_(old, [torch.randn(3, 4), torch.randn(1)])
    with pytest.raises(ValueError, match="length"):
        copy_(old, new[:1])


# ------------------------------------------------------------------ rewards
# ---- the composite ----

# blueness is also the reward of tests/test_trainer.py's end-to-end run, which names it test_astrolabe:blueness
def blueness(frames, prompts):
    """A simple reward for the sign check: the mean blue channel (mid-range on the tiny VAE's output)."""
    return frames[:, :, 2].mean((1, 2, 3))


def mean_brightness(frames, prompts):
    return frames.mean((1, 2, 3, 4)).tolist()


def raising(frames, prompts):
    raise RuntimeError("boom")


def returns_nan(frames, prompts):
    return torch.full((len(prompts),), float("nan"))


def test_custom_reward_plugs_in_and_failures_stop_the_step():
    frames = video(3, 9, 64, 64, seed=37)
    reward_fn = build_reward("test_astrolabe:mean_brightness:0.5,smoothness:2")
    assert reward_fn.names == ["test_astrolabe:mean_brightness", "smoothness"] and reward_fn.weights == [0.5, 2.0]
    out = reward_fn(frames, ["a"] * 3)
    torch.testing.assert_close(out["composite"], 0.5 * frames.mean((1, 2, 3, 4)) + 2 * smoothness(frames, None))
    with pytest.raises(RuntimeError, match="'test_astrolabe:raising' failed: RuntimeError: boom"):
        build_reward("colorfulness:1,test_astrolabe:raising:1")(frames, ["a"] * 3)
    with pytest.raises(ValueError, match="'test_astrolabe:returns_nan' is nan \\(not finite\\) for sample"):
        build_reward("test_astrolabe:returns_nan:1")(frames, ["a"] * 3)


def test_each_reward_model_is_resident_once_while_its_rewards_score(monkeypatch):
    """CompositeReward brings each model to the GPU once (offload.resident) and runs exactly its rewards
    inside; results equal the rewards called one by one. The recording stand-in marks which model is on."""
    frames, prompts = video(3, 9, 64, 64, seed=41), ["a red fox", "a blue car", "snow"]
    a, b, on, log = nn.Linear(1, 1), nn.Linear(1, 1), [], []

    @__import__("contextlib").contextmanager
    def recording(model):
        log.append(("in", model))
        on.append(model)
        yield model
        on.pop()
        log.append(("out", model))

    def needs(model, fn):
        def run(f, p):
            assert on == [model], (model, on)  # its own model, and only it (None: the offline group)
            return fn(f, p)
        return run
    monkeypatch.setattr(rewards, "resident", recording)
    fns = [rewards.colorfulness, rewards.smoothness, rewards.prompt_color, blueness]
    owners = [a, None, b, a]
    out = rewards.CompositeReward(["c", "s", "p", "blue"], [1.0, 2.0, 3.0, 4.0],
                                  [needs(m, f) for m, f in zip(owners, fns)], owners)(frames, prompts)
    assert log == [("in", a), ("out", a), ("in", None), ("out", None), ("in", b), ("out", b)]
    ref = [f(frames, prompts).float() for f in fns]
    assert list(out) == ["c", "s", "p", "blue", "composite"]
    for k, r in zip(["c", "s", "p", "blue"], ref):
        torch.testing.assert_close(out[k], r, rtol=0, atol=0)
    torch.testing.assert_close(out["composite"], ref[0] + 2 * ref[1] + 3 * ref[2] + 4 * ref[3])


# ---- HPSv3: top 30% of frames ----

@pytest.mark.parametrize("f", [1, 2, 3, 4, 7, 10, 13, 20, 21])
def test_top30_mean_exact(f):
    scores = torch.randn(3, f, generator=torch.Generator().manual_seed(f))
    for row, got in zip(scores.tolist(), top30_mean(scores)):
        best = sorted(row, reverse=True)[:max(1, int(len(row) * 0.3))]  # astrolabe/rewards.py
        assert got.item() == pytest.approx(sum(best) / len(best), abs=1e-6)
    assert top30_mean(torch.tensor([[5., 1., 9.]])).item() == 9.0  # < 4 frames: the best frame
    torch.testing.assert_close(top30_mean(torch.arange(10.)[None].flip(1)), torch.tensor([8.]))


def test_hpsv3_score_is_top30_of_per_frame_mu(hps, monkeypatch):
    monkeypatch.setattr(reward_models, "HPSV3_TEXT", "rate {text_prompt}: <|Reward|>")  # short text: a fast test
    frames = video(2, 7, seed=11)
    got = hps.score(frames, ["a red car", "a dog"], chunk=3)  # chunks straddle the two clips
    with torch.no_grad():
        mu = torch.tensor([[hps(frames[b, i][None, None].expand(1, 2, -1, -1, -1),
                                [f"rate {p}: <|Reward|>"], video=False)[0, 0, 0].item()
                            for i in range(7)] for b, p in enumerate(["a red car", "a dog"])])
    want = torch.tensor([sum(sorted(r, reverse=True)[:2]) / 2 for r in mu.tolist()])  # k = int(7 * 0.3) = 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (mu.std(1) > 1e-3).all()


def test_templates_are_verbatim():
    # trailing spaces are part of the trained prompts (MizzenAI/HPSv3, KwaiVGI/VideoAlign)
    assert HPSV3_TEXT.startswith("\nYou are tasked with evaluating a generated image based on Visual Quality and Text")
    assert "the best. \n\n**Visual Quality:**  \nEvaluate" in HPSV3_TEXT and "possible. \n\n**Text Alignment:**  \n" in HPSV3_TEXT
    assert HPSV3_TEXT.endswith("Textual prompt - {text_prompt}\n\n\n\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n")
    assert "possible. \n\nPlease provide the ratings of Visual Quality: <|VQ_reward|>\nEND\n\n**Motion Quality:**  \n" in VIDEOALIGN_TEXT
    assert "acceptable.  \n- **Style" in VIDEOALIGN_TEXT and VIDEOALIGN_TEXT.startswith("\nYou are tasked")
    assert VIDEOALIGN_TEXT.endswith("Textual prompt - {text_prompt}\nPlease provide the ratings of Text Alignment: <|TA_reward|>\nEND\n")


# ---- VideoAlign: 2 fps, grayscale MQ ----

def test_sampler_2fps_indices_for_16fps_input():
    assert sample_indices(81) == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]  # 81 / 16 * 2 = 10.1 -> 10
    assert sample_indices(45) == [0, 9, 18, 26, 35, 44]  # 5.6 -> 6
    assert sample_indices(21) == [0, 7, 13, 20]  # 2.6 -> at least 4
    assert sample_indices(9) == [0, 3, 5, 8]
    assert sample_indices(3) == [0, 2]  # even count <= total
    with pytest.raises(ValueError, match="at least 2 frames"):
        sample_indices(1)


def test_grayscale_motion_path_and_rgb_alignment_path(va):
    frames, seen = video(2, 9, seed=13), []
    va.forward = lambda clips, texts, video: seen.append(clips) or VideoAlign.forward(va, clips, texts, video)
    try:
        mq = va.score(frames, ["a", "b"], "MQ", gray=True)
        ta = va.score(frames, ["a", "b"], "TA", gray=False)
    finally:
        del va.forward
    picked = frames[:, [0, 3, 5, 8]]
    gray = 0.299 * picked[:, :, 0] + 0.587 * picked[:, :, 1] + 0.114 * picked[:, :, 2]
    for c in range(3):
        torch.testing.assert_close(seen[0][:, :, c], gray)
    torch.testing.assert_close(seen[1], picked)
    # z-scored head outputs: MQ from the 2nd reward token, TA from the 3rd, with model_config's constants
    with torch.no_grad():
        raw_gray = va(seen[0], [VIDEOALIGN_TEXT.format(text_prompt=p) for p in "ab"], video=True)[..., 0]
        raw_rgb = va(picked, [VIDEOALIGN_TEXT.format(text_prompt=p) for p in "ab"], video=True)[..., 0]
    torch.testing.assert_close(mq, (raw_gray[:, 1] + 0.2) / 0.5)
    torch.testing.assert_close(ta, (raw_rgb[:, 2] - 1.0) / 4.0)
    assert (mq - ta).abs().min() > 1e-4 and mq.std() > 1e-4


# ---- the Qwen2-VL forward ----

def reference(model, tok, clips, texts, video_input, mrope=False):
    """transformers' stock Qwen2VLModel forward on independently built inputs: the chat template rendered
    by jinja, patches from transformers' PIL image processor (images) or an explicit patch loop (videos)."""
    n, t = clips.shape[:2]
    h, w = reward_models.smart_resize(clips.shape[-2], clips.shape[-1], *PIXELS)
    q8 = lambda x: x.clamp(0, 1).mul(255).round().div(255)
    frames = q8(F.interpolate(q8(clips).flatten(0, 1), size=(h, w), mode="bicubic", antialias=True)).view(n, t, 3, h, w)
    if not video_input:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        out = Qwen2VLImageProcessorPil(do_resize=False)(images=[f[0].permute(1, 2, 0).numpy() for f in frames],
                                                        do_rescale=False, return_tensors="pt")
        pixels, grid = out["pixel_values"], out["image_grid_thw"]
    else:
        mean, std = torch.tensor(reward_models.CLIP_MEAN)[:, None, None], torch.tensor(reward_models.CLIP_STD)[:, None, None]
        norm, rows = (frames - mean) / std, []
        for i in range(n):
            for ti in range(t // 2):
                for bh in range(h // 28):
                    for bw in range(w // 28):
                        for mi in range(2):
                            for mj in range(2):
                                y, x = (2 * bh + mi) * 14, (2 * bw + mj) * 14
                                rows.append(norm[i, 2 * ti:2 * ti + 2, :, y:y + 14, x:x + 14].permute(1, 0, 2, 3).flatten())
        pixels, grid = torch.stack(rows), torch.tensor([[t // 2, h // 14, w // 14]] * n)
    kind, pad = ("video", "<|video_pad|>") if video_input else ("image", "<|image_pad|>")
    chats = [tok.apply_chat_template([{"role": "user", "content": [{"type": kind}, {"type": "text", "text": txt}]}],
                                     tokenize=False, add_generation_prompt=True) for txt in texts]
    chats = [c.replace(pad, pad * (int(grid[0].prod()) // 4)) for c in chats]
    enc = tok(chats, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    kw = dict(pixel_values_videos=pixels, video_grid_thw=grid) if video_input else dict(pixel_values=pixels, image_grid_thw=grid)
    if mrope:  # the stock path: 3-D M-RoPE positions from the token types
        kw["mm_token_type_ids"] = (ids == tok.convert_tokens_to_ids(pad)).int() * (2 if video_input else 1)
    else:
        kw["position_ids"] = torch.arange(ids.shape[1]).expand_as(ids)
    model.model.rope_deltas = None
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
    return ids, hidden


@pytest.mark.parametrize("video_input", [False, True])
def test_forward_matches_sequential_reference_and_differs_from_mrope(hps, va, tok, video_input):
    model = va if video_input else hps
    clips = video(2, 4 if video_input else 2, seed=3)
    if not video_input:
        clips = clips[:, :1].expand(-1, 2, -1, -1, -1)  # a lone image, tiled to the temporal patch
    texts = ["x " + " y ".join(model.TOKENS), "a longer prompt " + " then ".join(model.TOKENS) + " end"]
    with torch.no_grad():
        got = model(clips, texts, video=video_input)
    for mrope in (False, True):
        ids, hidden = reference(model, tok, clips, texts, video_input, mrope)
        picked = torch.stack([hidden[ids == tok.convert_tokens_to_ids(t)] for t in model.TOKENS], 1)
        want = model.rm_head(picked).float()
        if mrope:
            assert (got - want).abs().max() > 1e-3, "the stock M-RoPE forward should score differently"
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.std() > 1e-3  # a real, input-dependent score


def test_patches_match_transformers_image_processor():
    clips = video(3, 1, 70, 50, seed=5).expand(-1, 2, -1, -1, -1)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    h, w = reward_models.smart_resize(70, 50, *PIXELS)
    q8 = lambda x: x.clamp(0, 1).mul(255).round().div(255)
    frames = q8(F.interpolate(q8(clips[:, 0]), size=(h, w), mode="bicubic", antialias=True))
    out = Qwen2VLImageProcessorPil(do_resize=False)(images=[f.permute(1, 2, 0).numpy() for f in frames],
                                                    do_rescale=False, return_tensors="pt")
    pixels, grid = to_patches(clips, *PIXELS)
    torch.testing.assert_close(grid, out["image_grid_thw"])
    torch.testing.assert_close(pixels, out["pixel_values"].float(), rtol=1e-5, atol=1e-5)


def test_score_is_read_at_the_reward_token(hps, tok):
    clips = video(2, 1, seed=7).expand(-1, 2, -1, -1, -1)
    texts = ["abc <|Reward|> defghijk", "abc defghijk <|Reward|>"]  # same words, token moved
    with torch.no_grad():
        got = hps(clips[:1].expand(2, -1, -1, -1, -1), texts, video=False)[:, 0]
    ids, hidden = reference(hps, tok, clips[:1].expand(2, -1, -1, -1, -1), texts, False)
    pos = (ids == tok.convert_tokens_to_ids("<|Reward|>")).nonzero()[:, 1]
    for i in range(2):
        torch.testing.assert_close(got[i], hps.rm_head(hidden[i, pos[i]]), rtol=1e-4, atol=1e-4)
        assert (got[i] - hps.rm_head(hidden[i, pos[1 - i]])).abs().max() > 1e-3
    assert (got[0] - got[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="exactly once"):
        hps(clips[:1], ["<|Reward|> twice <|Reward|>"], video=False)
    with pytest.raises(ValueError, match="exactly once"):
        hps(clips[:1], ["no token"], video=False)
