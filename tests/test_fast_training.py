"""The training step's fast paths (fast_train.py) against the eager reference path, on the CPU: rewards scored per
micro-batch, theta_old's merged copy, selective activation checkpointing, the forked decoder's layout, and the
compiled paths traced by dynamo's eager backend (the same tracing, guards and recompilations as on the GPU)."""
import contextlib
import copy
import functools

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import config
import fast
import fast_train
import model as M
import rewards
import train
import vae as V
from helpers import NORM, PIXELS, hps_head, make_tokenizer, randomize, tiny_config, video
from policy import Policy
from reward_models import HPSv3, VideoAlign
from rollout import clip_velocity, draw_noise, group_rollout

LORA = ["--lora_rank=4", "--lora_alpha=8",  # scale alpha / r = 2: a wrong scale in the merge shows
        "--merged_rollouts=true", "--fast_decode=true", "--train_attention=true", "--checkpoint_attention=true"]
FAST = ["--prompts_per_rank=1", "--group_size=4", "--micro_batch=2", "--clip_frames=3", "--max_history_frames=3",
        "--clip_start=3", "--eval_every=0", "--gamma=0.9", "--lr=1e-3"]


def random_adapters(policy, seed):
    """Nonzero, different LoRA weights in all three adapters (B starts at zero: the merge would be the base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in Policy.NAMES:
            for p in policy.params(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ------------------------------------------------------------------ rewards per micro-batch
def qwen_rewards(seed):
    """Tiny random HPSv3 and VideoAlign, and their three rewards (HPSv3; VideoAlign's MQ on gray, TA)."""
    tok = make_tokenizer()
    hps = randomize(HPSv3(tiny_config(tok), hps_head(32), tok, PIXELS), seed)
    va = randomize(VideoAlign(tiny_config(tok), nn.Linear(32, 3, bias=False), tok, PIXELS, norm=NORM, fps=2.0), seed + 1)
    mq, ta = functools.partial(va.score, axis="MQ", gray=True), functools.partial(va.score, axis="TA", gray=False)
    return hps, va, [hps.score, mq, ta]


def test_rewards_per_micro_batch_equal_the_whole_group(monkeypatch):
    """The scores of clips scored `batch` at a time equal one call on all of them: HPSv3 (its 16-frame chunks straddle
    clips: 5 frames a clip), VideoAlign's two axes (4-clip chunks) and the offline rewards, each clip with its own
    prompt (a batch given another batch's prompts, or reordered, would differ). Each model is still resident once."""
    hps, va, fns = qwen_rewards(0)
    names = ["hpsv3", "va_mq", "va_ta", "colorfulness", "prompt_color"]
    fns += [rewards.colorfulness, rewards.prompt_color]
    reward = rewards.CompositeReward(names, [1.0, 0.5, 2.0, 1.0, 3.0], fns, [hps, va, va, None, None])
    frames = video(7, 5, 64, 96, seed=3) ** torch.linspace(0.4, 2.5, 7)[:, None, None, None, None]
    prompts = ["a red fox", "a blue whale", "green hills", "a white cat", "a red car", "black night", "a fox"]
    whole = reward(frames, prompts)
    resident = []
    real = rewards.resident
    monkeypatch.setattr(rewards, "resident", lambda m: (resident.append(m), real(m))[1])
    for batch in (1, 3):
        resident.clear()
        parts = reward(frames, prompts, batch=batch, device="cpu")
        assert resident == [hps, va, None]
        for k in whole:
            torch.testing.assert_close(parts[k], whole[k], atol=1e-5, rtol=1e-5, msg=f"{k}, batch {batch}")
    assert whole["composite"].std() > 1e-2  # the clips score differently: a shuffle would show
    with pytest.raises(ValueError, match="must lie in"):
        reward(frames * 1.5, prompts, batch=3)


# ------------------------------------------------------------------ theta_old merged
def velocities(net, wan, seed):
    """A rollout (history + 2 candidates) and the training forward of theta_old on fresh random inputs."""
    g = torch.Generator().manual_seed(seed)
    kv = net.text_kv(wan.text_encoder(["a kite over the sea"]))
    grp = group_rollout(net, kv, draw_noise(seed, 1, (16, 3, 8, 8)), draw_noise(seed + 1, 2, (16, 6, 8, 8)), 3, 9)
    cache = grp.clip_cache(net, kv, 0, 2)
    x_t = torch.randn((2, 16, 6, 8, 8), generator=g)
    v = clip_velocity(net, x_t, torch.rand(2, generator=g) * 0.9 + 0.05, kv, cache, 3)
    return torch.cat([k for k, _ in kv]), grp.clips, v


@torch.no_grad()
def test_merged_copy_computes_theta_old(wan):
    w = copy.deepcopy(wan)
    policy = Policy(config.parse_config(LORA), w, 1)
    random_adapters(policy, 0)
    policy.use_merged = True
    merged = policy.merge_old()
    assert not any(hasattr(m, "lora_A") for m in merged.modules()), "the copy must hold no peft layers"
    assert merged.transformer is not w.model.transformer
    for seed in (10, 20):
        want = velocities(policy.net("old"), w, seed)
        for a, b in zip(velocities(merged, w, seed), want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    other = velocities(policy.net("default"), w, 10)  # the control: another adapter is far away
    assert (other[2] - want[2]).abs().max() > 1e-2
    assert policy.rollout_net() is merged
    policy.use_merged = False
    assert policy.rollout_net() is w.model  # the `old` adapter, switched on


def test_merged_copy_follows_the_ema_after_a_train_step(wan):
    cfg = config.parse_config(FAST + LORA)
    ctx = train.build(cfg, wan=copy.deepcopy(wan))
    random_adapters(ctx.policy, 1)
    ctx.policy.merge_old()
    before = [p.clone() for p in ctx.policy.merged.parameters()]
    train.train_step(1, cfg, ctx)
    after = list(ctx.policy.merged.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the EMA moved theta_old, and the copy with it
    with torch.no_grad():
        for a, b in zip(velocities(ctx.policy.merged, ctx.wan, 30), velocities(ctx.policy.net("old"), ctx.wan, 30)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ selective activation checkpointing
class CountAttention(TorchDispatchMode):
    supports_higher_order_operators = True  # a compiled backward recomputes attention inside run_with_rng_state

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = args[1] if func is torch.ops.higher_order.run_with_rng_state else func
        self.calls += op in fast_train.SDPA_OPS
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_keeps_self_attention_and_gives_the_same_gradients(wan):
    """Gradients with no checkpointing, whole-block recompute and the selective policy agree to rounding; the
    backward recomputes both attention forwards of every block call without the policy, only the cross-attention
    with it (the self-attention output is kept), also with the block call compiled whole (compile_train; AOT
    autograd's partition of forward and backward, which follows the policy's tags, run without code generation)."""
    w = copy.deepcopy(wan)
    policy = Policy(config.parse_config(LORA), w, 1)
    random_adapters(policy, 2)
    old = policy.rollout_net()
    kv = old.text_kv(w.text_encoder(["a cat"]))
    g = group_rollout(old, kv, draw_noise(1, 1, (16, 6, 8, 8)), draw_noise(2, 2, (16, 9, 8, 8)), 3, 9)
    cache = g.clip_cache(old, kv, 0, 2)
    x_t, grads, recomputed = torch.randn(2, 16, 9, 8, 8), [], []
    net = policy.net("default")
    keep, compiled = fast_train.keep_self_attention, torch.compile(M.block_call, backend="aot_eager")
    runs = ((False, None, None, None), (True, None, None, None), (True, keep, None, None),
            (True, keep, M.SAMPLING_ATTENTION, None),  # backends chosen inside the checkpoint
            (True, None, None, compiled), (True, keep, M.SAMPLING_ATTENTION, compiled))
    torch._dynamo.reset()
    for ckpt, sac, backends, call in runs:
        net.gradient_checkpointing, net.checkpoint_policy, net.train_attention, net.block_call = ckpt, sac, backends, call
        v = clip_velocity(net, x_t, torch.tensor([0.9, 0.6]), net.text_kv(w.text_encoder(["a cat"])), cache, 6)
        with CountAttention() as count:
            grads.append(torch.autograd.grad(v.square().mean(), policy.params("default")))
        recomputed.append(count.calls)
    net.gradient_checkpointing, net.checkpoint_policy, net.train_attention, net.block_call = False, None, None, None
    torch._dynamo.reset()
    calls = 3 * 2  # 3 blocks of the clip x 2 layers: attention forwards the backward runs again
    assert recomputed == [0, 2 * calls, calls, calls, 2 * calls, calls]  # none; self- and cross-; cross- only
    for other in grads[1:]:
        for a, b in zip(other, grads[0]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ decoder fork and the compiled paths
def test_forked_decoder_state_has_the_layout_of_its_own_batch_state(wan):
    vae = copy.deepcopy(wan.vae)
    fast.speed_up(vae, compile=False)
    dec = V.history_decoder(vae, torch.randn(1, 16, 9, 8, 8))
    fork = dec.fork(3)
    forked = [(s.shape, s.stride()) for s in fork.state if torch.is_tensor(s)]
    fork(torch.randn(3, 16, 3, 8, 8))
    assert forked == [(s.shape, s.stride()) for s in fork.state if torch.is_tensor(s)]
    expanded = V.Decoder(vae, state=[s.expand(3, *s.shape[1:]) if torch.is_tensor(s) else s for s in dec.state])
    assert forked != [(s.shape, s.stride()) for s in expanded.state if torch.is_tensor(s)]  # the control


@contextlib.contextmanager
def eager_compile(monkeypatch):
    """torch.compile with dynamo's eager backend, under the recompile limit train.py sets for its compiled paths (64);
    hitting it fails instead of silently running eagerly. dynamo's own config patch, not monkeypatch: monkeypatch's
    undo deletes a config entry it found unset, which hides it for the rest of the process."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def test_compiled_fast_paths_equal_eager_and_compile_once(wan, monkeypatch):
    """train_step with every fast path compiled (dynamo's eager backend), compile_train and checkpoint_attention
    together, equals the eager step from the same state. A second step with no history (a fresh decoder stream for
    the clips, shorter contexts for the training forward's blocks) compiles new block calls only, and a third at
    the first one's history nothing new; nothing hits the recompile limit (dynamo would then run eagerly without a
    word)."""
    cfg = config.parse_config(FAST + LORA + ["--compile_train=true", "--gradient_checkpointing=true"])
    blocks = lambda: len(torch._dynamo.eval_frame._debug_get_cache_entry_list(M.block_call.__code__))
    rows = []
    with eager_compile(monkeypatch) as counters:
        for compile in (False, True):
            ctx = fast_train.configure(train.build(cfg, wan=copy.deepcopy(wan)), cfg, compile=compile)
            random_adapters(ctx.policy, 3)
            ctx.policy.merge_old()
            assert (ctx.policy.merged.stages is M.BLOCK_STAGES) != compile
            assert (ctx.policy.model.block_call is None) != compile
            rows.append(train.train_step(1, cfg, ctx))
        graphs, calls = counters["stats"]["unique_graphs"], blocks()
        assert calls > 0
        cfg.clip_start = 0  # no history: the clip is a fresh decoder stream, in the chunk layouts of the history's
        train.train_step(2, cfg, ctx)  # own batch-1 stream, since the forks decode one candidate a call
        assert counters["stats"]["unique_graphs"] - graphs == blocks() - calls > 0
        graphs, cfg.clip_start = counters["stats"]["unique_graphs"], 3
        stages, decoder, call = ctx.policy.merged.stages, V.FAST[ctx.wan.vae], ctx.policy.model.block_call
        fast_train.configure(ctx, cfg, compile=False)  # switched off and on again (the bench does): the same
        assert ctx.policy.merged.stages is M.BLOCK_STAGES and V.FAST[ctx.wan.vae] is ctx.wan.vae.decoder
        assert ctx.policy.model.block_call is None
        fast_train.configure(ctx, cfg, compile=True)  # compiled objects, so nothing compiles again
        assert ctx.policy.merged.stages is stages and V.FAST[ctx.wan.vae] is decoder
        assert ctx.policy.model.block_call is call
        train.train_step(3, cfg, ctx)
        assert counters["stats"]["unique_graphs"] == graphs
    for k in ("policy_loss", "grad_norm", "reward/composite"):
        assert rows[1][k] == pytest.approx(rows[0][k], rel=1e-5, abs=1e-8), k


def test_compiled_reward_models_score_as_eager_and_stop_compiling_after_a_second_prompt_length(monkeypatch):
    """compile_rewards: HPSv3's and VideoAlign's ViT attention batched over images, their ViT blocks and decoder
    layers through one compiled function each (dynamo's eager backend), give the eager scores (transformers' own
    per-image attention) on fresh frames. The layers of a model share their graphs (fewer graphs than layers), which
    dynamo makes dynamic in what changed between calls (at the latest a second prompt length), so that after three
    calls a prompt of another token count and another batch compile nothing (a graph per length would compile at
    nearly every step), under the recompile limit train.py sets; switching off restores transformers' modules."""
    hps, va, fns = qwen_rewards(5)
    reward = rewards.CompositeReward(["hpsv3", "va_mq", "va_ta"], [1.0, 0.5, 2.0], fns, [hps, va, va])
    frames = video(3, 5, 64, 96, seed=8) ** torch.linspace(0.4, 2.5, 3)[:, None, None, None, None]  # unlike clips
    calls = [(frames, ["a red fox", "a blue whale", "green hills"]),
             (frames, ["a red fox runs through fresh snow at sunrise, seen from far above the trees"] * 3),
             (frames[:2], ["a cat", "a small grey cat asleep on a warm windowsill"]),
             (frames[[2, 0]], ["an old lighthouse on a cliff in a storm at night, waves breaking below"] * 2)]
    eager = [reward(x, p) for x, p in calls]
    layers = [m for q in (hps, va) for m in (*q.model.visual.blocks, *q.model.language_model.layers)]
    with eager_compile(monkeypatch) as counters:
        fast_train.compile_rewards(reward, True)
        assert all(m._compiled_call_impl is not None for m in layers)
        before = counters["stats"]["unique_graphs"]  # the process's count so far (other tests compiled too)
        compiled = [reward(x, p) for x, p in calls[:3]]
        graphs = counters["stats"]["unique_graphs"]
        assert 0 < graphs - before < len(layers)
        compiled.append(reward(*calls[3]))
        assert counters["stats"]["unique_graphs"] == graphs
        fast_train.compile_rewards(reward, False)
        assert all(m._compiled_call_impl is None for m in layers)
        assert not any("forward" in vars(b.attn) for q in (hps, va) for b in q.model.visual.blocks)
    for e, c in zip(eager, compiled):
        assert e["composite"].std() > 1e-3  # the clips score differently, by far more than the tolerance
        for k in e:
            torch.testing.assert_close(c[k], e[k], atol=1e-5, rtol=1e-5, msg=k)


def test_batched_vision_attention_equals_transformers_per_image_attention():
    """compile_rewards' ViT attention, one SDPA call over [images, heads, patches, dim], against transformers' own
    VisionAttention (one call per image) on fresh inputs of 4 images; patches that do not split evenly are refused."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionAttention
    hps, _, _ = qwen_rewards(5)
    vis = hps.model.visual
    torch.manual_seed(3)
    attn = vis.blocks[0].attn
    n = 4 * 36
    x = torch.randn(n, attn.qkv.in_features)
    cos, sin = torch.randn(n, attn.head_dim), torch.randn(n, attn.head_dim)
    cu = torch.tensor([0, 36, 72, 108, 144], dtype=torch.int32)
    want = VisionAttention.forward(attn, x, cu_seqlens=cu, position_embeddings=(cos, sin))
    got = fast_train.batched_vision_attention(attn, x, cu_seqlens=cu, position_embeddings=(cos, sin))
    assert want.abs().mean() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="do not split evenly over 4 images"):
        fast_train.batched_vision_attention(attn, x[:-1], cu_seqlens=cu, position_embeddings=(cos, sin))


def test_bench_train_runs_the_comparison_and_the_scaled_count_on_the_tiny_models(tmp_path):
    """`python -m bench train --tiny --check-scaling --compile --each-lever`, the compiled paths on dynamo's eager
    backend, in a fresh process: each half of the fast step stays at rounding against the eager one, the FLOPs scaled
    from G = 2 equal those counted at G = 4, phase by phase (the rule the GPU table relies on), and the lever table's
    steps (each lever alone, all, all but each, after the fast step) compile nothing more, but for the first set with
    compile_train and without checkpoint_attention (whole blocks recomputed: other graphs), which runs again warm."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import functools, runpy, sys, torch; torch.compile = functools.partial(torch.compile, backend='eager'); "
            "sys.argv = ['bench', 'train', '--tiny', '--check-scaling', '--compile', '--rows=6:2,6:4', '--each-lever', "
            "'--levers=merged_rollouts,fast_decode,train_attention,compile_train,checkpoint_attention,"
            "compile_rewards']; "
            "runpy.run_module('bench', run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "BENCH_OUT": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    checks = out[out.index("the scaling checked"):].splitlines()[2:9]
    assert [line.split()[2] for line in checks] == ["text", "history", "clips", "decode", "reward", "train", "optimizer"]
    assert all(float(line.split()[-1]) < 1e-9 and float(line.split()[3]) > 0 for line in checks[:6]), checks
    levers = out[out.index("the lever table at"):].splitlines()[2:16]
    names = ["merged_rollouts", "fast_decode", "train_attention", "compile_train", "checkpoint_attention",
             "compile_rewards"]
    sets = ["every lever off"] + names + ["all levers"] + [f"all but {k}" for k in names]
    assert [" ".join(line.split()[:-9]) for line in levers] == sets, levers
    recompiled = {"compile_train"}  # whole blocks recomputed, compiled once: "all but checkpoint_attention" reuses it
    assert {k for k, line in zip(sets, levers) if line.split()[-1] != "0"} == recompiled, levers
    runs = [out.count(f"lever table: {k}, history") for k in sets]
    assert runs == [1 + (k in recompiled) for k in sets], runs
    saved = json.load(open(tmp_path / "train_self_forcing_partial.json"))
    [e] = saved["errors"]
    assert e["variant"] == "fast" and 0 < e["clips_rel_err"] < 1e-5 and e["rewards_rel_err"] < 1e-5, e
    assert e["loss_rel_err"] < 1e-4 and 0 < e["grad_rel_err"] < 1e-2, e
    rows = [r for r in saved["rows"] if r["variant"] == "fast" and r["phase"] == "step" and "G=4" in r["run"]]
    assert len(rows) == 1 and rows[0]["tflop"] > 0


def test_bench_train_without_the_comparison_times_the_fast_step_from_the_first_runs_state(tmp_path, monkeypatch,
                                                                                         capsys):
    """--compare=0 (a row too long for one device call with the eager step and the halves beside it): no eager step
    and no halves run, and the timed warm step starts from the state its warm-up started from: the same loss and
    gradient norm, to the bit, on the CPU."""
    import json
    import re
    import bench.train_step as bench_train_step
    from bench.common import Args
    monkeypatch.setattr(bench_train_step, "OUT_DIR", str(tmp_path))
    bench_train_step.bench_train(Args(tiny=True, rows="6:2", levers="merged_rollouts,checkpoint_attention",
                                      flops=False, compare=False, compile=False))
    out = capsys.readouterr().out
    assert "eager reference" not in out and "halves compared" not in out and "each half" not in out, out
    steps = re.findall(r"^(fast[^,]*(?:, warm \(the first run again\))?), history 6, G 2: .* loss (\S+), grad norm "
                       r"(\S+),", out, re.M)
    assert [s[0] for s in steps] == ["fast (compiles: warm-up)", "fast, warm (the first run again)"], out
    assert steps[0][1:] == steps[1][1:] and float(steps[0][2]) > 0, steps
    saved = json.load(open(tmp_path / "train_self_forcing_partial.json"))
    assert saved["errors"] == [] and {r["variant"] for r in saved["rows"]} == {"fast"}, saved


def test_bench_splits_flops_and_kernels_by_family_as_a_hand_table():
    """bench train --profile divides each phase's counted FLOPs by its GPU time per kernel family: FlopCount's split
    against a hand count (a linear forward and backward, a convolution), and kernel names as profiles show them
    (cuDNN, flash, cutlass, cuBLAS, inductor's fused kernels, which carry the names of the ops they feed) sorted into
    the families the FLOPs are counted in."""
    import re
    from bench.common import KERNELS
    from bench.flops import FlopCount, kind
    lin, conv = nn.Linear(16, 8), nn.Conv3d(4, 8, 3)
    x, v = torch.randn(3, 5, 16, requires_grad=True), torch.randn(1, 4, 3, 6, 6)
    with FlopCount() as c:
        lin(x).square().sum().backward()
        with torch.no_grad():
            conv(v)
    linear = 2 * 15 * 16 * 8  # one (15 x 16) @ (16 x 8): the forward, then the input's and the weight's gradients
    assert c.by_kind == {"matmul": 3 * linear, "conv": 2 * (8 * 4 * 4) * 4 * 27} and c.total == sum(c.by_kind.values())
    ops = torch.ops.aten
    assert [kind(o.default) for o in (ops._scaled_dot_product_cudnn_attention,
                                      ops._scaled_dot_product_cudnn_attention_backward, ops._flash_attention_backward,
                                      ops.convolution_backward, ops.bmm)] == \
        ["attention", "attention backward", "attention backward", "conv", "matmul"]
    names = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0": "attention",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0":
            "attention backward",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>": "attention backward",
        "fmha_cutlassF_bf16_aligned_64x128_rf_sm80": "attention",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "conv",
        "nvjet_tst_192x192_64x4_1x2_h_bz_coopA_NTT": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1": "matmul",
        "triton_poi_fused__scaled_dot_product_cudnn_attention_add_mul_0": "norm/elementwise",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1": "norm/elementwise",
        "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<direct_copy_kernel_cuda>>":
            "copy/layout",
    }
    assert {n: next(c for c, pat in KERNELS if re.search(pat, n, re.I)) for n in names} == names


def test_bench_profile_rows_count_the_profiled_steps_reference_forwards(capsys):
    """The training phase's FLOPs by kernel family follow the profiled step's theta_ref forwards, not the counted
    step's: a hand table (counted with 2 reference forwards of 10 attention TFLOP each; profiled with 0 and with 1).
    Counted with none and profiled with one, there is nothing to scale from: the rows keep the count and say so."""
    from bench.flops import profile_rows
    T = 1e12
    flops = {"train": 100 * T, "train/ref": 30 * T, "kind/train/attention": 60 * T, "kind/train/ref/attention": 20 * T,
             "kind/train/matmul": 40 * T, "kind/train/ref/matmul": 10 * T}
    profiles = {"train": ([], 2000.0, {"attention": 0.5, "matmul": 0.25, "copy/layout": 0.25})}  # 2 s busy
    for refs, want in ((0, [70, 40, 30, None]), (1, [85, 50, 35, None])):
        rows = profile_rows({"time/train": 2.5}, profiles, (21, 3, flops, {"ref": 2}), refs)
        assert [r["kernels"] for r in rows] == ["all kernels", "attention", "matmul", "copy/layout"]
        assert [r["tflop"] or None for r in rows] == pytest.approx(want)
        assert rows[1]["tflops"] == pytest.approx(want[1] / 1.0) and rows[0]["of_wall"] == pytest.approx(0.8)
    assert "theta_ref" not in capsys.readouterr().out
    no_refs = {"train": 70 * T, "kind/train/attention": 40 * T, "kind/train/matmul": 30 * T}  # counted with none
    rows = profile_rows({"time/train": 2.5}, profiles, (21, 3, no_refs, {}), 1)
    assert [r["tflop"] or None for r in rows] == pytest.approx([70, 40, 30, None])  # what was counted, no more
    assert "ran 1 theta_ref forward(s), the counted step none" in capsys.readouterr().out


def test_bench_profile_takes_each_phase_once_and_refuses_a_phase_run_twice(monkeypatch):
    """--profile's tables are per phase entry: a phase that a step enters twice (prompts_per_rank > 1) would keep only
    its last entry's kernels against the wall time of both, so it stops, naming the phase. The CPU build of torch has
    no CUDA profiler: a stand-in records starts and stops (each phase's table comes from one stopped profile)."""
    import types
    import torch.profiler
    from bench.flops import phase_profiles
    log = []

    class Profile:
        def __init__(self, activities):
            log.append("new")

        def start(self):
            log.append("start")

        def stop(self):
            log.append("stop")

        def key_averages(self):
            return []
    monkeypatch.setattr(torch.profiler, "profile", Profile)
    seen, ctx = [], types.SimpleNamespace(lap_hook=None)
    ctx.lap_hook = seen.append  # the bench's own hook (FLOP marks) still runs at each boundary
    with pytest.raises(SystemExit, match="'clips' ran twice"):
        with phase_profiles(ctx) as out:
            for ph in ("history", "clips", "decode", "clips"):
                ctx.lap_hook(ph)
    assert sorted(out) == ["clips", "decode", "history"] and seen == ["history", "clips", "decode", "clips"]
    assert ctx.lap_hook == seen.append and log == ["new", "start"] + ["stop", "new", "start"] * 3 + ["stop"]  # stopped once


def test_the_1_3b_presets_switch_on_the_measured_levers_and_the_default_keeps_the_eager_path():
    """train.py --preset=self_forcing runs the levers the bench measured together (bench/README.md); the tiny default, the CPU
    tests' reference, runs none; krea (14B, unmeasured) none."""
    names = ("merged_rollouts", "fast_decode", "train_attention", "compile_train", "checkpoint_attention",
             "compile_rewards")
    table = {p: [getattr(config.parse_config([f"--preset={p}"]), k) for k in names] for p in config.PRESETS}
    on = [True] * 6
    assert table == {"tiny": [False] * 6, "self_forcing": on, "causal_forcing": on, "longlive": on,
                     "krea": [False] * 6}
    for p in config.PRESETS:  # each preset's levers pass the config check
        config.check_config(config.parse_config([f"--preset={p}", "--out_dir=/nonexistent/x"]))
