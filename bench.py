"""GPU benchmarks at the real sizes (Wan2.1-T2V-1.3B, umT5-XXL, the Wan VAE, HPSv3, VideoAlign; 14B for fsdp),
random weights (timing needs no trained weights), bf16.

    python bench.py generate        # 81 frames at 480x832 from text: eager vs compiled generator and decoder,
                                    # kernel profiles, end to end with progressive decoding; FPS, first frame
    python bench.py group           # G=8 clips of 12 frames after 18 history frames vs 8 independent rollouts
    python bench.py train [--preset=longlive] [--rows=s:G,...] [--no-flops]
                                    # one RL step at G = 24 (paper settings): time, memory per phase
    python bench.py scaling         # torchrun on 1, 2, 4 GPUs: candidates per second
    torchrun --nproc_per_node 2 bench.py fsdp   # FSDP2 whole-model vs per-block units; 14B LoRA / full
    python bench.py generate --tiny # any of them on the tiny model (a CPU smoke test)

Each prints a table and writes bench_<command>.json under out/bench (BENCH_OUT). Timings: CUDA synchronised,
one warm-up run, median of the timed runs; every fast variant is compared with the reference path (errors printed).
"""
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial

import torch
import torch.nn as nn

import config
import model as M
import vae as V
import rewards as R
import train
from rollout import draw_noise, generate, group_rollout, new_cache

WAN_1_3B = dict(M.TINY_TRANSFORMER, num_attention_heads=12, attention_head_dim=128, text_dim=4096, freq_dim=256,
                ffn_dim=8960, num_layers=30)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False)
TINY = "--tiny" in sys.argv
OUT_DIR = os.environ.get("BENCH_OUT", "out/bench")  # generated: JSON tables and profiles (ignored by git)
DEV = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
DT = torch.bfloat16 if DEV.type == "cuda" else torch.float32


def real_wan():
    """Wan2.1-T2V-1.3B transformer, umT5-XXL encoder and the Wan VAE at full size, random weights on DEV."""
    if TINY:
        return M.load_tiny().to(DEV)
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel
    torch.manual_seed(0)
    with torch.device(DEV):
        tr = WanTransformer3DModel(**WAN_1_3B).to(DT)
        for name, p in tr.named_parameters():  # as from_pretrained(torch_dtype=bf16): these stay fp32
            if set(name.split(".")) & set(tr._keep_in_fp32_modules):
                p.data = p.data.float()
        enc = UMT5EncoderModel(UMT5Config(**UMT5_XXL)).to(DT).eval()
        vae = AutoencoderKLWan().to(DT).eval()
    # byte-level tokens: the same 512-token encoder cost as umT5's own tokenizer
    return M.Wan(M.CausalWan(tr).eval(), M.TextEncoder(ByT5Tokenizer(), enc, 512), vae).to(DEV)


def timed(fn, runs=3):
    """(last result, median seconds) over `runs` after one warm-up, synchronising the device."""
    out, times = fn(), []
    for _ in range(runs):
        out = None  # free the previous result (a group cache can be tens of GB) before the next run
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def transformer_flops(cfg, frames, tpf, n=3, steps=5, window=21, sink=3):
    """Analytic FLOPs of generating `frames` latent frames: 2 x block-linear params x tokens, plus
    self-attention over the cache (4 T Lk d) and cross-attention over 512 text tokens, per forward."""
    d, f, layers = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"]
    linear = 2 * (6 * d * d + 2 * d * f)  # attn1 q,k,v,o + attn2 q,o (text K/V once per prompt) + ffn, per token
    total = 0
    for b in range(frames // n):
        keys = min((b + 1) * n, sink + window) * tpf
        T = n * tpf
        total += steps * layers * (linear * T + 4 * T * keys * d + 4 * T * 512 * d)
    return total


PEERS = [  # published end-to-end figures, 81 frames at 480x832 on one H100, the same 1.3B Wan model
    dict(variant="Self-Forcing (published, H100)", fps_end_to_end=17.0, first_frame_s=0.69),
    dict(variant="LongLive (published, H100)", fps_end_to_end=20.7),
    dict(variant="Reward Forcing (published, H100)", fps_end_to_end=23.1),
]
PROMPT = "a red fox runs through fresh snow at sunrise"


def attention_backends(backends):
    """Context: model.py's sampling attention backends for the duration (read at every call)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        default, M.SAMPLING_ATTENTION = M.SAMPLING_ATTENTION, backends
        try:
            yield
        finally:
            M.SAMPLING_ATTENTION = default
    return ctx()


def kernel_table(prof, top=12):
    """Per-kernel GPU time of a profile: (rows, GPU-busy ms) with each kernel's category and share."""
    cats = [("conv", "fprop|conv|implicit"), ("attention", "fmha|flash|sdpa|attention|cudnn"),
            ("matmul", "gemm|nvjet|cutlass|xmma|mma"), ("copy/layout", "copy|cat|pad|transpose|permute|memcpy|memset|fill"),
            ("norm/elementwise", ".")]
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0 and e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events)
    out = []
    for e in sorted(events, key=lambda e: -e.self_device_time_total):
        cat = next(c for c, pat in cats if __import__("re").search(pat, e.key, __import__("re").I))
        out.append(dict(kernel=e.key[:70], category=cat, calls=e.count, ms=e.self_device_time_total / 1e3,
                        share=e.self_device_time_total / total))
    by_cat = {}
    for r in out:
        by_cat[r["category"]] = by_cat.get(r["category"], 0) + r["share"]
    return out[:top], total / 1e3, by_cat


