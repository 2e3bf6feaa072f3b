"""GPU benchmarks at the real Wan2.1-T2V-1.3B size, random weights (timing needs no trained weights), bf16.

    python bench.py generate        # 81 frames (21 latent) at 480x832 from text, end to end; FPS, TFLOP/s
    python bench.py group           # G=8 clips of 12 frames after 18 history frames vs 8 independent rollouts
    python bench.py train           # one RL step at the paper's settings, reward models resident; memory vs history
    python bench.py scaling         # torchrun on 1, 2, 4 GPUs: candidates per second
    python bench.py generate --tiny # any of them on the tiny model (a CPU smoke test)

Each prints a table and writes bench_<command>.json. Timings: CUDA synchronised, one warm-up run, median of
the timed runs. A faster variant is kept only if its output matches the reference path (tolerance printed).
"""
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend

import config
import model as M
import rewards as R
import train
from rollout import draw_noise, generate, group_rollout, new_cache

WAN_1_3B = dict(M.TINY_TRANSFORMER, num_attention_heads=12, attention_head_dim=128, text_dim=4096, freq_dim=256,
                ffn_dim=8960, num_layers=30)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False)
TINY = "--tiny" in sys.argv
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


def bench_generate(frames=21):
    wan = real_wan()
    shape, n = wan.latent_shape(3 if TINY else frames), 3
    frames = shape[1]
    noise = draw_noise(0, 1, shape, DEV)

    def run(backends):
        with torch.no_grad():
            t0 = time.perf_counter()
            kv = wan.model.text_kv(wan.text_encoder(["a red fox runs through fresh snow at sunrise"]))
            sync()
            t1 = time.perf_counter()
            M.SAMPLING_ATTENTION, default = backends, M.SAMPLING_ATTENTION  # read by CausalWan at each call
            try:
                latents = generate(wan.model, kv, noise, new_cache(wan.model, 1, shape, 3, 21, n), 0, n)
            finally:
                M.SAMPLING_ATTENTION = default
            sync()
            t2 = time.perf_counter()
            video = M.decode(wan.vae, latents)
            sync()
            return latents, video, (t1 - t0, t2 - t1, time.perf_counter() - t2)

    variants = {"cuDNN SDPA (model.py default)": M.SAMPLING_ATTENTION, "flash SDPA": M.SAMPLING_ATTENTION[1:]} \
        if DEV.type == "cuda" else {"math SDPA": [SDPBackend.MATH]}
    flops = transformer_flops(WAN_1_3B if not TINY else M.TINY_TRANSFORMER, frames, (shape[2] // 2) * (shape[3] // 2))
    rows, ref = [], None
    for name, backends in variants.items():
        try:
            runs = [run(backends) for _ in range(4)][1:]  # first run warms up
        except RuntimeError as err:  # a backend this GPU or build lacks: report it, go on
            rows.append(dict(variant=name, error=str(err)[:120]))
            continue
        text, gen, dec = (statistics.median(r[2][i] for r in runs) for i in range(3))
        latents, video = runs[-1][0], runs[-1][1]
        ref = ref if ref is not None else latents
        pix = video.shape[1]
        rows.append(dict(variant=name, pixel_frames=pix, text_s=text, generate_s=gen, decode_s=dec,
                         fps_end_to_end=pix / (text + gen + dec), fps_generator=pix / gen,
                         transformer_tflops=flops / gen / 1e12, rel_err_vs_default=rel_err(latents, ref)))
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


def real_rewards():
    """HPSv3 (Qwen2-VL-7B) and VideoAlign (Qwen2-VL-2B) at full size, random weights, a byte-level tokenizer
    (so the vocabulary, hence the embedding, is smaller than the real 151k rows: about 1.6 GB less)."""
    if TINY:
        return R.build_reward(R.DEFAULT_OFFLINE_SPEC)
    from transformers import ByT5Tokenizer
    tok = ByT5Tokenizer()
    tok.add_tokens(R.SPECIALS, special_tokens=True)
    with torch.device(DEV):
        hps = R.HPSv3(R.qwen2vl_config(3584, 18944, 28, 4, len(tok)), R.hpsv3_head(3584), tok, (200704, 200704), dtype=DT)
        va = R.VideoAlign(R.qwen2vl_config(1536, 8960, 12, 2, len(tok)), nn.Linear(1536, 3, bias=False, dtype=DT), tok,
                          (128 * 28 * 28, 200704), {f"{a}_{s}": float(s == "std") for a in ("VQ", "MQ", "TA")
                                                    for s in ("mean", "std")})
    for mdl in (hps, va):
        mdl.eval().requires_grad_(False)
    return R.CompositeReward(["hpsv3", "videoalign_mq", "videoalign_ta"], [1.0, 1.0, 1.0],
                             [hps.score, partial(va.score, axis="MQ", gray=True), partial(va.score, axis="TA", gray=False)])


def paper_config(*extra):
    base = ["--preset=self_forcing", "--model=none", "--checkpoint=none", "--prompts=prompts/train.txt",
            "--eval_every=0", "--group_size=3", "--micro_batch=3"]
    if TINY:
        base = ["--eval_every=0", "--group_size=2", "--micro_batch=2", "--clip_frames=3"]
    cfg = config.parse_config(base + list(extra))
    config.check_config(cfg)
    return cfg


def bench_train(histories=(21, 60, 120, 240)):
    t0 = time.perf_counter()
    cfg = paper_config()
    ctx = train.build(cfg, real_wan(), real_rewards())
    print(f"built generator, umT5, HPSv3, VideoAlign in {time.perf_counter() - t0:.0f}s", flush=True)
    rows, G = [], cfg.group_size
    runs = [(3, G)] + [(s, G) for s in (histories if not TINY else (3, 6))] + [(histories[0], 2 * G)]
    for step, (s, g) in enumerate(runs, 1):  # the first step warms up; the last doubles G: memory must not grow
        cfg.clip_start, cfg.group_size = s, g
        if DEV.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r = train.train_step(step, cfg, ctx)
        peak = torch.cuda.max_memory_allocated() / 1e9 if DEV.type == "cuda" else 0.0
        print(f"history {s}, G {g}: {r['step_time']:.1f}s, peak {peak:.1f} GB", flush=True)
        if step > 1:
            rows.append(dict(history_frames=s, G=g, peak_gb=peak, step_s=r["step_time"],
                             **{k: v for k, v in r.items() if k.startswith("time/")}))
    return rows


def bench_scale_worker(steps=3):
    """One process of `torchrun bench.py scale-worker`: real-size generator, offline rewards, G = 4 per rank."""
    cfg = paper_config("--group_size=4", "--micro_batch=4", "--clip_start=9", f"--reward={R.DEFAULT_OFFLINE_SPEC}")
    ctx = train.build(cfg, real_wan())
    times = [train.train_step(s, cfg, ctx)["step_time"] for s in range(1, steps + 1)][1:]
    if ctx.rank == 0:
        with open("bench_scale_worker.json", "w") as f:
            json.dump(dict(gpus=ctx.world, step_s=statistics.median(times),
                           candidates_per_s=ctx.world * cfg.prompts_per_rank * cfg.group_size / statistics.median(times)), f)


def bench_scaling(gpus=(1, 2, 4)):
    rows = []
    for k in gpus:
        if DEV.type == "cuda" and k > torch.cuda.device_count():
            continue
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={k}", "bench.py",
                        "scale-worker"] + (["--tiny"] if TINY else []), check=True)
        with open("bench_scale_worker.json") as f:
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
    from peft import LoraConfig  # (c) counts what policy.Policy builds: theta, grad, AdamW, theta_old, theta_ref
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
    args = [a for a in sys.argv[1:] if a != "--tiny"]
    if len(args) != 1 or args[0] not in commands:
        raise SystemExit(f"usage: python bench.py {{{','.join(commands)}}} [--tiny]")
    result = commands[args[0]]()
    if result is not None:
        device = torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else "cpu"
        print(f"\n{args[0]} on {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
        show(result)
        with open(f"bench_{args[0]}.json", "w") as f:
            json.dump(dict(device=device, date=time.strftime("%Y-%m-%d"), rows=result), f, indent=1)
