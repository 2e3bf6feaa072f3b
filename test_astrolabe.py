"""Tests for astrolabe. CPU, tiny seeded models, fresh random inputs; each compares against an
independent reference (diffusers' own forward with a dense mask built here, separate full copies,
hand-written key tables, autograd)."""
import copy
import csv
import json
import math
import os
import re
import shutil
import socket
import tempfile
from fractions import Fraction

import imageio
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import config
import evaluate
import checkpoints as C
import model as M
import policy as policy_mod
import reward_models
import rewards
import train
import vae as V
from kv_cache import KVCache
from loss import Controller, advantages, copy_, ema_, kl_loss, policy_loss
from reward_models import (HPSV3_TEXT, VIDEOALIGN_TEXT, HPSv3, VideoAlign, load_hpsv3, load_videoalign,
                           sample_indices, to_patches, top30_mean)
from rewards import DEFAULT_OFFLINE_SPEC, build_reward, colorfulness, prompt_color, smoothness
from rollout import clip_velocity, draw_noise, generate, group_rollout, new_cache

torch.set_num_threads(1)  # tiny tensors: threads cost more than they give, and CI has 2 cores
N = 3  # frames per block


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    return M.load_tiny(seed=0)


def text_kv(wan, prompt="a red car drives through the rain"):
    return wan.model.text_kv(wan.text_encoder([prompt]))


# ------------------------------------------------------------------ independent dense reference
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


# ------------------------------------------------------------------ loaders
def original_wan_keys(layers):
    """Every key of the original Wan2.1 layout (the Wan 2.1 repository's wan/modules/model.py), written out by hand."""
    keys = [f"{m}.{p}" for m in ("patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0",
                                  "time_embedding.2", "time_projection.1", "head.head") for p in ("weight", "bias")]
    keys += ["head.modulation"]
    for n in range(layers):
        b = f"blocks.{n}"
        keys += [f"{b}.{a}.{x}.{p}" for a in ("self_attn", "cross_attn") for x in "qkvo" for p in ("weight", "bias")]
        keys += [f"{b}.{a}.norm_{x}.weight" for a in ("self_attn", "cross_attn") for x in "qk"]
        keys += [f"{b}.norm3.weight", f"{b}.norm3.bias", f"{b}.modulation"]
        keys += [f"{b}.ffn.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    return keys


# diffusers name for each original name, hand-written (independent of model._RENAMES)
ORIGINAL_TO_DIFFUSERS = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out", "head.modulation": "scale_shift_table",
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v", "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0",
    "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2", "modulation": "scale_shift_table", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}


def to_original(diffusers_sd, layers):
    params = dict(diffusers_sd)
    out = {}
    for key in original_wan_keys(layers):
        name = key
        for orig, new in sorted(ORIGINAL_TO_DIFFUSERS.items(), key=lambda kv: -len(kv[0])):
            head, _, tail = key.partition(orig)
            if tail in ("", ".weight", ".bias") and (head == "" or head.endswith(".")) and orig in key:
                name = head + new + tail
                break
        out[key] = params.pop(name)
    assert not params, f"diffusers keys with no original name: {sorted(params)}"
    return out


def test_original_layout_loads_and_reproduces(wan, tmp_path):
    torch.manual_seed(5)
    src = wan.model.transformer
    layers = src.config.num_layers
    sd = to_original(src.state_dict(), layers)  # every key name the real checkpoint has, tiny sizes
    wrapped = {"generator_ema": {f"model._fsdp_wrapped_module.{k}": v for k, v in sd.items()}}
    torch.save(wrapped, tmp_path / "self_forcing.pt")
    fresh = M.load_tiny(seed=123).model
    C.load_wan_state_dict(fresh.transformer, C.read_checkpoint(str(tmp_path / "self_forcing.pt")))
    x, kv = torch.randn(2, 16, 3, 8, 8), text_kv(wan)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, 500.0, kv), wan.model(x, 500.0, kv), atol=0, rtol=0)


def test_krea_14b_layout_loads_and_reproduces(wan, tmp_path):
    """Krea realtime 14B ships one .safetensors of original-Wan keys under `model.` (krea-ai/realtime-video loads
    it into a wrapper holding the Wan model as `.model`): the tiny model written that way loads back exactly, and
    the 40-layer hand table names exactly the Wan2.1-T2V-14B transformer's tensors, 1095 of them, at dim 5120."""
    sd = {f"model.{k}": v.contiguous() for k, v in to_original(wan.model.transformer.state_dict(), 2).items()}
    save_file(sd, tmp_path / "krea-realtime-video-14b.safetensors")
    fresh = M.load_tiny(seed=123).model
    C.load_wan_state_dict(fresh.transformer, C.read_checkpoint(str(tmp_path / "krea-realtime-video-14b.safetensors")))
    x, kv = torch.randn(2, 16, 3, 8, 8), text_kv(wan)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, 500.0, kv), wan.model(x, 500.0, kv), atol=0, rtol=0)
    with torch.device("meta"):
        big = M.WanTransformer3DModel(**M.WAN_14B).state_dict()
    keys = original_wan_keys(40)
    assert len(keys) == 1095 and {C.wan_to_diffusers(f"model.{k}") for k in keys} == set(big)
    assert big["blocks.39.attn1.to_k.weight"].shape == (5120, 5120)
    assert big["blocks.0.ffn.net.0.proj.weight"].shape == (13824, 5120)
    cfg = config.parse_config(["--preset=krea"])
    config.check_config(cfg)
    assert cfg.sink_frames == 0 and cfg.max_history_frames + cfg.clip_frames <= cfg.window_frames  # nothing rolls out


def test_loader_errors_name_the_keys(wan, tmp_path):
    sd = to_original(wan.model.transformer.state_dict(), 2)
    fresh = M.load_tiny(seed=1).model.transformer
    missing = {k: v for k, v in sd.items() if k != "blocks.1.ffn.2.bias"}
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.net\.2\.bias"):
        C.load_wan_state_dict(fresh, missing)
    with pytest.raises(ValueError, match=r"blocks\.7\.norm2\.weight"):
        C.load_wan_state_dict(fresh, {**sd, "blocks.7.norm3.weight": torch.ones(32)})
    with pytest.raises(ValueError, match="unknown checkpoint layout.*encoder.layer"):
        C.load_wan_state_dict(fresh, {"encoder.layer.0.weight": torch.ones(1)})
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        C.read_checkpoint(str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="has no entry 'generator_ema'; top-level keys: \\['generator'\\]"):
        torch.save({"generator": sd}, tmp_path / "g.pt")
        C.read_checkpoint(str(tmp_path / "g.pt"), "generator_ema")
    with pytest.raises(ValueError, match=r"another model size\?\): \['proj_out.weight \(3, 3\) != \(64, 32\)'\]"):
        C.load_wan_state_dict(fresh, {**sd, "head.head.weight": torch.ones(3, 3)})
    with pytest.raises(ValueError, match=r"non-finite \(NaN or inf\) values in 1 tensor\(s\), e.g. \['proj_out.bias'\]"):
        C.load_wan_state_dict(fresh, {**sd, "head.head.bias": torch.full((64,), float("nan"))}, "g.pt")


def test_longlive_lora_merges_into_base(wan):
    torch.manual_seed(6)
    tr = copy.deepcopy(wan.model.transformer)
    A, B = torch.randn(4, 32), torch.randn(32, 4)
    w = tr.blocks[1].attn2.to_v.weight.clone()
    C.merge_lora(tr, {"base_model.model.blocks.1.cross_attn.v.lora_A.weight": A,
                      "base_model.model.blocks.1.cross_attn.v.lora_B.weight": B}, alpha=8)
    torch.testing.assert_close(tr.blocks[1].attn2.to_v.weight, w + 2.0 * B @ A)
    with pytest.raises(ValueError, match="lora_B"):
        C.merge_lora(tr, {"base_model.model.blocks.1.cross_attn.v.lora_A.weight": A})