def profile(fn):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    sync()
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    wall = (time.perf_counter() - t0) * 1e3
    rows, busy, by_cat = kernel_table(prof)
    print(f"  GPU busy {busy:.0f} ms of {wall:.0f} ms wall (profiler on); by category: "
          + ", ".join(f"{k} {v:.0%}" for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])), flush=True)
    show(rows)
    return dict(busy_ms=busy, wall_ms=wall, by_category=by_cat, kernels=rows)


def bench_generate(frames=21):
    """81 frames from text, end to end: the generator's and the decoder's fast paths against the eager
    reference (errors printed), per-kernel profiles, then progressive decoding: FPS and time to first frame."""
    from torch.utils.flop_counter import FlopCounterMode
    wan = real_wan()
    m, vae, n = wan.model, wan.vae, 3
    shape = wan.latent_shape(6 if TINY else frames)
    frames, tpf = shape[1], (shape[2] // 2) * (shape[3] // 2)
    noise = draw_noise(0, 1, shape, DEV)
    gflops = transformer_flops(WAN_1_3B if not TINY else M.TINY_TRANSFORMER, frames, tpf)
    rows, report = [], {}
    kv = m.text_kv(wan.text_encoder([PROMPT]))

    def gen():
        return generate(m, kv, noise, new_cache(m, 1, shape, 3, 21, n), 0, n, cache_last_block=False)

    def add(row):
        rows.append(row)
        print({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    # 1. generator: eager (cuDNN, flash attention), then the compiled block stages
    ref = None
    for name, backends in [("eager, cuDNN attention (reference)", M.SAMPLING_ATTENTION),
                           ("eager, flash attention", M.SAMPLING_ATTENTION[1:])]:
        if DEV.type != "cuda" and ref is not None:
            continue
        with torch.no_grad(), attention_backends(backends):
            latents, t = timed(gen, 3)
        ref = latents if ref is None else ref
        add(dict(part="generator", variant=name, seconds=t, tflops=gflops / t / 1e12,
                 ceiling=gflops / t / 805e12, rel_err=rel_err(latents, ref)))
    with torch.no_grad():
        print("profile: one eager generation", flush=True)
        report["profile_generator_eager"] = profile(gen)
        from torch._dynamo.utils import counters

        def compiled(name, mode=None):
            t0 = time.perf_counter()
            m.compile_blocks(mode=mode)
            gen()
            sync()
            compile_s = time.perf_counter() - t0
            latents, t = timed(gen, 3)
            add(dict(part="generator", variant=name, seconds=t, tflops=gflops / t / 1e12, ceiling=gflops / t / 805e12,
                     rel_err=rel_err(latents, ref), compile_s=compile_s, graphs=counters["stats"]["unique_graphs"]))
        compiled("compiled block stages (sample.py default on GPU)")
        print("profile: one compiled generation", flush=True)
        report["profile_generator_compiled"] = profile(gen)
        try:  # CUDA graphs through torch.compile's cudagraph trees: a lever measured, not the default
            compiled("compiled stages + CUDA graphs (reduce-overhead)", "reduce-overhead")
        except Exception as err:  # a lever that does not apply is a row, not a crash
            add(dict(part="generator", variant="compiled stages + CUDA graphs (reduce-overhead)", error=str(err)[:100]))
        m.compile_blocks()
        # 2. decoder: diffusers' one-shot decode (reference), streaming, channels_last_3d, compiled steady chunks
        with FlopCounterMode(display=False) as fc:
            V.decode(vae, ref[:, :, :4])
        dflops = fc.get_total_flops() / (1 + 4 * 3) * (1 + 4 * (frames - 1))  # per pixel frame, scaled up
        cfg = vae.config
        std, mean = (torch.tensor(x, device=DEV).view(1, -1, 1, 1, 1) for x in (cfg.latents_std, cfg.latents_mean))
        one_shot = lambda: ((vae.decode((ref * std + mean).to(vae.dtype)).sample.float().clamp(-1, 1) + 1) / 2)  # noqa
        pixels, t = timed(one_shot, 2)
        pixels = pixels.permute(0, 2, 1, 3, 4)
        add(dict(part="decode", variant="diffusers AutoencoderKLWan.decode (reference)", seconds=t,
                 tflops=dflops / t / 1e12, ceiling=dflops / t / 805e12, max_abs_err=0.0))
        for name, chunk, fast in [("streaming, 1 latent frame a call", 1, None), ("streaming, chunks of 3", 3, None),
                                  ("+ channels_last_3d, cudnn.benchmark", 3, False),
                                  ("+ compiled steady chunks (default on GPU)", 3, True)]:
            if fast is not None:
                t0 = time.perf_counter()
                V.speed_up(vae, compile=fast)
                V.Decoder(vae, chunk)(ref)
                sync()
                compile_s = time.perf_counter() - t0
            out, t = timed(lambda: V.Decoder(vae, chunk)(ref), 2)
            add(dict(part="decode", variant=name, seconds=t, tflops=dflops / t / 1e12, ceiling=dflops / t / 805e12,
                     max_abs_err=float((out - pixels).abs().max()), **({"compile_s": compile_s} if fast else {})))
        print("profile: one compiled streaming decode", flush=True)
        report["profile_decode"] = profile(lambda: V.Decoder(vae)(ref))

        # 3. end to end, text encoding included: decode after generation, or progressive (as sample.py). Decoding
        # on a second CUDA stream, overlapped with the next block, was measured too (H100, 2026-11-22: 3.92 s
        # against 3.94 s): the generator keeps the GPU busy, so it does not pay and is not kept.
        def end_to_end(progressive):
            start, first = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            text_kv = m.text_kv(wan.text_encoder([PROMPT]))
            dec, out = V.Decoder(vae), []

            def on_block(x0):  # as sample.py: the first latent frame alone, so the first frame is out at once
                for part in (x0[:, :, :1], x0[:, :, 1:]) if dec.frames == 0 and progressive else (x0,):
                    out.append((dec(part) * 255).round().to(torch.uint8).cpu())  # sample.py writes each block
                    len(out) == 1 and first.record()
            latents = generate(m, text_kv, noise, new_cache(m, 1, shape, 3, 21, n), 0, n, cache_last_block=False,
                               on_block=on_block if progressive else None)
            launched = time.perf_counter() - t0
            if not progressive:
                on_block(latents)
            video = torch.cat(out, 1)
            sync()
            return video, time.perf_counter() - t0, start.elapsed_time(first) / 1e3, launched
        if DEV.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            for progressive in (False, True):
                runs = [end_to_end(progressive) for _ in range(4)][1:]
                t, ttff = statistics.median(r[1] for r in runs), statistics.median(r[2] for r in runs)
                err = float((runs[-1][0].to(DEV).float() / 255 - pixels).abs().max())
                add(dict(part="end to end", variant="fast paths, " + ("progressive" if progressive else "decode after"),
                         seconds=t, fps_end_to_end=(1 + 4 * (frames - 1)) / t, first_frame_s=ttff, max_abs_err=err,
                         peak_gb=torch.cuda.max_memory_allocated() / 1e9,
                         **({} if progressive else {"cpu_s": statistics.median(r[3] for r in runs)})))
    for peer in PEERS:
        add(dict(part="end to end", **peer))
    report["rows"] = rows
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "generate_profile.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    return rows


def bench_group(G=8, clip=12, history=18):
    wan = real_wan()
    m, n = wan.model, 3
    clip, history = (3, 3) if TINY else (clip, history)
    kv = m.text_kv(wan.text_encoder(["a drone flies over a rocky coastline"]))
    hist_noise, clip_noise = draw_noise(1, 1, wan.latent_shape(history), DEV), draw_noise(2, G, wan.latent_shape(clip), DEV)
    full = torch.cat([hist_noise.expand(G, -1, -1, -1, -1, -1), clip_noise], dim=3)
    with torch.no_grad():
        group, t_shared = timed(lambda: group_rollout(m, kv, hist_noise, clip_noise, 3, 21, n, micro_batch=G), 2)
        one = lambda i: generate(m, kv, full[i:i + 1], new_cache(m, 1, wan.latent_shape(history + clip), 3, 21, n))
        seq, t_seq = timed(lambda: torch.cat([one(i) for i in range(G)]), 1)
    rows = [dict(variant=f"shared prefix, {G} candidates batched", seconds=t_shared, speedup=1.0, rel_err=0.0),
            dict(variant=f"{G} independent rollouts, one by one", seconds=t_seq, speedup=t_seq / t_shared,
                 rel_err=rel_err(group.clips, seq[:, :, history:]))]
    try:
        with torch.no_grad():
            bat, t_bat = timed(lambda: generate(m, kv, full, new_cache(m, G, wan.latent_shape(history + clip), 3, 21, n)), 1)
        rows.append(dict(variant=f"{G} independent rollouts, batched", seconds=t_bat, speedup=t_bat / t_shared,
                         rel_err=rel_err(group.clips, bat[:, :, history:])))
    except torch.OutOfMemoryError:
        rows.append(dict(variant=f"{G} independent rollouts, batched", seconds=float("nan"), speedup=float("nan"),
                         rel_err=float("nan"), note="out of memory"))
    return rows


# Qwen2's pre-tokenizer (its tokenizer.json "Split" pattern): words with their leading space, single digits,
# punctuation runs, whitespace. The real tokenizer then runs byte-level BPE over a 151k vocabulary inside each piece.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_VOCAB = 151936  # embedding rows of Qwen2-VL-{2B,7B}-Instruct (config.json vocab_size)
# Text tokens of one reward input (chat template + reward template + a prompt of prompts/train.txt or eval.txt,
# special tokens counted once) under Qwen2's real BPE, measured offline with Qwen's published BPE ranks
# (qwen.tiktoken: the same 151,643 merges and pre-tokenizer as Qwen2), mean over those 36 prompts.
QWEN2_REAL_TOKENS = {"hpsv3": 538.1, "videoalign": 829.1}


def qwen2_sized_tokenizer():
    """A tokenizer that gives Qwen2's token counts without its vocabulary (none can be downloaded here): Qwen2's
    pre-tokenizer split, each piece cut into runs of at most 10 characters, one token per run (unknown words map
    to <unk>: only the count matters for a random-weight model). Within 2% of the real BPE count on both
    templates; the vocabulary is padded to Qwen2-VL's 151,936 rows so the embeddings have their real size."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<unk>"] + R.SPECIALS)}
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), QWEN2_VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                                 pre_tokenizers.Split(Regex(r"[\s\S]{1,10}"), "isolated")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": R.SPECIALS})  # never split (already in the vocabulary)
    return fast


def reward_text_tokens(tok):
    """Mean text tokens of an HPSv3 / VideoAlign input over prompts/train.txt: ours, Qwen2's and the ratio."""
    prompts = config.read_prompts("prompts/train.txt")
    rows = {}
    for name, template in (("hpsv3", R.HPSV3_TEXT), ("videoalign", R.VIDEOALIGN_TEXT)):
        n = statistics.mean(len(tok(R.CHAT.format(vision="", text=template.format(text_prompt=p))).input_ids)
                            for p in prompts)
        rows[name] = dict(template_chars=len(template), tokens=n, qwen2_tokens=QWEN2_REAL_TOKENS[name],
                          ratio=n / QWEN2_REAL_TOKENS[name], chars_per_token=len(template) / n)
    return rows


def real_rewards():
    """HPSv3 (Qwen2-VL-7B) and VideoAlign (Qwen2-VL-2B) at full size (--tiny: 2-layer Qwen2-VLs, same code
    path), random weights, with a tokenizer that gives Qwen2's token counts and embedding size."""
    from transformers import Qwen2VLConfig
    tok = qwen2_sized_tokenizer()
    counts = reward_text_tokens(tok)
    for name, c in counts.items():
        print(f"{name} text tokens per input: {c['tokens']:.1f} (Qwen2 BPE: {c['qwen2_tokens']}, ratio {c['ratio']:.3f}; "
              f"template {c['template_chars']} characters, {c['chars_per_token']:.2f} per token)", flush=True)
    if TINY:  # the test suite's tiny Qwen2-VL shapes, at a few vision tokens a frame
        cfgs = [Qwen2VLConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               rope_parameters=dict(rope_type="default", rope_theta=100.0,
                                                                    mrope_section=[2, 1, 1])),
                              vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2))] * 2
        dims, pixels = (32, 32), [(4 * 784, 4 * 784), (4 * 784, 4 * 784)]
    else:
        cfgs = [R.qwen2vl_config(3584, 18944, 28, 4, len(tok)), R.qwen2vl_config(1536, 8960, 12, 2, len(tok))]
        dims, pixels = (3584, 1536), [(200704, 200704), (128 * 28 * 28, 200704)]
    with torch.device(DEV):
        hps = R.HPSv3(cfgs[0], R.hpsv3_head(dims[0]), tok, pixels[0], dtype=DT)
        va = R.VideoAlign(cfgs[1], nn.Linear(dims[1], 3, bias=False, dtype=DT), tok, pixels[1],
                          {f"{a}_{s}": float(s == "std") for a in ("VQ", "MQ", "TA") for s in ("mean", "std")}, dtype=DT)
    for mdl in (hps, va):
        mdl.eval().requires_grad_(False)
    names = ["hpsv3", "videoalign_mq", "videoalign_ta"]
    fns = [hps.score, partial(va.score, axis="MQ", gray=True), partial(va.score, axis="TA", gray=False)]
    return R.CompositeReward(names, [1.0] * 3, [counted(n, f) for n, f in zip(names, fns)], [hps, va, va]), counts


