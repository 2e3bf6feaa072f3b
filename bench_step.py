"""bench.py train: one RL step at the paper's scale (G = 24, clip 12, LoRA 256, the real reward models), its time,
FLOPs and peak memory per phase (train.Laps), one table row per run and phase."""
import contextlib
import json
import os
import sys
import time

import torch

import train
from bench_models import DEV, OUT_DIR, PRESET, PROMPT, TINY, paper_config, real_rewards, real_wan


ROWS = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--rows=")), None)  # "s:G,s:G": train's runs
COUNT_FLOPS = "--no-flops" not in sys.argv
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", 560))  # bench train stops starting runs that would end later
CEILING = 805e12  # bf16 dense matmul FLOP/s (README, Performance)


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
    wan, (rewards, counts) = real_wan(), real_rewards(counted)
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