# ------------------------------------------------------------------ bad input
def test_bad_input_is_rejected_before_compute(wan):
    m, kv = wan.model, text_kv(wan)
    with pytest.raises(ValueError, match="latents must be"):
        m(torch.randn(16, 3, 8, 8), 0.0, kv)
    with pytest.raises(ValueError, match="RoPE"):
        m(torch.randn(1, 16, 3, 8, 8), 0.0, kv, start_frame=1022)
    with pytest.raises(ValueError, match="smaller than one block"):
        KVCache(2, 1, 12, 16, 2, 16, sink_frames=0, window_frames=2, frames_per_block=3)
    with pytest.raises(ValueError, match="sink_frames=10"):
        KVCache(2, 1, 12, 16, 2, 16, sink_frames=10, window_frames=9, frames_per_block=3)
    with pytest.raises(ValueError, match="not a whole number"):
        generate(m, kv, draw_noise(0, 1, (16, 4, 8, 8)), new_cache(m, 1, (16, 4, 8, 8), 3, 9, N))
    cache = new_cache(m, 1, (16, 6, 8, 8), 3, 9, N)
    cache.begin_block(0, 3)
    with pytest.raises(ValueError, match="must start at frame 3"):
        cache.begin_block(6, 3)
    with pytest.raises(ValueError, match="non-empty strings"):
        wan.text_encoder([""])


# ------------------------------------------------------------------ rollout (issue 3)
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


def test_prompt_switch_recaches_the_window(wan):
    m = wan.model
    kv_a, kv_b = text_kv(wan, "a quiet snowy forest"), text_kv(wan, "a busy neon city street")
    noise = draw_noise(50, 1, (16, 9, 8, 8))
    cache = new_cache(m, 1, (16, 9, 8, 8), 0, 6, N)
    first = generate(m, kv_a, noise[:, :, :, :6], cache)
    before = [k[:, :6 * 16].clone() for k in cache.k]
    rest = generate(m, kv_a, noise[:, :, :, 6:], cache, start_frame=6, switches=[(6, kv_b)], latents=first)
    # reference: LongLive's re-cache, frames 0-5 in one call with prompt B, each seeing all six
    ref = new_cache(m, 1, (16, 6, 8, 8), 0, 6, N)
    with torch.no_grad():
        ref.begin_block(0, 6)
        m(first, 0.0, kv_b, ref, 0, store=True)
    # window 6 before frame 6 holds frames 0-5; block 6-8 evicted 0-2, so 3-5 sit in slots 0-2
    assert cache.frames == [3, 4, 5, 6, 7, 8]
    for layer, (k, r, b) in enumerate(zip(cache.k, ref.k, before)):
        torch.testing.assert_close(k[:, :3 * 16], r[:, 3 * 16:6 * 16], atol=1e-5, rtol=0)
        # layer-0 keys precede any cross-attention; deeper layers carry the new prompt
        assert torch.allclose(k[:, :3 * 16], b[:, 3 * 16:6 * 16], atol=1e-3) == (layer == 0)
    no_switch = generate(m, kv_a, noise, new_cache(m, 1, (16, 9, 8, 8), 0, 6, N))
    torch.testing.assert_close(no_switch[:, :, :6], first, atol=1e-5, rtol=0)  # before the switch: unchanged
    assert not torch.allclose(no_switch[:, :, 6:], rest, atol=1e-3)  # after: the new prompt shows


def test_sample_writes_a_decodable_mp4(tmp_path):
    import imageio
    import sample
    out = tmp_path / "fox.mp4"
    sample.main(["--prompt", "a fox|a fox runs", "--switch", "3", "--frames", "6", "--out", str(out), "--device", "cpu"])
    frames = imageio.mimread(str(out))
    assert len(frames) == 1 + 4 * (6 - 1) and frames[0].shape == (64, 64, 3)


@pytest.mark.parametrize("args,msg", [
    (["--prompt", " "], "empty prompt"),
    (["--prompt", "a", "--frames", "7"], "whole number"),
    (["--prompt", "a|b", "--switch", "21", "--frames", "9"], "increasing latent frames"),
    (["--prompt", "a|b|c", "--switch", "6,3", "--frames", "9"], "increasing latent frames"),
    (["--prompt", "a|b", "--switch", "7", "--frames", "9"], "frame 7 would take effect at frame 9"),
    (["--prompt", "a", "--base_lora_alpha", "0"], "--base_lora_alpha 0.0 must be positive"),
    (["--prompt", "a|b"], "need 1 --switch"),
    (["--prompt", "a", "--out", "/nonexistent/dir/x.mp4"], "cannot write"),
    (["--prompt", "a", "--frames", "6", "--frames_per_block", "0"], "--frames_per_block 0 must be at least 1"),
    (["--prompt", "a", "--sink", "-1"], "--sink -1 / --window 21"),
    (["--prompt", "a", "--sink", "9", "--window", "6"], "--sink 9 / --window 6"),
    (["--prompt", "a", "--window", "2"], "--window 2"),
    (["--prompt", "a|b", "--frames", "6", "--switch", "abc"], "--switch 'abc' is not a comma-separated"),
    (["--prompt", "a", "--out", "v.txt"], "--out 'v.txt' must end in .mp4"),
    (["--prompt", "a", "--out", "video"], "--out 'video' must end in .mp4"),
    (["--prompt", "a", "--device", "tpu"], "--device 'tpu' is not a torch device"),
    (["--prompt", "a", "--lora", "/nonexistent/ckpt"], "--lora /nonexistent/ckpt does not exist"),
    (["--prompt", "a", "--model", "/nonexistent/wan"], "--model /nonexistent/wan does not exist"),
    (["--prompt", "a", "--checkpoint", os.path.abspath(__file__)], "need --model"),
    (["--prompt", "a", "--frames", "1026"], "--frames 1026 is past the generator's 1024-frame RoPE table"),
])
def test_sample_rejects_bad_input_before_generating(tmp_path, monkeypatch, args, msg):
    import sample
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("generated before rejecting the input"))
    args = args if "--out" in args else args + ["--out", str(tmp_path / "v.mp4")]
    with pytest.raises(SystemExit, match=re.escape(msg)):
        sample.main(args + ["--device", "cpu"] * ("--device" not in args))
    assert list(tmp_path.iterdir()) == []  # nothing written