PRESET = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--preset=")), "self_forcing")
ROWS = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--rows=")), None)  # "s:G,s:G": train's runs
COUNT_FLOPS = "--no-flops" not in sys.argv
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", 560))  # bench train stops starting runs that would end later
CEILING = 805e12  # bf16 dense matmul FLOP/s (README, Performance)


def paper_config(*extra):
    base = [f"--preset={PRESET}", "--model=none", "--checkpoint=none", "--base_lora=none",
            "--prompts=prompts/train.txt", "--eval_every=0", "--group_size=3", "--micro_batch=3"]
    if TINY:  # the preset's structure, shrunk: LoRA, EMA, checkpointing, composite Qwen2-VL rewards, 32x32 frames
        base += ["--height=32", "--width=32", "--lora_rank=4", "--lora_alpha=4", "--clip_frames=6",
                 "--window_frames=9", "--group_size=2", "--micro_batch=2"]
    cfg = config.parse_config(base + list(extra))
    config.check_config(cfg)
    return cfg


FLOPS = {}  # FLOPs of the running step by phase (train.Laps boundaries) and by reward, when counted


def counted(name, fn):
    """fn, with the FLOPs it runs added to FLOPS["reward/" + name] (under the bench's FlopCounterMode)."""
    def run(frames, prompts):
        before = COUNTER.get_total_flops() if COUNTER else 0
        out = fn(frames, prompts)
        if COUNTER:
            FLOPS[f"reward/{name}"] = FLOPS.get(f"reward/{name}", 0) + COUNTER.get_total_flops() - before
        return out
    return run


