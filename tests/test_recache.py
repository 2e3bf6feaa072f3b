"""The KV re-cache at a prompt switch, against LongLive 1.0's rule (pipeline/interactive_causal_inference.py,
_recache_after_switch): one call at t = 0 with the new prompt over the last min(sink + window, s) clean frames
before the switch s, unmasked, frame r0 + j into slot j, the sink kept only when r0 > 0 and global_sink.
The reference is diffusers' own transformer forward with a full-attention processor written here (no cache)."""
import pytest
import torch
import torch.nn.functional as F

import fast
import model as M
from helpers import text_kv
from rollout import draw_noise, generate, new_cache, recache, switch_starts

N, SINK, WINDOW, TPF = 3, 3, 9, 16  # LongLive's local_attn_size 12, sink_size 3


class FullAttention:
    """diffusers attention processor: every query attends to every key of the call (and to `extra` K/V of
    that layer, prepended), with explicit RoPE; records each call's rotated K and V."""

    def __init__(self, cos, sin, extra, record):
        self.cos, self.sin, self.extra, self.record = cos, sin, extra, record

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        def rope(x):  # diffusers' interleaved real formula, written out
            x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
            c, s = self.cos[..., 0::2], self.sin[..., 1::2]
            return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)
        q = rope(attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1)))
        k = rope(attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1)))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        self.record.append((k, v))
        if self.extra is not None:
            ek, ev = self.extra[len(self.record) - 1]
            k, v = torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return attn.to_out[0](o.transpose(1, 2).flatten(2))


def dense_kv(wan, x, first, text, extra=None):
    """Per-layer (K, V) of clean frames x [1, C, F, h, w] at absolute frames first.., t = 0, prompt `text`
    (umT5 embeddings), full attention among them and to `extra` [(K, V)] per layer."""
    tr = wan.model.transformer
    _, C, Fr, H, W = x.shape
    cos, sin = tr.rope(torch.zeros(1, C, first + Fr, H, W))
    cos, sin = cos[:, first * TPF:], sin[:, first * TPF:]
    saved, records = [b.attn1.processor for b in tr.blocks], []
    for b in tr.blocks:
        records.append([])
        b.attn1.processor = FullAttention(cos, sin, None if extra is None else [extra[len(records) - 1]],
                                          records[-1])
    try:
        with torch.no_grad():
            tr(x, torch.zeros(1, Fr * TPF), text, return_dict=False)
    finally:
        for b, p in zip(tr.blocks, saved):
            b.attn1.processor = p
    return [r[0] for r in records]


def cached(cache, layer, slots):
    a, b = slots
    return cache.k[layer][:, a * TPF:b * TPF], cache.v[layer][:, a * TPF:b * TPF]