# ------------------------------------------------------------------ streaming VAE decoding (vae.py)
def diffusers_decode(vae, z):
    """The independent reference: diffusers' own one-shot decode (cache cleared, latent frame by frame)."""
    cfg = vae.config
    z = z * torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1) + torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    return ((vae.decode(z).sample.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize("cuts,chunk", [((), 1), ((), 5), ((1, 2, 3, 7), 2), ((4, 5, 11), 3)])
def test_streaming_decode_equals_one_shot(wan, cuts, chunk):
    torch.manual_seed(11)
    z = torch.randn(2, 16, 13, 4, 4)
    ref = diffusers_decode(wan.vae, z)
    dec, edges = V.Decoder(wan.vae, chunk), (0, *cuts, 13)
    parts = [dec(z[:, :, a:b]) for a, b in zip(edges, edges[1:])]
    assert [p.shape[1] for p in parts] == [4 * (b - a) - (a == 0) * 3 for a, b in zip(edges, edges[1:])]
    torch.testing.assert_close(torch.cat(parts, 1), ref, atol=1e-5, rtol=0)


def test_fast_decoder_layout_and_padding_give_the_same_pixels(wan):
    """vae.speed_up without compile (the CPU can run it): channels-last weights, spatial padding moved into the
    convolutions, chunks made contiguous. The same pixels as diffusers' decode of the untouched VAE."""
    torch.manual_seed(15)
    z = torch.randn(1, 16, 10, 4, 4)
    ref = diffusers_decode(wan.vae, z)
    fast = V.speed_up(copy.deepcopy(wan.vae), compile=False)
    torch.backends.cudnn.benchmark = False
    moved = [m for m in fast.decoder.modules() if isinstance(m, V.WanCausalConv3d) and m.padding[1:] == (1, 1)]
    assert len(moved) > 10 and all(m._padding[:4] == (0, 0, 0, 0) for m in moved)
    V.speed_up(fast, compile=False)  # twice is harmless: the padding is not moved again
    assert all(m.padding[1:] == (1, 1) for m in moved)
    torch.testing.assert_close(V.Decoder(fast)(z), ref, atol=1e-5, rtol=0)


def test_clip_pixels_are_the_window_of_the_whole_video(wan):
    """A clip at s > 0 decodes to the 4 F frames [1 + 4 (s - 1), 1 + 4 (s + F - 1)) of the whole video, from a
    warm-up bounded by the decoder's receptive field; a short warm-up is measurably off; s = 0 keeps 1 + 4 (F - 1)."""
    torch.manual_seed(12)
    s, F = V.RECEPTIVE_FIELD + 4, 3
    z = torch.randn(1, 16, s + F, 4, 4)
    whole = diffusers_decode(wan.vae, z)
    window = whole[:, 1 + 4 * (s - 1):1 + 4 * (s + F - 1)]
    clip = V.history_decoder(wan.vae, z[:, :, :s]).fork(1)(z[:, :, s:])
    assert clip.shape[1] == 4 * F
    torch.testing.assert_close(clip, window, atol=1e-5, rtol=0)
    short = V.history_decoder(wan.vae, z[:, :, :s], warmup=3).fork(1)(z[:, :, s:])
    assert (short - window).abs().max() > 1e-2  # the state really reaches back: the test above can fail
    first = V.history_decoder(wan.vae, z[:, :, :0]).fork(1)(z[:, :, :F])
    assert first.shape[1] == 1 + 4 * (F - 1)
    torch.testing.assert_close(first, whole[:, :1 + 4 * (F - 1)], atol=1e-5, rtol=0)


def test_group_shares_one_decoder_state(wan):
    torch.manual_seed(13)
    G, s, F = 3, 6, 3
    history, clips = torch.randn(1, 16, s, 4, 4), torch.randn(G, 16, F, 4, 4)
    shared = V.history_decoder(wan.vae, history).fork(G)(clips)
    for i in range(G):
        whole = diffusers_decode(wan.vae, torch.cat([history, clips[i:i + 1]], 2))
        torch.testing.assert_close(shared[i], whole[0, 1 + 4 * (s - 1):], atol=1e-5, rtol=0)


def test_progressive_decode_during_generation_equals_decoding_after(wan):
    m, shape = wan.model, (16, 9, 8, 8)
    noise = draw_noise(14, 1, shape)
    dec, frames = V.Decoder(wan.vae), []
    latents = generate(m, text_kv(wan), noise, new_cache(m, 1, shape, 3, 9, N), 0, N,
                       on_block=lambda x0: frames.append(dec(x0)), cache_last_block=False)
    full = generate(m, text_kv(wan), noise, new_cache(m, 1, shape, 3, 9, N), 0, N)
    assert torch.equal(latents, full)  # the skipped last context pass changes nothing generated
    torch.testing.assert_close(torch.cat(frames, 1), diffusers_decode(wan.vae, full), atol=1e-5, rtol=0)


def test_timestep_sinusoid_is_float64_wan_formula(wan):
    t = torch.rand(5, dtype=torch.float64) * 1000
    t[0] = 1000.0
    dim = wan.model.transformer.config.freq_dim
    ref = torch.tensor([[math.cos(float(x) * 10000 ** (-i / (dim // 2))) for i in range(dim // 2)] +
                        [math.sin(float(x) * 10000 ** (-i / (dim // 2))) for i in range(dim // 2)] for x in t])
    torch.testing.assert_close(M.sinusoid(t, dim), ref.float(), atol=1e-6, rtol=0)  # float32 angles: 4e-5 off
    diffusers_fp32 = wan.model.transformer.condition_embedder.timesteps_proj(t.float())  # same layout, fp32 angles
    torch.testing.assert_close(M.sinusoid(t, dim), diffusers_fp32, atol=1e-4, rtol=0)


def test_forward_rejects_a_start_frame_the_cache_disagrees_with(wan):
    m, kv = wan.model, text_kv(wan)
    cache = new_cache(m, 1, (16, 6, 8, 8), 3, 9, N)
    cache.begin_block(0, N)
    x = torch.randn(1, 16, N, 8, 8)
    with pytest.raises(ValueError, match="start_frame=3 but the cache is positioned at frame 0"):
        m(x, 500.0, kv, cache, start_frame=3, store=True)
    with pytest.raises(ValueError, match="timestep must be a float or hold 1 or B=2"):
        m(torch.randn(2, 16, N, 8, 8), torch.full((2, N), 500.0), kv)


# ------------------------------------------------------------------ trainer (issue 6)

FAST = ["--prompts_per_rank=1", "--group_size=2", "--micro_batch=2", "--clip_frames=3", "--max_history_frames=3",
        "--eval_every=0", "--save_every=100"]


def test_train_forward_matches_rollout_velocity(wan):
    """At theta = theta_old, the training forward on the x_t the sampler saw at step k returns the
    sampler's own velocity, for every block of the clip (same attention layout)."""
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
    g = group_rollout(old, kv, draw_noise(60, 1, (16, 3, 8, 8)), draw_noise(61, 2, (16, 6, 8, 8)), 3, 9)
    del old.forward
    assert [s for s, _, _ in seen] == [3, 6]
    x_t = torch.cat([x for _, x, _ in seen], dim=2)
    cache = g.clip_cache(old, kv, 0, 2)  # the clean clip K/V, recomputed as the trainer does
    policy.net("default")
    v = policy_mod.ClipForward(policy.model, N)(w.text_encoder(["a red car"]), x_t, torch.full((2,), M.SIGMAS[k]), cache, 3)
    torch.testing.assert_close(v, torch.cat([v for _, _, v in seen], dim=2), atol=1e-5, rtol=0)


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


def test_gradient_checkpointing_gives_the_same_gradients(wan):
    """The backward recompute of block b must see block b's cache view, not the last block's."""
    w = copy.deepcopy(wan)
    policy = policy_mod.Policy(config.parse_config([]), w, 1)
    with torch.no_grad():
        for p in policy.params("default"):
            p.normal_(0, 0.05)
    old = policy.net("old")
    kv = old.text_kv(w.text_encoder(["a cat"]))
    g = group_rollout(old, kv, draw_noise(1, 1, (16, 6, 8, 8)), draw_noise(2, 2, (16, 9, 8, 8)), 3, 9)
    cache = g.clip_cache(old, kv, 0, 2)
    x_t, grads = torch.randn(2, 16, 9, 8, 8), []
    for ckpt in (False, True):
        policy.net("default")
        w.model.gradient_checkpointing = ckpt
        v = policy_mod.ClipForward(w.model, N)(w.text_encoder(["a cat"]), x_t, torch.tensor([0.9, 0.6]), cache, 6)
        grads.append(torch.autograd.grad(v.square().mean(), policy.params("default")))
    w.model.gradient_checkpointing = False
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def read_ckpt(out):
    from safetensors.torch import load_file
    d = os.path.join(out, open(os.path.join(out, "latest")).read().strip())
    tensors = {f: load_file(os.path.join(d, f)) for f in ("adapter_model.safetensors", "old.safetensors", "ref.safetensors")}
    return tensors, torch.load(os.path.join(d, "state.pt"), weights_only=True)


def assert_same_tree(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    elif isinstance(a, (list, tuple)):  # torch.distributed.checkpoint turns tuples (AdamW betas) into lists
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    else:
        assert a == b


def test_resume_equals_an_unbroken_run(tmp_path):
    args = FAST + ["--gamma=0.9"]  # an EMA theta_old, so its state must survive the resume too
    train.main(args + ["--steps=4", f"--out_dir={tmp_path / 'a'}"])
    train.main(args + ["--steps=2", f"--out_dir={tmp_path / 'b'}"])
    train.main(args + ["--steps=4", f"--out_dir={tmp_path / 'b'}", "--resume=true"])
    (wa, sa), (wb, sb) = read_ckpt(tmp_path / "a"), read_ckpt(tmp_path / "b")
    assert_same_tree(wa, wb)
    assert_same_tree(sa["optimizer"], sb["optimizer"])
    assert sa["step"] == sb["step"] == 4 and sa["controller"] == sb["controller"]
    theta, old = wa["adapter_model.safetensors"], wa["old.safetensors"]
    lora_b = [k for k in theta if "lora_B" in k]  # zero at init: only training (theta) and the EMA (old) move them
    assert all(theta[k].abs().sum() > 0 and old[k].abs().sum() > 0 for k in lora_b)
    assert not all(torch.equal(theta[k], old[k]) for k in lora_b)  # with gamma 0.9 theta_old lags theta


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(FAST + ["--steps=1", f"--out_dir={out}"])
    before, _ = read_ckpt(out)
    import safetensors.torch
    real, calls = safetensors.torch.save_file, []

    def dying_save(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while saving")
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.main(FAST + ["--steps=2", f"--out_dir={out}", "--resume=true"])
    monkeypatch.undo()
    after, state = read_ckpt(out)
    assert state["step"] == 1
    assert_same_tree(before, after)
    train.main(FAST + ["--steps=2", f"--out_dir={out}", "--resume=true"])  # and it resumes from there
    assert read_ckpt(out)[1]["step"] == 2


def torchrun(args, port):
    """train.py on 2 gloo processes; returns stdout after checking both ranks printed the same checksum."""
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "train.py", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    # the two ranks share stdout, so their lines may interleave: match the printed format, not lines
    sums = sorted(re.findall(r"rank (\d) trainable checksum ([-+]?\d\.\d{12}e[-+]\d+)", res.stdout))
    assert [r for r, _ in sums] == ["0", "1"] and sums[0][1] == sums[1][1], res.stdout
    return res.stdout


def test_two_process_torchrun_ends_with_identical_weights(tmp_path):  # LoRA under DDP
    torchrun([*FAST, "--steps=2", "--eval_every=2", f"--out_dir={tmp_path}"], 29517)


def test_per_block_fsdp2_on_two_processes_equals_one_process_and_resumes(tmp_path):
    """Full fine-tuning, one FSDP2 unit per block: 2 processes x 1 prompt (stopped after step 1, resumed to step 2)
    end with the weights, theta_old and theta_ref of 1 unsharded process x 2 prompts run straight to step 2."""
    from safetensors.torch import load_file
    args = [*FAST, "--lora_rank=0", "--gamma=0.9", "--lr=1e-3", "--steps=2"]  # gamma 0.9: theta_old's EMA must resume
    train.main([*args, "--prompts_per_rank=2", f"--out_dir={tmp_path / 'one'}"])
    torchrun([*args, "--steps=1", "--eval_every=1", f"--out_dir={tmp_path / 'two'}"], 29527)
    out = torchrun([*args, "--eval_every=2", "--resume=true", f"--out_dir={tmp_path / 'two'}"], 29528)
    assert "2 rank(s) x 1 prompt(s)" in out
    start = M.load_tiny().model.transformer.state_dict()
    for f in ("transformer.safetensors", "old.safetensors", "ref.safetensors"):
        one, two = (load_file(tmp_path / d / "ckpt-000002" / f) for d in ("one", "two"))
        assert one.keys() == two.keys() == start.keys()
        for k in one:
            torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-5, msg=f"{f} {k}")
        moved = [not torch.equal(one[k], start[k]) for k in start if ".ffn." in k]
        assert all(moved) if f != "ref.safetensors" else not any(moved)  # theta trained, theta_old its EMA


def test_per_block_fsdp2_runs_every_forward_path_like_the_plain_model(wan):
    """Per-block FSDP2 (gloo, one process): every block is its own unit, sharded (DTensor) at rest, gathered
    only inside its own calls. CausalWan reads block weights only through CausalBlock's methods; a call FSDP2
    did not see would meet sharded weights and fail. text_kv, the cached rollout, the cache-reading clip forward
    and its gradients, with and without gradient checkpointing, must equal the unsharded model's."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        plain = copy.deepcopy(wan.model)
        with torch.no_grad():
            for p in plain.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        sharded = copy.deepcopy(plain)
        policy_mod.shard(sharded)
        blocks = sharded.transformer.blocks
        assert isinstance(sharded, FSDPModule) and all(isinstance(b, FSDPModule) for b in blocks)
        text, x_t = wan.text_encoder(["a fox in the snow"]), torch.randn(2, 16, 6, 8, 8)
        runs = []
        for m in (plain, sharded):
            with torch.no_grad():
                kv = m.text_kv(text)
                g = group_rollout(m, kv, draw_noise(3, 1, (16, 3, 8, 8)), draw_noise(4, 2, (16, 6, 8, 8)), 3, 9)
                cache = g.clip_cache(m, kv, 0, 2)
            out = [torch.cat([k for k, _ in kv]), g.clips]
            for ckpt in (False, True):
                m.gradient_checkpointing = ckpt
                v = policy_mod.ClipForward(m, N)(text, x_t, torch.tensor([0.9, 0.6]), cache, 3)
                v.square().mean().backward()  # (FSDP2 reduces gradients in backward's hooks, not autograd.grad)
                ps = list(m.transformer.parameters())
                out += [v.detach()] + [p.grad.full_tensor() if isinstance(p, DTensor) else p.grad for p in ps]
                m.zero_grad()
            runs.append(out)
        assert all(isinstance(p, DTensor) for p in blocks.parameters())  # resharded after every call
        assert len(runs[0]) == len(runs[1])
        for a, b in zip(*runs):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    finally:
        dist.destroy_process_group()


def blueness(frames, prompts):
    """A simple reward for the sign check: the mean blue channel (mid-range on the tiny VAE's output)."""
    return frames[:, :, 2].mean((1, 2, 3))


@pytest.mark.parametrize("sign", [1, -1])
def test_training_raises_the_reward_and_the_flipped_sign_lowers_it(tmp_path, sign):
    """End to end on the tiny model: weight +1 trains toward bluer clips; weight -1 flips every
    advantage, so the same run must make them less blue. Measured on the fixed held-out noise."""
    train.main(["--prompts_per_rank=1", "--clip_frames=3", "--max_history_frames=0", "--steps=16", "--eval_every=16",
                "--save_every=100", f"--reward=test_astrolabe:blueness:{sign}", f"--out_dir={tmp_path}"])
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    blue = [r["eval/test_astrolabe:blueness"] for r in rows if "eval/test_astrolabe:blueness" in r]
    assert len(blue) == 2 and sign * (blue[1] - blue[0]) > 3e-4, blue
    # the log's paired change is that of the per-sample CSVs: 4 held-out prompts x 16 fixed noises
    before, after = (np.array([float(r["test_astrolabe:blueness"]) for r in
                               csv.DictReader(open(tmp_path / "samples" / f"scores_step{s:05d}.csv"))]) for s in (0, 16))
    d = after - before
    assert d.shape == (64,) and rows[-1]["eval/test_astrolabe:blueness_delta"] == pytest.approx(d.mean(), abs=1e-12)
    assert rows[-1]["eval/test_astrolabe:blueness_delta_se"] == pytest.approx(d.std(ddof=1) / 8, rel=1e-9)
    assert rows[-1]["eval/test_astrolabe:blueness_improved"] == pytest.approx(np.mean(d > 0))  # the share that went up


def test_paired_statistics_hand_table():
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[2.0, 2.0], [5.0, 3.0]])
    # b - a = 1, 0, 2, -1: mean 1/2, sample variance 5/3, s.e. sqrt(5/3)/2; wins 1 + 1/2 (tie) + 1 + 0 of 4
    assert evaluate.paired(a, b) == pytest.approx((0.5, math.sqrt(5 / 3) / 2, 0.625), rel=1e-12)
    assert evaluate.mean_se(a) == pytest.approx((2.5, math.sqrt(5 / 3) / 2), rel=1e-12)
    row = evaluate.summary({"composite": b}, {"composite": a})  # b: mean 3, sample variance (1 + 1 + 4 + 0) / 3
    assert row == pytest.approx({"eval/composite": 3.0, "eval/composite_se": math.sqrt(2) / 2,
                                 "eval/composite_delta": 0.5, "eval/composite_delta_se": math.sqrt(5 / 3) / 2,
                                 "eval/composite_improved": 0.625}, rel=1e-12)
    assert evaluate.table({"A": {"composite": a}, "B": {"composite": b}}, ["A", "B"]).splitlines()[2] == \
        "| composite | 2.5000 ± 0.6455 | 3.0000 ± 0.7071 | +0.5000 ± 0.6455 | 62% |"


def test_evaluate_command_end_to_end(tmp_path):
    """Base (A) against base + a train.py checkpoint (B) on the tiny model: each CSV score equals an independent
    single-sample rollout from the documented noise, the summary's paired difference is the CSV's, the grid
    holds the first, middle and last frames."""
    train.main(FAST + ["--steps=1", "--lr=0.2", f"--out_dir={tmp_path / 'run'}"])
    ckpt = str(tmp_path / "run" / open(tmp_path / "run" / "latest").read().strip())
    spec = "colorfulness:1,smoothness:2"
    runs = evaluate.main(["--lora_b", ckpt, "--seeds", "3", "--batch", "2", "--frames", "3", "--window", "9",
                          "--height", "32", "--width", "32", "--reward", spec, "--out_dir", str(tmp_path / "ev")])
    rows = list(csv.DictReader(open(tmp_path / "ev" / "scores.csv")))
    prompts = config.read_prompts("prompts/eval.txt")
    assert len(rows) == 2 * len(prompts) * 3 and {r["generator"] for r in rows} == {"A", "B"}
    reward_fn = build_reward(spec)
    for label, i, s in [("A", 1, 2), ("B", 3, 0)]:  # seed 2 was the lone sample of its batch, seed 0 the first of two
        w = M.load_tiny()
        if label == "B":
            C.load_trained(w.model.transformer, ckpt)
        w.height = w.width = 32
        shape = w.latent_shape(3)
        lat = generate(w.model, w.model.text_kv(w.text_encoder([prompts[i]])),
                       draw_noise(hash((0, i, s)) & 0x7FFFFFFF, 1, shape), new_cache(w.model, 1, shape, 3, 9, N), 0, N)
        video = V.decode(w.vae, lat)
        want = reward_fn(video, [prompts[i]])["composite"].item()
        row = next(r for r in rows if (r["generator"], r["prompt_index"], r["seed"]) == (label, str(i), str(s)))
        assert float(row["composite"]) == pytest.approx(want, rel=1e-5)
    a = np.array([float(r["composite"]) for r in rows if r["generator"] == "A"])
    b = np.array([float(r["composite"]) for r in rows if r["generator"] == "B"])
    assert np.abs(b - a).min() > 0  # the checkpoint changed every sample
    line = next(x for x in open(tmp_path / "ev" / "summary.md") if x.startswith("| composite"))
    d = b - a
    assert f"{d.mean():+.4f} ± {d.std(ddof=1) / len(d) ** 0.5:.4f} | {100 * np.mean(d > 0):.0f}%" in line
    assert runs["A"]["composite"].shape == (len(prompts), 3)
    grid = imageio.v2.imread(tmp_path / "ev" / "grid.png")  # 4 prompts x (A | B), each first / middle / last frame
    k, top, left = 4, 44, 260  # 32-pixel frames scaled to 128, below the generators' names, right of the prompts
    assert grid.shape == (top + k * (4 * 32 + 3 * 4), left + k * (2 * 3 * 32 + 4), 3)
    assert (grid[:top] < 128).any() and (grid[top:, :left] < 128).any()  # labels drawn
    grid = grid[top::k, left::k]  # back to one pixel per frame pixel
    w = M.load_tiny()
    w.height = w.width = 32
    lat = generate(w.model, w.model.text_kv(w.text_encoder([prompts[1]])), draw_noise(hash((0, 1, 0)) & 0x7FFFFFFF, 1,
                   w.latent_shape(3)), new_cache(w.model, 1, w.latent_shape(3), 3, 9, N), 0, N)
    v = V.decode(w.vae, lat)[0]
    tile = grid[36:68, 64:96]  # prompt 1, generator A, last frame
    expect = (v[-1].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert v.shape[0] == 9 and np.abs(tile.astype(int) - expect.astype(int)).max() <= 1


@pytest.mark.parametrize("args,msg", [
    (["--prompts=/nonexistent.txt"], "does not exist"),
    (["--preset=sd3"], "unknown preset"),
    (["--learning_rate=1"], "unknown config key 'learning_rate'"),
    (["--clip_frames=12", "--window_frames=9"], "longer than window_frames"),
    (["--group_size=1"], "at least 2 candidates"),
    (["steps=3"], "--key=value"),
    (["--steps=abc"], "--steps='abc' is not an int"),
    (["--steps=1.5"], "--steps='1.5' is not an int"),
    (["--lr=1e-3x"], "--lr='1e-3x' is not a number"),
    (["--steps=None"], "--steps=None: steps needs a value"),
    (["--resume=ture"], "--resume='ture' is not a boolean"),
    (["--gradient_checkpointing=maybe"], "--gradient_checkpointing='maybe' is not a boolean"),
    (["--lora_rank=-1"], "lora_rank=-1 must be at least 0"),
    (["--lora_alpha=0"], "lora_alpha=0 must be positive"),
    (["--height=33"], "height=33 must be a positive multiple of 16"),
    (["--width=50"], "width=50 must be a positive multiple of 16"),
    (["--height=0"], "height=0 must be a positive multiple of 16"),
    (["--width=8"], "width=8 must be a positive multiple of 16"),
    (["--save_every=0"], "save_every=0 must be at least 1"),
    (["--log_every=0"], "log_every=0 must be at least 1"),
    (["--eval_every=-1"], r"eval_every=-1 must be at least 0 \(0: never\)"),
    (["--frames_per_block=0"], "frames_per_block=0 must be at least 1"),
    (["--prompts_per_rank=0"], "prompts_per_rank=0 must be at least 1"),
    (["--eval_frames=0"], "eval_frames=0 must be at least 1"),
    (["--clip_frames=0"], "clip_frames=0 must be at least 1"),
    (["--max_history_frames=-3"], "max_history_frames=-3 must be at least 0"),
    (["--clip_start=-3"], "clip_start=-3 must be at least 0"),
    (["--sink_frames=12"], "sink_frames=12 must be at most window_frames=9"),
    (["--window_frames=2", "--clip_frames=3"], "window_frames=2 is smaller than one block"),
    (["--gamma=1.5"], r"gamma=1.5 must lie in \[0, 1\]"),
    (["--rho=2"], r"rho=2.0 must lie in \[0, 1\]"),
    (["--lr=nan"], "lr=nan must be a finite number"),
    (["--a_max=0"], "a_max=0.0 must be positive"),
    (["--grad_clip=0"], "grad_clip=0.0 must be positive"),
    (["--keep_checkpoints=0"], "keep_checkpoints=0 must be at least 1"),
    (["--reward=colorfulness:nan"], "--reward: reward 'colorfulness' has a non-finite weight 'nan'"),
    (["--reward=colorfulness:1,smoothness:inf"], "reward 'smoothness' has a non-finite weight 'inf'"),
    (["--reward=no_such_module:fn:1"], "cannot import module 'no_such_module'"),
    (["--model=/nonexistent/wan"], "model='/nonexistent/wan' does not exist"),
    (["--out_dir=README.md"], "out_dir='README.md' is a file"),
    (["--clip_start=1023"], "past the generator's 1024-frame RoPE table"),
])
def test_train_rejects_bad_config_before_rollout(monkeypatch, args, msg):
    monkeypatch.setattr(train, "train_step", lambda *a: pytest.fail("a step ran before the config was rejected"))
    monkeypatch.setattr(train, "evaluate", lambda *a: pytest.fail("evaluated before the config was rejected"))
    with pytest.raises(SystemExit, match=msg) as err:
        train.main(args)
    assert "\n" not in str(err.value)  # one line


def test_train_rejects_empty_prompts_and_other_model_size(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SystemExit, match="has no prompts"):
        train.main([f"--prompts={empty}"])
    train.main(FAST + ["--steps=1", f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="differs from the checkpoint's in lora_rank: 8 -> 4"):
        train.main(FAST + ["--steps=2", f"--out_dir={tmp_path}", "--resume=true", "--lora_rank=4"])


# ------------------------------------------------------------------ bad files, resume hygiene (issue 16)
class CodeInPickle:
    def __reduce__(self):
        return (os.system, ("echo never run",))


def test_torch_files_read_as_data_with_clear_errors(tmp_path):
    import files
    legacy = {"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(41))}
    torch.save(legacy, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert_same_tree(files.read_torch(str(tmp_path / "legacy.pt"), mmap=True), legacy)  # the old format still loads
    torch.save({"generator": CodeInPickle()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt holds code \(posix.system\), not only tensors: refused") as err:
        files.read_torch(str(tmp_path / "evil.pt"))
    assert "weights_only" not in str(err.value)  # never invite the user to switch the safety off
    (tmp_path / "junk.pt").write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="junk.pt: damaged or not a torch checkpoint"):
        files.read_torch(str(tmp_path / "junk.pt"))
    save_file({"a": torch.randn(4)}, tmp_path / "t.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "t.safetensors").read_bytes()[:20])
    with pytest.raises(ValueError, match="cut.safetensors: damaged or not a safetensors file"):
        files.read_safetensors(str(tmp_path / "cut.safetensors"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors: no such file"):
        files.read_safetensors(str(tmp_path / "missing.safetensors"))


def test_replace_durably_fsyncs_files_then_renames_then_fsyncs_the_folder(tmp_path, monkeypatch):
    import files
    events, real_replace = [], os.replace
    monkeypatch.setattr(files, "fsync", lambda path: events.append(("fsync", os.path.basename(path))))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", os.path.basename(b))), real_replace(a, b)))
    (tmp_path / "ckpt.tmp").mkdir()
    for name in ("a.safetensors", "state.pt"):
        (tmp_path / "ckpt.tmp" / name).write_bytes(os.urandom(8))
    files.replace_durably(str(tmp_path / "ckpt.tmp"), str(tmp_path / "ckpt"))
    assert sorted(events[:2]) == [("fsync", "a.safetensors"), ("fsync", "state.pt")]
    assert events[2:] == [("fsync", "ckpt.tmp"), ("rename", "ckpt"), ("fsync", tmp_path.name)]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["a.safetensors", "state.pt"]


def lora_folder(root, alpha=8, value=None):
    """A train.py-style LoRA checkpoint folder for the tiny model (one adapted Linear)."""
    g = torch.Generator().manual_seed(43)
    sd = {"blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 32, generator=g),
          "blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 4, generator=g)}
    if value is not None:
        sd["blocks.0.attn1.to_q.lora_B.weight"][3, 1] = value
    os.makedirs(root, exist_ok=True)
    save_file(sd, os.path.join(root, "adapter_model.safetensors"))
    with open(os.path.join(root, "adapter_config.json"), "w") as f:
        f.write(alpha if isinstance(alpha, str) else json.dumps({"lora_alpha": alpha}))
    return root


@pytest.mark.parametrize("damage,msg", [
    (dict(value=float("nan")), r"adapter_model.safetensors: non-finite \(NaN or inf\) values in 1 tensor"),
    (dict(value=float("inf")), r"adapter_model.safetensors: non-finite"),
    (dict(alpha="{not json"), r"adapter_config.json: not valid JSON"),
    (dict(alpha="[8]"), r"adapter_config.json: lora_alpha must be a positive number, got None"),
    (dict(alpha=0), r"adapter_config.json: lora_alpha must be a positive number, got 0"),
    (dict(alpha='{"lora_alpha": "8"}'), r"lora_alpha must be a positive number, got '8'"),
])
def test_sample_refuses_a_damaged_lora_folder_before_generating(tmp_path, monkeypatch, damage, msg):
    import sample
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("generated from a damaged checkpoint"))
    folder = lora_folder(str(tmp_path / "ckpt-000001"), **damage)
    with pytest.raises(SystemExit, match=msg):
        sample.main(["--prompt", "a", "--frames", "3", "--lora", folder, "--out", str(tmp_path / "v.mp4"), "--device", "cpu"])
    assert not (tmp_path / "v.mp4").exists()


def test_lora_folder_merges_exactly_and_missing_files_are_named(tmp_path):
    tr = M.load_tiny().model.transformer
    before = tr.blocks[0].attn1.to_q.weight.detach().clone()
    folder = lora_folder(str(tmp_path / "ok"), alpha=2)
    C.load_trained(tr, folder)
    g = torch.Generator().manual_seed(43)
    A, B = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)
    torch.testing.assert_close(tr.blocks[0].attn1.to_q.weight, before + 0.5 * B @ A)  # alpha / r = 2 / 4
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="ok is not a train.py checkpoint folder"):
        C.load_trained(tr, folder)
    with pytest.raises(FileNotFoundError, match="holds neither adapter_model.safetensors nor transformer.safetensors"):
        C.load_trained(tr, str(tmp_path))


def test_generate_rejects_switches_off_block_starts_and_frames_past_rope(wan):
    m, kv = wan.model, text_kv(wan)
    calls, forward = [], m.forward
    m.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    try:
        for frames, msg in [((4,), r"switch at frame 4 would take effect at frame 6 .* past the last block of \[0, 6\)"),
                            ((9,), r"switches \[9\] must be increasing frames in \[0, 6\)"), ((-3,), r"switches \[-3\]")]:
            with pytest.raises(ValueError, match=msg):
                generate(m, kv, draw_noise(5, 1, (16, 6, 8, 8)), new_cache(m, 1, (16, 6, 8, 8), 3, 9, N),
                         switches=[(f, kv) for f in frames])
        with pytest.raises(ValueError, match=r"frames \[1020, 1026\) are past the 1024-position RoPE table"):
            generate(m, kv, draw_noise(5, 1, (16, 6, 8, 8)), new_cache(m, 1, (16, 6, 8, 8), 3, 9, N), 1020)
        with pytest.raises(ValueError, match=r"noise must be \[B, 4, C, F, h, w\]"):
            generate(m, kv, torch.randn(1, 16, 6, 8, 8), new_cache(m, 1, (16, 6, 8, 8), 3, 9, N))
        with pytest.raises(ValueError, match="noise has batch 2, the cache batch 1"):
            generate(m, kv, draw_noise(5, 2, (16, 3, 8, 8)), new_cache(m, 1, (16, 3, 8, 8), 3, 9, N))
        with pytest.raises(ValueError, match=r"latent size 7x8 is not divisible by the patch \(2, 2\)"):
            new_cache(m, 1, (16, 3, 7, 8), 3, 9, N)
        with pytest.raises(ValueError, match="cache sizes must be positive ints"):
            KVCache(2, 0, 12, 16, 2, 16, sink_frames=3, window_frames=9, frames_per_block=3)
        with pytest.raises(ValueError, match="attend\\(\\) before begin_block"):
            KVCache(2, 1, 12, 16, 2, 16, 3, 9, 3).attend(0, torch.randn(1, 48, 2, 16), torch.randn(1, 48, 2, 16), True)
        assert calls == []  # every error came before the first forward
    finally:
        del m.forward


@pytest.mark.parametrize("content,msg", [
    (None, "no log file"), ("", "has no rows with a step and a composite reward"),
    ('{"step": 1, "eval/composite": 0.5}\n{oops\n', "line 2 is not JSON"),
    ('{"step": 1, "time/rollout": 2.0}\n', "has no rows with a step and a composite reward"),
])
def test_report_refuses_logs_with_nothing_to_draw(tmp_path, content, msg):
    path = tmp_path / "log.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit, match=msg):
        train.main(["report", str(path)])
    assert not (tmp_path / "log.png").exists()


def test_resume_trims_the_log_cleans_tmp_and_keeps_k_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    args = FAST + ["--save_every=1", "--keep_checkpoints=2", f"--out_dir={out}"]
    train.main(args + ["--steps=3"])
    assert sorted(os.listdir(out)) == ["ckpt-000002", "ckpt-000003", "latest", "log.jsonl"]
    # a crash after step 3 was logged, while its checkpoint was being written: ckpt-000003 never renamed
    shutil.rmtree(out / "ckpt-000003")
    (out / "ckpt-000003.tmp").mkdir()
    (out / "ckpt-000003.tmp" / "old.safetensors").write_bytes(b"")
    (out / "latest").write_text("ckpt-000002")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 4, "reward/comp')  # a line torn by the crash
    capsys.readouterr()
    train.main(args + ["--steps=4", "--resume=true"])
    printed = capsys.readouterr().out
    assert "ckpt-000003.tmp, left by an interrupted save" in printed
    assert "resuming from step 2" in printed and "dropped 2 row(s) past step 2" in printed
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2, 3, 4]
    assert sorted(os.listdir(out)) == ["ckpt-000003", "ckpt-000004", "latest", "log.jsonl"]


def test_resume_validates_the_checkpoint_and_the_config(tmp_path, capsys):
    import shutil as sh
    src = tmp_path / "src"
    train.main(FAST + ["--steps=1", f"--out_dir={src}"])

    def attempt(name, damage, *extra):
        out = tmp_path / name
        sh.copytree(src, out)
        damage(out, out / "ckpt-000001")
        train.main(FAST + [f"--out_dir={out}", "--resume=true", "--steps=2", *extra])
        return out

    cases = [
        ("outside", lambda o, c: (o / "latest").write_text("../src/ckpt-000001"), "not the name of a ckpt-NNNNNN folder"),
        ("gone", lambda o, c: (o / "latest").write_text("ckpt-000007"), "ckpt-000007, which does not exist"),
        ("code", lambda o, c: torch.save({"step": 1, "x": CodeInPickle()}, c / "state.pt"), "state.pt holds code"),
        ("junk", lambda o, c: (c / "state.pt").write_bytes(os.urandom(40)), "state.pt: damaged or not a torch checkpoint"),
        ("keys", lambda o, c: torch.save({"step": 1}, c / "state.pt"), "state.pt lacks"),
        ("nostate", lambda o, c: os.remove(c / "state.pt"), "state.pt: no such file"),
        ("cut", lambda o, c: (c / "old.safetensors").write_bytes(b"\x05"), "old.safetensors: damaged"),
        ("nan", lambda o, c: save_file({k: v.fill_(float("nan")) for k, v in
                                        __import__("safetensors.torch").torch.load_file(c / "ref.safetensors").items()},
                                       c / "ref.safetensors"), "ref.safetensors: non-finite"),
    ]
    for name, damage, msg in cases:
        with pytest.raises(SystemExit, match=msg):
            attempt(name, damage)
    with pytest.raises(SystemExit, match=r"differs from the checkpoint's in group_size: 2 -> 4, micro_batch: 2 -> 4, "
                                         r"seed: 0 -> 5 \(only steps, lr"):
        attempt("config", lambda o, c: None, "--group_size=4", "--micro_batch=4", "--seed=5")
    with pytest.raises(SystemExit, match="--steps=1: .* is already at step 1"):
        attempt("behind", lambda o, c: None, "--steps=1")
    capsys.readouterr()
    out = attempt("lr", lambda o, c: None, "--lr=0.001")  # applied to the optimizer, and said so
    assert "resuming from step 1; lr 0.02 -> 0.001" in capsys.readouterr().out
    state = read_ckpt(out)[1]
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.001] and state["config"]["lr"] == 0.001


# ------------------------------------------------------------------ loss (issue 5)
# ---- policy loss (Eq. 1, 2) ----

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


# ---- advantages (Eq. 4) ----

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


def test_bad_input_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="shape"):
        policy_loss(x, torch.randn(4, 2), x, torch.rand(4))
    with pytest.raises(ValueError, match="shape"):
        policy_loss(x, x, torch.randn(3, 3), torch.rand(4))
    with pytest.raises(ValueError, match="shape"):
        policy_loss(x, x, x, torch.rand(3))
    with pytest.raises(ValueError, match="shape"):
        kl_loss(x, torch.randn(4, 4), torch.tensor([True, False, False, False]))
    with pytest.raises(ValueError, match="does not divide"):
        advantages(torch.randn(10), group_size=4)
    with pytest.raises(ValueError, match="nan"):
        advantages(torch.tensor([1.0, float("nan"), 2.0, 3.0]), group_size=2)
    with pytest.raises(ValueError, match="inf"):
        advantages(torch.tensor([1.0, 0.0, float("inf"), 3.0]), group_size=2)
    with pytest.raises(ValueError, match="shape"):
        Controller().uncertainty_mask(torch.randn(5), torch.randn(4, 2))
    with pytest.raises(ValueError, match="auxiliaries.*nan"):
        Controller().uncertainty_mask(torch.randn(3), torch.tensor([[0.0], [float("nan")], [1.0]]))


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


# ---- uncertainty mask ----

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


# ---- dynamic reference and EMA ----

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


# ---- two processes (gloo) ----

def _worker(rank, world, init, rewards, P, X, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    n = len(rewards) // world  # each rank owns whole groups
    sl = slice(rank * n, (rank + 1) * n)
    A, r = advantages(rewards[sl], group_size=4)
    mask = Controller().uncertainty_mask(P[sl], X[sl])
    torch.save((A, r, mask), os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_match_one():
    g = torch.Generator().manual_seed(8)
    rewards = torch.randn(16, generator=g) * 3 + torch.arange(16) // 4  # 4 groups of 4
    P, X = torch.randn(16, generator=g), torch.randn(16, 2, generator=g)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(2, f"tcp://127.0.0.1:{port}", rewards, P, X, out), nprocs=2)
        parts = [torch.load(os.path.join(out, f"{i}.pt")) for i in range(2)]
    A, r = advantages(rewards, group_size=4)
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), A)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), r)
    mask = Controller().uncertainty_mask(P, X)
    assert torch.equal(torch.cat([p[2] for p in parts]), mask)
    # a local-only std would differ: the groups have different spreads
    assert not torch.allclose(advantages(rewards[:8], 4)[0], A[:8])


# ------------------------------------------------------------------ rewards (issue 4)
SPECIALS = reward_models.SPECIALS
# Qwen2-VL-Instruct chat_template (tokenizer_config.json), the reference for reward_models.CHAT
QWEN2VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
PIXELS = (28 * 28 * 4, 28 * 28 * 6)  # tiny budget: a 64x96 frame -> 56x84 -> 4x6 patches -> 2x3 tokens
NORM = {"VQ_mean": 0.3, "VQ_std": 2.0, "MQ_mean": -0.2, "MQ_std": 0.5, "TA_mean": 1.0, "TA_std": 4.0}


def make_tokenizer():
    """Byte-level BPE without merges plus the special tokens: a Qwen2-VL-compatible tokenizer, no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>")
    fast.add_tokens(SPECIALS, special_tokens=True)
    fast.chat_template = QWEN2VL_TEMPLATE
    return fast


def tiny_config(tok):
    from transformers import Qwen2VLConfig
    ids = tok.convert_tokens_to_ids
    return Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                         rope_parameters=dict(rope_type="default", rope_theta=100.0, mrope_section=[2, 1, 1])),
        vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def randomize(model, seed):
    """Large random weights so positions and every input matter (the default init is nearly flat)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def hps_head(d, dtype=torch.float32):
    return nn.Sequential(nn.Linear(d, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2))


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def hps(tok):
    return randomize(HPSv3(tiny_config(tok), hps_head(32), tok, PIXELS), 0)


@pytest.fixture(scope="module")
def va(tok):
    return randomize(VideoAlign(tiny_config(tok), nn.Linear(32, 1, bias=False), tok, PIXELS, norm=NORM, fps=2.0), 1)


def video(b, f, h=64, w=96, seed=0):
    return torch.rand(b, f, 3, h, w, generator=torch.Generator().manual_seed(seed))


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


# ------------------------------------------------------------------ the Qwen2-VL forward


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


# ------------------------------------------------------------------ HPSv3: top 30% of frames


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


# ------------------------------------------------------------------ VideoAlign: 2 fps, grayscale MQ


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


# ------------------------------------------------------------------ checkpoints


def legacy(sd):
    """Today's keys -> the transformers-4.45 layout the checkpoints were saved in (inverse of the remap)."""
    out = {}
    for k, v in sd.items():
        out[k.replace("model.visual.", "visual.", 1) if k.startswith("model.visual.")
            else k.replace("model.language_model.", "model.", 1) if k.startswith("model.language_model.") else k] = v
    return out


def test_hpsv3_checkpoint_remap(hps, tok, tmp_path):
    sd = legacy({k: v.clone() for k, v in hps.state_dict().items()})
    assert "visual.merger.mlp.2.weight" in sd and "model.layers.0.self_attn.q_proj.weight" in sd and "rm_head.5.weight" in sd
    sd["lm_head.weight"] = torch.randn(len(tok), 32)
    save_file(sd, tmp_path / "HPSv3.safetensors")
    loaded = load_hpsv3(tmp_path / "HPSv3.safetensors", tokenizer=tok, config=tiny_config(tok), pixels=PIXELS)
    frames = video(1, 3, seed=17)
    torch.testing.assert_close(loaded.score(frames, ["a cat"]), hps.score(frames, ["a cat"]))
    sd["model.layers.0.mlp.upp_proj.weight"] = sd.pop("model.layers.0.mlp.up_proj.weight")
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="upp_proj"):
        load_hpsv3(tmp_path / "bad.safetensors", tokenizer=tok, config=tiny_config(tok), pixels=PIXELS)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_hpsv3(tmp_path / "missing.safetensors", tokenizer=tok, config=tiny_config(tok))


LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def videoreward_folder(root, va, tok, form):
    """A VideoReward folder like KwaiVGI/VideoReward's (full) or a training checkpoint (LoRA form), plus
    the scores a correctly merged model must give: base weights + (alpha / r) * B @ A, alpha 8, r 4."""
    g = torch.Generator().manual_seed(23)
    base = {k: v.clone() for k, v in va.state_dict().items()}
    merged, peft = dict(base), {}
    for k, w in base.items():
        if k.startswith("model.language_model.layers.") and k.split(".")[-2] in LORA and k.endswith("weight"):
            a, b = torch.randn(4, w.shape[1], generator=g), torch.randn(w.shape[0], 4, generator=g) * 0.1
            merged[k] = w + 2.0 * b @ a
            stem = "base_model.model." + legacy({k[:-len(".weight")]: 0}).popitem()[0]
            peft[f"{stem}.lora_A.default.weight"], peft[f"{stem}.lora_B.default.weight"] = a, b
    meta = {"data_config": {"prompt_template_type": "detailed_special", "fps": 2.0, "max_frame_pixels": 200704},
            "model_config": {"reward_token": "special", "output_dim": 1},
            "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8, "use_rslora": False},
            "inference_config": NORM}
    ckpt = root / "checkpoint-20"
    (root / "checkpoint-3").mkdir(parents=True)  # an older step, to be ignored
    ckpt.mkdir()
    (root / "model_config.json").write_text(json.dumps(meta))
    plain = legacy(base)
    plain["lm_head.weight"] = plain["model.embed_tokens.weight"]
    if form == "full":  # PeftModel.state_dict(): base_layer for wrapped Linears
        full = {"base_model.model." + (k.replace(f".{k.split('.')[-2]}.", f".{k.split('.')[-2]}.base_layer.")
                                       if k.split(".")[-2] in LORA and k.startswith("model.layers.") else k): v
                for k, v in plain.items()}
        torch.save({**full, **peft}, ckpt / "model.pth")
    else:
        basedir = root / "Qwen2-VL-2B-Instruct"
        basedir.mkdir()
        hub = {k: (torch.randn_like(v) if k.startswith("visual.") else v) for k, v in plain.items()}  # untrained ViT
        hub["model.embed_tokens.weight"] = torch.cat([plain["model.embed_tokens.weight"], torch.randn(5, 32)])
        save_file({k: v.contiguous() for k, v in hub.items() if k != "lm_head.weight"}, basedir / "model.safetensors")
        torch.save({"base_model.model." + k: v for k, v in plain.items() if k.startswith(("visual.", "rm_head."))},
                   ckpt / "non_lora_state_dict.pth")
        save_file({k.replace(".default.", "."): v for k, v in peft.items()}, ckpt / "adapter_model.safetensors")
    want = VideoAlign(tiny_config(tok), nn.Linear(32, 1, bias=False), tok, (128 * 28 * 28, 200704), norm=NORM, fps=2.0)
    want.load_state_dict(merged)
    return want.eval()


@pytest.mark.parametrize("form", ["full", "lora"])
def test_videoalign_checkpoint_forms(va, tok, tmp_path, form):
    want = videoreward_folder(tmp_path, va, tok, form)
    base = tmp_path / "Qwen2-VL-2B-Instruct" if form == "lora" else None
    got = load_videoalign(tmp_path, tokenizer=tok, base=base, config=tiny_config(tok))
    frames = video(2, 5, 40, 40, seed=29)
    for axis, gray in (("MQ", True), ("TA", False)):
        torch.testing.assert_close(got.score(frames, ["a", "b"], axis, gray), want.score(frames, ["a", "b"], axis, gray))
    if form == "lora":
        with pytest.raises(FileNotFoundError, match="videoalign_base"):
            load_videoalign(tmp_path, tokenizer=tok, config=tiny_config(tok))
    else:
        sd = torch.load(tmp_path / "checkpoint-20" / "model.pth")
        sd.pop(next(k for k in sd if k.endswith("q_proj.lora_B.default.weight")))
        torch.save(sd, tmp_path / "checkpoint-20" / "model.pth")
        with pytest.raises(KeyError, match="q_proj.lora_B"):
            load_videoalign(tmp_path, tokenizer=tok, config=tiny_config(tok))


# ------------------------------------------------------------------ offline rewards and the composite


def test_offline_rewards_move_the_right_way():
    v = video(1, 13, 64, 64, seed=31)
    red = 0.5 * v + 0.5 * torch.tensor([1., 0, 0])[:, None, None]
    assert prompt_color(red, ["a red car"]) > prompt_color(v, ["a red car"])
    assert prompt_color(red, ["a blue car"]) < prompt_color(v, ["a blue car"])
    assert prompt_color(red, ["a car"]).item() == 0
    pixel = torch.tensor([1., 0, 0]).view(1, 1, 3, 1, 1)  # one pure red pixel
    assert prompt_color(pixel, ["Red!"]).item() == pytest.approx(1.0)
    gray = v.mean(2, keepdim=True).expand(-1, -1, 3, -1, -1)
    assert colorfulness(gray, ["x"]).item() == pytest.approx(0, abs=1e-6) and colorfulness(v, ["x"]) > 0.1
    mixed = gray.clone()
    mixed[:, [2, 5, 8, 11]] = v[:, [2, 5, 8, 11]]  # 4 colourful frames of 13: top-30% keeps k = 3 of them
    rg = v[0, :, 0] - v[0, :, 1]
    yb = (v[0, :, 0] + v[0, :, 1]) / 2 - v[0, :, 2]
    per = (rg.flatten(1).var(1, unbiased=False) + yb.flatten(1).var(1, unbiased=False)).sqrt() \
        + 0.3 * (rg.flatten(1).mean(1) ** 2 + yb.flatten(1).mean(1) ** 2).sqrt()
    assert colorfulness(mixed, ["x"]).item() == pytest.approx(per[[2, 5, 8, 11]].sort().values[1:].mean().item(), rel=1e-5)
    still = v[:, :1].expand(-1, 13, -1, -1, -1) * torch.linspace(0.9, 1, 13)[None, :, None, None, None]
    assert smoothness(still, ["x"]) > smoothness(v, ["x"])
    lum = (v[0] * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1).numpy()
    assert smoothness(v, ["x"]).item() == pytest.approx(-np.abs(np.diff(lum, axis=0)).mean(), rel=1e-5)


@pytest.mark.parametrize("f", [9, 21])
def test_default_offline_spec_gives_a_learnable_deterministic_signal(f):
    reward_fn = build_reward(DEFAULT_OFFLINE_SPEC)
    assert reward_fn.names == ["colorfulness", "smoothness", "prompt_color"] and reward_fn.weights == [1.0, 1.0, 1.0]
    frames = video(6, f, 64, 64, seed=f) ** torch.linspace(0.5, 3, 6)[:, None, None, None, None]
    prompts = ["a red car", "a blue sky", "a green field", "a cat", "a red fox", "white snow"]
    out = reward_fn(frames, prompts)
    assert out.keys() == {"colorfulness", "smoothness", "prompt_color", "composite"}
    for name, r in out.items():
        assert r.dtype == torch.float32 and r.shape == (6,) and r.device.type == "cpu" and torch.isfinite(r).all()
        assert name == "prompt_color" or r.std() > 1e-3  # varies across samples
    torch.testing.assert_close(out["composite"], out["colorfulness"] + out["smoothness"] + out["prompt_color"])
    torch.testing.assert_close(reward_fn(frames, prompts)["composite"], out["composite"], rtol=0, atol=0)


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


def test_bad_inputs_raise_clear_errors(tmp_path):
    reward_fn, frames = build_reward(DEFAULT_OFFLINE_SPEC), video(2, 9, 64, 64)
    with pytest.raises(ValueError, match=r"\[0, 1\], got min .* max 1.5"):
        reward_fn(frames * 1.5, ["a", "b"])
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\].*\[2, 9, 64, 64\]"):
        reward_fn(frames[:, :, 0], ["a", "b"])
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\].*\[2, 9, 4, 64, 64\]"):
        reward_fn(torch.cat([frames, frames[:, :, :1]], 2), ["a", "b"])
    with pytest.raises(ValueError, match="list of 2 prompt strings"):
        reward_fn(frames, ["a"])
    with pytest.raises(ValueError, match="unknown reward 'hps'"):
        build_reward("hps:1")
    with pytest.raises(ValueError, match="must be name:weight"):
        build_reward("colorfulness")
    with pytest.raises(ValueError, match="needs paths\\['hpsv3'\\]"):
        build_reward("hpsv3:1")
    with pytest.raises(FileNotFoundError, match="nowhere/HPSv3.safetensors"):
        build_reward("hpsv3:1", paths={"hpsv3": str(tmp_path / "nowhere/HPSv3.safetensors")})
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        build_reward("videoalign_mq:1", paths={"videoalign": str(tmp_path)})
    with pytest.raises(ValueError, match="has no function nope"):
        build_reward("test_astrolabe:nope:1")


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


def test_laps_split_the_step_and_take_transfers_out(monkeypatch):
    """train.Laps against a hand table: a fake clock, 0.5 s of parked-model copies during the first phase."""
    clock, ended = iter([0.0, 2.0, 5.0, 6.0]), []
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock))
    monkeypatch.setitem(train.offload.MOVED, "seconds", 10.0)
    lap = train.Laps(torch.device("cpu"), hook=ended.append)
    lap("text")
    train.offload.MOVED["seconds"] += 0.5  # a parked model came to the GPU inside "text"
    lap("history")
    lap("text")
    lap(None)
    assert lap.times == {"transfer": 0.5, "text": 1.5 + 1.0, "history": 3.0} and ended == ["text", "history", "text"]