COUNTER = None  # the FlopCounterMode of the running step


def _gqa_sdpa_flops():
    """FlopCounterMode's SDPA formula asserts equal query and key heads; Qwen2-VL's language model uses grouped
    K/V heads (each K/V head serves several query heads), which costs what as many full heads would."""
    import torch.utils.flop_counter as fc
    plain = fc.sdpa_flop_count

    def grouped(query_shape, key_shape, value_shape):
        h = query_shape[1]
        return plain(query_shape, (key_shape[0], h, *key_shape[2:]), (value_shape[0], h, *value_shape[2:]))
    fc.sdpa_flop_count = grouped


_gqa_sdpa_flops()


def bench_train():
    """RL steps at the paper's settings (G = 24, micro-batch 3, LoRA 256, clip 12), parked umT5 and reward models:
    each phase's seconds, FLOPs (FlopCounterMode on the real code path, in the timed step itself), achieved
    TFLOP/s against the 805 TFLOP/s bf16 ceiling and peak memory; runs (history s, G) from --rows or the
    preset's default. The first run also warms up: its times are marked, its memory is as any other's."""
    global COUNTER
    from torch.utils.flop_counter import FlopCounterMode
    t_start = time.perf_counter()
    cfg = paper_config()
    wan, (rewards, counts) = real_wan(), real_rewards()
    # reference outputs while everything is resident, compared after train.build parks umT5 and the rewards
    probe = torch.rand(1, 8, 3, wan.height, wan.width, generator=torch.Generator().manual_seed(0)).to(DEV)
    text_ref, score_ref = wan.text_encoder([PROMPT]), rewards(probe, [PROMPT])
    ctx = train.build(cfg, wan, rewards)
    text_err = float((wan.text_encoder([PROMPT]) - text_ref).abs().max())
    score_err = max(abs(float(v - score_ref[k])) for k, v in rewards(probe, [PROMPT]).items())
    parked = sum(p.numel() * p.element_size() for mdl in dict.fromkeys([wan.text_encoder.encoder, *rewards.models[:2]])
                 if getattr(mdl, "parked_for", None) is not None for p in mdl.parameters())
    import resource  # peak resident host memory: pinned blocks are rounded up to powers of two by the host allocator
    print(f"built in {time.perf_counter() - t_start:.0f}s; parked in pinned CPU memory: {parked / 1e9:.1f} GB "
          f"(host peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB); "
          f"parked vs resident outputs: umT5 max |diff| {text_err:.3g}, rewards max |diff| {score_err:.3g}", flush=True)
    default = {"self_forcing": "21:3,21:24,0:24", "longlive": "228:3,228:24"}.get(PRESET, "9:3,9:24")
    runs = [tuple(map(int, r.split(":"))) for r in (ROWS or ("6:2,6:4,0:4" if TINY else default)).split(",")]

    def lap_hook(name):
        if COUNTER is None:  # --no-flops
            return
        total = COUNTER.get_total_flops()
        FLOPS[name] = FLOPS.get(name, 0) + total - FLOPS.get("_seen", 0)
        FLOPS["_seen"] = total
    ctx.lap_hook = lap_hook
    rows, last, last_g = [], None, None
    for step, (s, g) in enumerate(runs, 1):
        if last:  # estimate: the previous run's G-independent parts as they were, the rest scaled by G
            fixed = sum(last.get(f"time/{k}", 0) for k in ("text", "history", "transfer"))
            estimate = fixed + (last["step_time"] - fixed) * g / last_g
            if time.perf_counter() - t_start + estimate > BUDGET_S:
                print(f"skipped history {s}, G {g}: about {estimate:.0f}s more would pass the {BUDGET_S:.0f}s budget "
                      f"(BENCH_BUDGET_S); run it alone with --rows={s}:{g}", flush=True)
                continue
        cfg.clip_start, cfg.group_size = s, g
        FLOPS.clear()
        COUNTER = FlopCounterMode(display=False) if COUNT_FLOPS else None
        with COUNTER or contextlib.nullcontext():
            r = train.train_step(step, cfg, ctx)
        COUNTER = None
        last, last_g = r, g
        print(f"history {s}, G {g}: {r['step_time']:.1f}s, peak {r['peak_mem_gb']:.1f} GB, transfers "
              f"{r['transfer_gb']:.1f} GB in {r['time/transfer']:.2f}s", flush=True)
        rows += phase_rows(r, s, g, warmup=step == 1)
        os.makedirs(OUT_DIR, exist_ok=True)
        with open(os.path.join(OUT_DIR, f"train_{PRESET}_partial.json"), "w") as f:  # kept if a later run is cut off
            json.dump(dict(text_tokens=counts, rows=rows), f, indent=1)
    return rows