@pytest.mark.parametrize("s,global_sink", [(6, True), (12, True), (12, False), (18, True), (18, False)])
def test_recache_equals_dense_full_attention_of_the_window(wan, s, global_sink):
    m, enc = wan.model, wan.text_encoder
    text_a, text_b = enc(["a quiet snowy forest"]), enc(["a busy neon city street"])
    noise = draw_noise(70 + s, 1, (16, s, 8, 8))
    cache = new_cache(m, 1, (16, s, 8, 8), SINK, WINDOW, N)
    video = generate(m, m.text_kv(text_a), noise, cache)
    before = [tuple(t.clone() for t in cached(cache, i, (0, SINK))) for i in range(len(cache.k))]
    recache(m, m.text_kv(text_b), cache, video, 0, s, global_sink)
    r0 = s - min(SINK + WINDOW, s)
    if r0 > 0 and global_sink:  # the window frames attend to the first prompt's sink, which stays
        sink = dense_kv(wan, video[:, :, :SINK], 0, text_a)  # block 0's context pass: the sink alone
        ref = dense_kv(wan, video[:, :, r0 + SINK:s], r0 + SINK, text_b, extra=sink)
        assert cache.frames == list(range(SINK)) + list(range(r0 + SINK, s)) and cache.sinks == (0, 1, 2)
        for i, ((k, v), (sk, sv)) in enumerate(zip(ref, sink)):
            torch.testing.assert_close(cached(cache, i, (0, SINK)), before[i], atol=0, rtol=0)
            torch.testing.assert_close(cached(cache, i, (0, SINK)), (sk, sv), atol=1e-5, rtol=0)
            torch.testing.assert_close(cached(cache, i, (SINK, SINK + WINDOW)), (k, v), atol=1e-5, rtol=0)
    else:  # frames [r0, s) all rewritten, the sink slots included
        ref = dense_kv(wan, video[:, :, r0:s], r0, text_b)
        assert cache.frames == list(range(r0, s)) and cache.sinks == (r0, r0 + 1, r0 + 2)
        for i, (k, v) in enumerate(ref):
            torch.testing.assert_close(cached(cache, i, (0, s - r0)), (k, v), atol=1e-5, rtol=0)
    # the deeper layer's sink keys carry the new prompt exactly when they were rewritten
    assert torch.allclose(cached(cache, 1, (0, SINK))[0], before[1][0], atol=1e-4) == (r0 > 0 and global_sink)
    # block-causal re-running (each block seeing only the sink and earlier blocks) gives other K/V
    causal = dense_kv(wan, video[:, :, r0:r0 + N], r0, text_b)
    assert not torch.allclose(causal[1][0], dense_kv(wan, video[:, :, r0:s], r0, text_b)[1][0][:, :N * TPF],
                              atol=1e-4)


def test_moved_sink_survives_eviction(wan):
    """global_sink false: after the switch at 18, frames 6-8 are the sink for the rest of the video."""
    m = wan.model
    kv_a, kv_b = m.text_kv(wan.text_encoder(["a cat"])), m.text_kv(wan.text_encoder(["a dog"]))
    cache = new_cache(m, 1, (16, 24, 8, 8), SINK, WINDOW, N)
    generate(m, kv_a, draw_noise(80, 1, (16, 24, 8, 8)), cache, switches=[(18, kv_b)], global_sink=False)
    assert cache.frames == [6, 7, 8] + list(range(15, 24))


def test_switch_off_a_block_start_takes_effect_at_the_next_one(wan):
    """LongLive switches at the first block start at or past the switch frame, one switch a block."""
    assert switch_starts([7, 8, 12], 0, 24, N) == [9, 12, 15]
    m = wan.model
    kvs = [m.text_kv(wan.text_encoder([p])) for p in ("a cat", "a dog", "a bird")]
    noise = draw_noise(81, 1, (16, 18, 8, 8))
    run = lambda sw: generate(m, kvs[0], noise, new_cache(m, 1, (16, 18, 8, 8), SINK, WINDOW, N),  # noqa: E731
                              switches=list(zip(sw, kvs[1:])))
    rounded, exact, none = run([7, 8]), run([9, 12]), run([])
    torch.testing.assert_close(rounded, exact, atol=0, rtol=0)
    torch.testing.assert_close(rounded[:, :, :9], none[:, :, :9], atol=1e-6, rtol=0)
    assert not torch.allclose(rounded[:, :, 9:], none[:, :, 9:], atol=1e-3)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled stages need a CUDA GPU (inductor)")
@pytest.mark.parametrize("global_sink", [True, False])
def test_compiled_stages_through_switches_equal_eager(global_sink):
    wan = M.load_tiny(seed=0).to("cuda")
    m, shape = wan.model, (16, 30, 8, 8)
    kvs = [m.text_kv(wan.text_encoder([p])) for p in ("a cat", "a dog", "a bird")]
    noise = draw_noise(82, 1, shape, "cuda")
    run = lambda: generate(m, kvs[0], noise, new_cache(m, 1, shape, SINK, WINDOW, N),  # noqa: E731
                           switches=[(7, kvs[1]), (19, kvs[2])], cache_last_block=False, global_sink=global_sink)
    eager = run()
    fast.compile_blocks(m)
    try:
        compiled = run()
    finally:
        m.stages = M.BLOCK_STAGES
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
