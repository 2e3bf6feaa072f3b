"""bench generate and bench group: 81 frames from text, the generator's and the decoder's fast paths against the eager
reference, end to end with progressive decoding, evaluate's path, then sample.py itself (bench/user.py); a group's
shared prefix against independent rollouts."""
import contextlib
import json
import os
import statistics
import time

import torch

import model
import vae
from bench.common import DEV, OUT_DIR, PROMPT, kernel_table, rel_err, show, sync, timed
from bench.models import WAN_1_3B, real_wan
from bench.user import user_rows
from fast import compile_blocks, speed_up
from files import VideoFile
from rollout import draw_noise, generate, group_rollout, new_cache

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


def profile(fn, shapes=False):
    """Per-kernel GPU time of fn(); with shapes, also the convolutions' GPU time per input shape."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    sync()
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=shapes) as prof:
        fn()
        sync()
    wall = (time.perf_counter() - t0) * 1e3
    rows, busy, by_cat = kernel_table(prof)
    print(f"  GPU busy {busy:.0f} ms of {wall:.0f} ms wall (profiler on); by category: "
          + ", ".join(f"{k} {v:.0%}" for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])), flush=True)
    show(rows)
    out = dict(busy_ms=busy, wall_ms=wall, by_category=by_cat, kernels=rows)
    if shapes:
        convs = [dict(input_shapes=str(e.input_shapes[:2])[:90], calls=e.count, ms=e.device_time_total / 1e3)
                 for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::convolution"]
        out["convolutions"] = sorted(convs, key=lambda r: -r["ms"])[:12]
        show(out["convolutions"])
    return out


def bench_generate(args, frames=21):
    """81 frames from text, end to end: the generator's and the decoder's fast paths against the eager
    reference (errors printed), per-kernel profiles, then progressive decoding: FPS and time to first frame."""
    from torch.utils.flop_counter import FlopCounterMode
    user = user_rows(args.tiny) if args.part in ("all", "user") else []  # first: sample.py's processes need the GPU
    if args.part == "user":  # memory that this process's models would hold
        return user
    wan = real_wan(args.tiny)
    m, ae, n = wan.model, wan.vae, 3
    shape = wan.latent_shape(6 if args.tiny else frames)
    frames, tpf = shape[1], (shape[2] // 2) * (shape[3] // 2)
    noise = draw_noise(0, 1, shape, DEV)
    gflops = transformer_flops(WAN_1_3B if not args.tiny else model.TINY_TRANSFORMER, frames, tpf)
    rows, report = [], {}
    kv = m.text_kv(wan.text_encoder([PROMPT]))
    cache = new_cache(m, 1, shape, 3, 21, n)  # one cache for every run, as sample.py keeps one

    def gen(text_kv=kv, on_block=None, noise=noise, cache=cache):
        cache.reset()
        return generate(m, text_kv, noise, cache, 0, n, cache_last_block=False, on_block=on_block)

    def add(row):
        rows.append(row)
        print({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    # 1. generator: eager (cuDNN attention) as the reference; compiled block stages
    from torch._dynamo.utils import counters
    ref = None
    with torch.no_grad():
        for name, compiled in [("eager, cuDNN attention (reference)", False),
                               ("compiled block stages (sample.py's fast path)", True)]:
            t0 = time.perf_counter()
            if compiled and m.stages is model.BLOCK_STAGES:
                compile_blocks(m)
            latents = gen()  # compiles; timed() warms up once more
            sync()
            setup_s = time.perf_counter() - t0
            latents, t = timed(gen, 3)
            ref = latents if ref is None else ref
            add(dict(part="generator", variant=name, seconds=t, tflops=gflops / t / 1e12, ceiling=gflops / t / 805e12,
                     rel_err=rel_err(latents, ref), setup_s=setup_s, compiled_graphs=counters["stats"]["unique_graphs"]))
        if args.part != "e2e":
            print("profile: one generation, compiled stages", flush=True)
            report["profile_generator"] = profile(gen)

        # 2. decoder: diffusers' one-shot decode (reference), streaming, the layout and padding levers, compiled
        torch.backends.cudnn.benchmark = False  # off for the references: one of the levers below (as the entry scripts)
        with FlopCounterMode(display=False) as fc:
            vae.decode(ae, ref[:, :, :4])
        dflops = fc.get_total_flops() / (1 + 4 * 3) * (1 + 4 * (frames - 1))  # per pixel frame, scaled up
        cfg = ae.config
        std, mean = (torch.tensor(x, device=DEV).view(1, -1, 1, 1, 1) for x in (cfg.latents_std, cfg.latents_mean))
        one_shot = lambda: ((ae.decode((ref * std + mean).to(ae.dtype)).sample.float().clamp(-1, 1) + 1) / 2)  # noqa
        pixels, t = timed(one_shot, 2)
        pixels = pixels.permute(0, 2, 1, 3, 4)
        add(dict(part="decode", variant="diffusers AutoencoderKLWan.decode (reference)", seconds=t,
                 tflops=dflops / t / 1e12, ceiling=dflops / t / 805e12, max_abs_err=0.0))
        for name, fast in [("streaming (vae.Decoder), chunks of 3", None),
                           ("+ channels_last weights, cudnn.benchmark, padding inside the convs", False),
                           ("+ compiled decoder (default on GPU)", True)]:
            if fast is not None:
                t0 = time.perf_counter()
                torch.backends.cudnn.benchmark = True
                speed_up(ae, compile=fast)
                vae.Decoder(ae)(ref)
                sync()
                setup_s = time.perf_counter() - t0
            out, t = timed(lambda: vae.Decoder(ae)(ref), 2)
            add(dict(part="decode", variant=name, seconds=t, tflops=dflops / t / 1e12, ceiling=dflops / t / 805e12,
                     max_abs_err=float((out - pixels).abs().max()), **({"setup_s": setup_s} if fast else {})))
        _, t = timed(lambda: vae.Decoder(ae)(ref[:, :, :3]), 2)  # the first two chunks: their own layouts
        add(dict(part="decode", variant="  of which the first 3 latent frames (chunks of 1 and 2)", seconds=t))
        if args.part != "e2e":
            print("profile: one compiled streaming decode", flush=True)
            report["profile_decode"] = profile(lambda: vae.Decoder(ae)(ref), shapes=True)

        # 3. end to end, text encoding included: decode after generation, or progressive (as sample.py). Decoding
        # on a second CUDA stream, overlapped with the next block, was measured too (H100, 2026-11-22: 3.92 s
        # against 3.94 s): the generator keeps the GPU busy, so it does not pay and is not kept.
        def end_to_end(progressive, mp4=None, **video):
            """(pixels or None, seconds, first frame, text, generation, after it); mp4: the frames written there
            as sample.py writes them (files.VideoFile, timed until ffmpeg has them all, as sample.py times)."""
            ev = {k: torch.cuda.Event(enable_timing=True) for k in ("start", "text", "generated", "first", "end")}
            t0 = time.perf_counter()
            ev["start"].record()
            text_kv = m.text_kv(wan.text_encoder([PROMPT]))
            ev["text"].record()
            dec, out, seen = vae.Decoder(ae), [], []
            with VideoFile(mp4) if mp4 else contextlib.nullcontext() as file:
                def on_block(x0):  # as sample.py: the first latent frame alone, so the first frame is out at once
                    for part in (x0[:, :, :1], x0[:, :, 1:]) if dec.frames == 0 and progressive else (x0,):
                        y = dec(part)
                        file.write(y[0]) if file else out.append((y * 255).round().to(torch.uint8).cpu())
                        seen or seen.append(ev["first"].record())  # the first frames
                latents = gen(text_kv, on_block if progressive else None, **video)
                ev["generated"].record()
                if not progressive:
                    on_block(latents)
                file and file.flush()
                ev["end"].record()
                sync()
                seconds = time.perf_counter() - t0
            ms = lambda a, b: ev[a].elapsed_time(ev[b]) / 1e3  # noqa: E731
            return torch.cat(out, 1) if out else None, seconds, ms("start", "first"), ms("start", "text"), \
                ms("text", "generated"), ms("generated", "end")
        if DEV.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            for progressive in (False, True):
                runs = [end_to_end(progressive) for _ in range(4)][1:]
                med = [statistics.median(r[i] for r in runs) for i in range(1, 6)]
                err = float((runs[-1][0].to(DEV).float() / 255 - pixels).abs().max())
                add(dict(part="end to end", variant=("progressive" if progressive else "decode after") + ", fast path",
                         seconds=med[0], fps_end_to_end=(1 + 4 * (frames - 1)) / med[0], first_frame_s=med[1],
                         text_s=med[2], generate_s=med[3], after_s=med[4], max_abs_err=err,
                         peak_gb=torch.cuda.max_memory_allocated() / 1e9))
            runs = [end_to_end(True, mp4=os.path.join(OUT_DIR, "e2e.mp4")) for _ in range(4)][1:]
            med = [statistics.median(r[i] for r in runs) for i in range(1, 3)]
            add(dict(part="end to end", variant="progressive, fast path, written to an mp4 as sample.py writes it",
                     seconds=med[0], fps_end_to_end=(1 + 4 * (frames - 1)) / med[0], first_frame_s=med[1]))
            # a long video as `sample.py --frames 120 --sink_frames 3 --window_frames 21` makes it: from block 8 on every block
            # attends to the full sink + window (24 cached frames), where the 81-frame video's blocks average 12
            long_noise, long_cache = draw_noise(1, 1, wan.latent_shape(120), DEV), new_cache(m, 1, wan.latent_shape(120), 3, 21, n)
            end_to_end(True, noise=long_noise[:, :, :, :30], cache=long_cache)  # warm-up: every cache slot
            _, s, first, *_ = end_to_end(True, noise=long_noise, cache=long_cache)
            add(dict(part="end to end", variant="progressive, fast path, 477 frames (--sink_frames 3 --window_frames 21)",
                     seconds=s, fps_end_to_end=477 / s, first_frame_s=first))
            rows += eval_rows(wan, frames) if args.part != "e2e" else []
    for peer in PEERS:
        add(dict(part="end to end", **peer))
    report["rows"] = rows = user + rows
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "generate_profile.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    return rows


def eval_rows(wan, frames, seeds=4):
    """evaluate.py and train.py's evaluation (evaluation.score_samples, 4 seeds of one prompt in one batch) through
    fast.compiled against the eager path: the plain generator, then with three peft LoRA adapters as training has
    them (theta active, random nonzero weights). Agreement: max abs difference of the pixels in [0, 1]."""
    from policy import add_adapters

    import fast
    from evaluation import score_samples
    from rewards import build_reward
    m, reward = wan.model, build_reward("colorfulness:1", DEV)  # an offline reward: generation and decode are timed
    amp, rows = lambda: torch.autocast(DEV.type, torch.bfloat16, enabled=DEV.type == "cuda"), []

    def run(compiled):
        videos = []
        with fast.compiled(m, wan.vae) if compiled else contextlib.nullcontext():
            score_samples(m, wan, reward, [PROMPT], list(range(seeds)), frames, 3, 21, 3, batch=seeds, amp=amp,
                          on_frames=lambda i, s, v: videos.append(v))
        return videos[0]
    for adapters in (False, True):
        if adapters:  # as policy.Policy: r = alpha = 256 on every Linear of the blocks, three fp32 adapters, theta active
            add_adapters(m.transformer, 256, 256, ("default", "old", "ref"))
            for k, p in m.transformer.named_parameters():
                if "lora_B" in k:
                    p.data.normal_(0, 1e-3)
            m.transformer.set_adapter("default")
        ref, t_ref = timed(lambda: run(False), 1)
        t0 = time.perf_counter()
        run(True)  # compiles this batch's shapes
        sync()
        setup = time.perf_counter() - t0
        out, t = timed(lambda: run(True), 1)
        what = "evaluation.score_samples" + (", 3 LoRA adapters (train.py's evaluation)" if adapters else "")
        px = seeds * (1 + 4 * (frames - 1))
        rows += [dict(part="evaluate", variant=f"{what}: eager (reference)", seconds=t_ref, fps_end_to_end=px / t_ref),
                 dict(part="evaluate", variant=f"{what}: compiled stages + decoder (fast.compiled)", seconds=t,
                      fps_end_to_end=px / t, setup_s=setup, max_abs_err=float((out - ref).abs().max()))]
        print(rows[-2], rows[-1], flush=True)
    return rows


def bench_group(args, G=8, clip=12, history=18):
    wan = real_wan(args.tiny)
    m, n = wan.model, 3
    clip, history = (3, 3) if args.tiny else (clip, history)
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