def phase_rows(r, s, g, warmup):
    """One table row per phase of a step result r (train_step's dict), then the step's total."""
    run = f"{PRESET} s={s} G={g}" + (" (warm-up)" if warmup else "")
    phases = [k[5:] for k in r if k.startswith("time/")]
    out = []
    for ph in phases:
        secs, flops = r[f"time/{ph}"], FLOPS.get(ph)
        out.append(dict(run=run, phase=ph, seconds=secs, share=secs / r["step_time"],
                        tflop=flops / 1e12 if flops is not None else "",
                        tflops=flops / secs / 1e12 if flops and secs else "",
                        ceiling=flops / secs / CEILING if flops and secs else "",
                        peak_gb=r.get(f"peak_gb/{ph}", ""), moved_gb=r["transfer_gb"] if ph == "transfer" else ""))
    total = sum(v for k, v in FLOPS.items() if not k.startswith(("reward/", "_")))
    out.append(dict(run=run, phase="step", seconds=r["step_time"], share=1.0,
                    tflop=total / 1e12 if COUNT_FLOPS else "", tflops=total / r["step_time"] / 1e12 if COUNT_FLOPS else "",
                    ceiling=total / r["step_time"] / CEILING if COUNT_FLOPS else "", peak_gb=r["peak_mem_gb"], moved_gb=""))
    return out


