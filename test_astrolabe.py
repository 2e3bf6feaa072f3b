"""Tests for astrolabe. CPU, tiny seeded models, fresh random inputs; each compares against an
independent reference (diffusers' own forward with a dense mask built here, separate full copies,
hand-written key tables, autograd)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import model as M
from kv_cache import KVCache
from rollout import clip_velocity, draw_noise, generate, group_rollout, new_cache

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
    qf, kf = frame[:, None], frame[None, :]
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
    """Every key of the original Wan2.1 layout (DESIGN.md section 3), written out by hand."""
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
    M.load_wan_state_dict(fresh.transformer, M.read_checkpoint(str(tmp_path / "self_forcing.pt")))
    x, kv = torch.randn(2, 16, 3, 8, 8), text_kv(wan)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, 500.0, kv), wan.model(x, 500.0, kv), atol=0, rtol=0)


def test_loader_errors_name_the_keys(wan, tmp_path):
    sd = to_original(wan.model.transformer.state_dict(), 2)
    fresh = M.load_tiny(seed=1).model.transformer
    missing = {k: v for k, v in sd.items() if k != "blocks.1.ffn.2.bias"}
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.net\.2\.bias"):
        M.load_wan_state_dict(fresh, missing)
    with pytest.raises(ValueError, match=r"blocks\.7\.norm2\.weight"):
        M.load_wan_state_dict(fresh, {**sd, "blocks.7.norm3.weight": torch.ones(32)})
    with pytest.raises(ValueError, match="unknown checkpoint layout.*encoder.layer"):
        M.load_wan_state_dict(fresh, {"encoder.layer.0.weight": torch.ones(1)})
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        M.read_checkpoint(str(tmp_path / "nope.pt"))
    with pytest.raises(KeyError, match="generator_ema"):
        torch.save({"generator": sd}, tmp_path / "g.pt")
        M.read_checkpoint(str(tmp_path / "g.pt"), "generator_ema")


def test_longlive_lora_merges_into_base(wan):
    torch.manual_seed(6)
    tr = copy.deepcopy(wan.model.transformer)
    A, B = torch.randn(4, 32), torch.randn(32, 4)
    w = tr.blocks[1].attn2.to_v.weight.clone()
    M.merge_lora(tr, {"base_model.model.blocks.1.cross_attn.v.lora_A.weight": A,
                      "base_model.model.blocks.1.cross_attn.v.lora_B.weight": B}, alpha=8)
    torch.testing.assert_close(tr.blocks[1].attn2.to_v.weight, w + 2.0 * B @ A)
    with pytest.raises(ValueError, match="lora_B"):
        M.merge_lora(tr, {"base_model.model.blocks.1.cross_attn.v.lora_A.weight": A})


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
    # reference: the context passes of frames 0-5 re-run from scratch with prompt B
    ref = new_cache(m, 1, (16, 6, 8, 8), 0, 6, N)
    with torch.no_grad():
        for s in (0, 3):
            ref.begin_block(s, N)
            m(first[:, :, s:s + N], 0.0, kv_b, ref, s, store=True)
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
    (["--prompt", "a|b", "--switch", "21", "--frames", "9"], "increasing block starts"),
    (["--prompt", "a|b|c", "--switch", "6,3", "--frames", "9"], "increasing block starts"),
    (["--prompt", "a|b"], "need 1 --switch"),
    (["--prompt", "a", "--out", "/nonexistent/dir/x.mp4"], "cannot write"),
])
def test_sample_rejects_bad_input_before_generating(tmp_path, args, msg):
    import sample
    args = args if "--out" in args else args + ["--out", str(tmp_path / "v.mp4")]
    with pytest.raises(SystemExit, match=msg):
        sample.main(args)
    assert list(tmp_path.iterdir()) == []  # nothing written