def bench_scale_worker(steps=3):
    """One process of `torchrun bench.py scale-worker`: real-size generator, offline rewards, G = 4 per rank."""
    cfg = paper_config("--group_size=4", "--micro_batch=4", "--clip_start=9", f"--reward={R.DEFAULT_OFFLINE_SPEC}")
    ctx = train.build(cfg, real_wan())
    times = [train.train_step(s, cfg, ctx)["step_time"] for s in range(1, steps + 1)][1:]
    if ctx.rank == 0:
        with open(os.path.join(OUT_DIR, "bench_scale_worker.json"), "w") as f:
            json.dump(dict(gpus=ctx.world, step_s=statistics.median(times),
                           candidates_per_s=ctx.world * cfg.prompts_per_rank * cfg.group_size / statistics.median(times)), f)


def bench_scaling(gpus=(1, 2, 4)):
    rows = []
    for k in gpus:
        if DEV.type == "cuda" and k > torch.cuda.device_count():
            continue
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={k}", "bench.py",
                        "scale-worker"] + (["--tiny"] if TINY else []), check=True)
        with open(os.path.join(OUT_DIR, "bench_scale_worker.json")) as f:
            rows.append(json.load(f))
    for r in rows:
        r["efficiency"] = r["candidates_per_s"] / (rows[0]["candidates_per_s"] * r["gpus"])
    return rows


def bench_fsdp(gb=1e9):
    """torchrun --nproc_per_node 2 bench.py fsdp: (a) 1.3B full fine-tuning, FSDP2 with the whole model as one unit vs
    one unit per block (clip 12, G 3); (b) 14B with LoRA (r 256, base whole on each GPU) and full fine-tuning, where the arithmetic lets it
    fit (one 3-frame clip, G 2, micro-batch 1); (c) memory per GPU from the sharding arithmetic. History 0, offline
    rewards (bench.py train has the reward models); 14B random weights all bf16 (real_wan keeps a few in fp32)."""
    import gc
    # (c) counts what policy.Policy builds: theta, grad, AdamW, theta_old, theta_ref
    world, rows = int(os.environ.get("WORLD_SIZE", 1)), []
    wan, offline = real_wan(), f"--reward={R.DEFAULT_OFFLINE_SPEC}"
    runs = [("1.3B", "full, whole-model unit", ["--lora_rank=0", "--fsdp_per_block=false"]),
            ("1.3B", "full, per-block units", ["--lora_rank=0"])]
    small = ["--clip_frames=3", "--group_size=2", "--micro_batch=1"]
    runs += [("14B", "LoRA, base whole", small), ("14B", "full, per-block units", small + ["--lora_rank=0"])]
    with torch.device("meta"):
        big = {k: M.WanTransformer3DModel(**c) for k, c in (("1.3B", WAN_1_3B), ("14B", M.WAN_14B))}
    count = {k: sum(p.numel() for p in m.parameters()) for k, m in big.items()}
    block = {k: sum(p.numel() for p in m.blocks[0].parameters()) for k, m in big.items()}
    lora = {k: sum(256 * sum(mod.weight.shape) for n, mod in m.named_modules() if n.startswith("blocks.")
                   and isinstance(mod, nn.Linear)) for k, m in big.items()}
    # full: fp32 theta, gradient, AdamW (8), fp32 theta_old, bf16 theta_ref = 22 bytes a parameter, sharded; plus the
    # gathered bf16 weights and gradients: two blocks (one computing, one prefetched), or the whole model as one unit
    full_gb = lambda k, w, unit: (22 * count[k] / w + (8 * block[k] if unit == "block" else 4 * count[k])) / gb  # noqa: E731
    total_gb = torch.cuda.get_device_properties(DEV).total_memory / gb if DEV.type == "cuda" else float("inf")
    for size, variant, extra in runs:
        if "full" in variant and not TINY and full_gb(size, world, "block") > 0.8 * total_gb:
            rows.append(dict(model=size, variant=variant, gpus=world, note=f"skipped: {full_gb(size, world, 'block'):.0f}"
                             f" GB of weights and optimizer per GPU by (c) > 80% of {total_gb:.0f} GB"))
            continue
        torch.manual_seed(0)
        torch.set_default_dtype(DT)  # made in bf16 at once: 14B in fp32 first would need 56 GB more
        with torch.device(DEV):
            tr = M.WanTransformer3DModel(**(M.TINY_TRANSFORMER if TINY else WAN_1_3B if size == "1.3B" else M.WAN_14B))
        torch.set_default_dtype(torch.float32)
        wan.model = M.CausalWan(tr).eval()
        cfg = paper_config("--clip_start=0", offline, *extra)
        t0 = time.perf_counter()
        ctx = train.build(cfg, wan)
        built = time.perf_counter() - t0
        times, peak = [], 0.0
        for step in range(1, 4 if size == "1.3B" else 3):  # the first step warms up
            if DEV.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times.append(train.train_step(step, cfg, ctx)["step_time"])
            peak = max(peak, train.all_sum(torch.cuda.max_memory_allocated() / gb if DEV.type == "cuda" else 0)[0])
        rows.append(dict(model=size, variant=variant, gpus=world, build_s=built, step_s=statistics.median(times[1:]),
                         peak_gb_per_gpu=peak / world, G=cfg.group_size, clip=cfg.clip_frames, lora_r=cfg.lora_rank))  # (mean of the ranks)
        del ctx, tr
        wan.model = None
        gc.collect()
        torch.cuda.empty_cache() if DEV.type == "cuda" else None
    for k in count:  # (c) weights, gradients and optimizer per GPU; activations, caches, umT5, VAE, rewards extra
        for w in (1, 2, 8):
            rows.append(dict(model=k, variant="arithmetic (c)", gpus=w, full_block_gb=full_gb(k, w, "block"),
                             full_model_unit_gb=full_gb(k, w, "model"), lora_gb=(2 * count[k] + 24 * lora[k]) / gb))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return rows if int(os.environ.get("RANK", 0)) == 0 else None


def show(rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(k), *(len(fmt(r.get(k, ""))) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(k, "")).ljust(w) for k, w in zip(keys, widths)))


if __name__ == "__main__":
    commands = {"generate": bench_generate, "group": bench_group, "train": bench_train, "scaling": bench_scaling,
                "scale-worker": bench_scale_worker, "fsdp": bench_fsdp}
    args = [a for a in sys.argv[1:] if a not in ("--tiny", "--no-flops") and not a.startswith(("--preset=", "--rows="))]
    if len(args) != 1 or args[0] not in commands:
        raise SystemExit(f"usage: python bench.py {{{','.join(commands)}}} [--tiny] "
                         f"[train: --preset=self_forcing|longlive --rows=s:G,... --no-flops]")
    result = commands[args[0]]()
    if result is not None:
        device = torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else "cpu"
        print(f"\n{args[0]} on {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
        show(result)
        os.makedirs(OUT_DIR, exist_ok=True)
        with open(os.path.join(OUT_DIR, f"bench_{args[0]}.json"), "w") as f:
            json.dump(dict(device=device, date=time.strftime("%Y-%m-%d"), rows=result), f, indent=1)
