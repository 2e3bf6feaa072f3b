"""bench train: one RL step at the paper's scale (G = 24, clip 12, LoRA 256, the real reward models): the eager step
against the fast one (fast_train.py), FLOPs counted per phase, time, achieved TFLOP/s and peak memory per phase.

For the first run (s, g) of --rows, at the same seed and inputs (weights, optimizer, controller and RNG restored in
between; LoRA adapters random and nonzero, theta_old != theta):
  1. eager    every lever off: the reference step (warm-up); --compare=0 runs neither this nor 3
  2. fast     the levers of --levers, compiled: its first step compiles (warm-up); --levers= times the eager step
  3. halves   each half of the step apart, fast against eager (compare_halves): the rollout half's clips and rewards,
              then the update half's loss and gradients on the same rollouts and rewards; errors printed
  4. counted  the fast step's math without compiling (the compiled code does the same FLOPs; dynamo does not run
              compiled code under a dispatch mode), under FlopCount: FLOPs per phase
     profile  with --profile: the fast step warm under the profiler, restarted at each phase boundary: each phase's
              GPU time by kernel family against the FLOPs 4 counted in it (TFLOP/s and fraction of the ceiling)
     levers   with --each-lever: the step warm with every lever off, each lever alone, all, all but each (lever_table)
  5. fast     the first run again, warm, last: the timed row at g
Each later run: the fast step, timed, its FLOPs scaled from 4 (phase by phase, the rule printed).
"""
import contextlib
import copy
import json
import os
import time

import torch

import fast_train
import offload
import train
import bench.flops as counting
from bench.common import DEV, OUT_DIR, PROMPT, show
from bench.models import paper_config, real_rewards, real_wan
from config import STEP_LEVERS
from logs import Phases
from policy import Policy

BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", 560))  # bench train stops starting runs that would end later


def randomize_adapters(ctx, seed=0, std=1e-3):
    """Nonzero LoRA B (zero at initialisation: the adapters would be the base), different for theta, theta_old and
    theta_ref: about 1% of a base weight's spread (std 1e-3 x sqrt(r) x A's), above bf16's resolution."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in Policy.NAMES:
            for k, p in ctx.policy.named(name):
                if "lora_B" in k:
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def prime_optimizer(ctx):
    """AdamW's moments exist from a run's first optimizer step on (2.8 GB at LoRA 256, fp32): made now by a step on
    zero gradients (it moves theta by weight decay alone), so that every timed step holds them, as train.py's steps
    after the first do."""
    for p in ctx.policy.params("default"):
        p.grad = torch.zeros_like(p)
    ctx.opt.step()
    ctx.opt.zero_grad(set_to_none=True)


def snapshot(ctx):
    """The state a step changes, on the host (a GPU copy of AdamW's moments would count in every step's peak)."""
    opt = ctx.opt.state_dict()
    opt = dict(copy.deepcopy({**opt, "state": {}}),  # the moments copied once, to the host
               state={i: {k: v.cpu().clone() for k, v in st.items()} for i, st in opt["state"].items()})
    return dict(params={n: [p.detach().cpu().clone() for p in ctx.policy.params(n)] for n in Policy.NAMES},
                opt=opt, ctrl=copy.deepcopy(ctx.ctrl.state_dict()),
                rng=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if DEV.type == "cuda" else None)


def restore(ctx, s):
    with torch.no_grad():
        for n in Policy.NAMES:
            for p, q in zip(ctx.policy.params(n), s["params"][n]):
                p.copy_(q)
    ctx.opt.load_state_dict(copy.deepcopy(s["opt"]))
    ctx.ctrl.load_state_dict(copy.deepcopy(s["ctrl"]))
    torch.set_rng_state(s["rng"])
    s["cuda"] is not None and torch.cuda.set_rng_state_all(s["cuda"])
    ctx.policy.merge_old()


def peak_phase(r):
    """The phase of a step result r whose peak memory is the step's."""
    return max((k for k in r if k.startswith("peak_gb/")), key=r.get, default="peak_gb/-")[len("peak_gb/"):]


def levers(cfg, on):
    for k in STEP_LEVERS:
        setattr(cfg, k, k in on)
    return cfg


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def compare_halves(ctx, cfg, state, s, g, fast, compiled, variant):
    """The fast levers against every lever off, each half of the step apart, from the same state: the rollout half
    (train.rollout_and_score: the clips' latents and the composite rewards), then the update half
    (train.policy_loss_backward: the policy loss and theta's LoRA gradients) on the eager half's rollouts and
    rewards for both. Whole steps are not compared: the fast rollouts round differently, so they sample other clips,
    and at a small G the advantages (divided by the group's reward spread, Eq. 4) and the uncertainty mask turn
    that rounding into other gradients (gradient errors above 1 at G = 3, H100, 2026-12-06), whatever the levers."""
    cfg.clip_start, cfg.group_size = s, g
    _, prompts = train.clip_start_and_prompts(1, cfg, ctx)
    out, same = {}, None
    for name, on in (("eager", ()), ("fast", fast)):
        restore(ctx, state)
        fast_train.configure(ctx, levers(cfg, on), compile=compiled and bool(on))
        rollouts, rewards, _ = train.rollout_and_score(1, s, prompts, cfg, ctx, Phases(ctx.device))
        same = same or (rollouts, rewards)
        ctx.opt.zero_grad(set_to_none=True)
        _, masked, policy_loss, _ = train.policy_loss_backward(1, *same, cfg, ctx)
        out[name] = dict(clips=torch.cat([r.group.clips.float().flatten().cpu() for r in rollouts]),
                         rewards=rewards["composite"].cpu(), loss=float(policy_loss), masked=masked,
                         grads=torch.cat([p.grad.float().flatten().cpu() for p in ctx.policy.params("default")]))
        del rollouts, rewards
    ctx.opt.zero_grad(set_to_none=True)
    e, f = out["eager"], out["fast"]
    row = dict(run=f"s={s} G={g}", variant=variant, clips_rel_err=rel(f["clips"], e["clips"]),
               rewards_rel_err=rel(f["rewards"], e["rewards"]), loss_rel_err=abs(f["loss"] - e["loss"]) / abs(e["loss"]),
               grad_rel_err=rel(f["grads"], e["grads"]), masked=e["masked"])
    print(row, flush=True)
    return row


def bench_train(args):
    """The runs of --rows (default: the preset's), see the module's docstring."""
    t_start, fast = time.perf_counter(), [k for k in args.levers.split(",") if k]  # --levers= : none (eager, timed)
    compiled = DEV.type == "cuda" if args.compile is None else args.compile  # the compiled paths (fast_train.configure)
    unknown = set(fast) - set(STEP_LEVERS)
    if unknown:
        raise SystemExit(f"--levers: choose from {STEP_LEVERS}, got {fast}")
    if args.profile and DEV.type != "cuda":
        raise SystemExit("--profile times GPU kernels: it needs a CUDA device")
    cfg = levers(paper_config(args.preset, args.tiny), ())
    wan, (reward_fn, counts) = real_wan(args.tiny), real_rewards(args.tiny, counting.counted)
    # reference outputs while everything is resident, compared after train.build parks umT5 and the rewards
    probe = torch.rand(1, 8, 3, wan.height, wan.width, generator=torch.Generator().manual_seed(0)).to(DEV)
    text_ref, score_ref = wan.text_encoder([PROMPT]), reward_fn(probe, [PROMPT])
    ctx = train.build(cfg, wan, reward_fn)
    text_err = float((wan.text_encoder([PROMPT]) - text_ref).abs().max())
    score_err = max(abs(float(v - score_ref[k])) for k, v in reward_fn(probe, [PROMPT]).items())
    import resource  # peak resident host memory: pinned blocks are rounded up to powers of two by the host allocator
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"built in {time.perf_counter() - t_start:.0f}s (host peak RSS {rss:.1f} GB); parked vs resident outputs: "
          f"umT5 max |diff| {text_err:.3g}, rewards max |diff| {score_err:.3g}; "
          f"fast levers: {','.join(fast)}", flush=True)
    default = {"self_forcing": "21:3,21:24", "longlive": "228:3,228:24"}.get(args.preset, "9:3,9:24")
    runs = [tuple(map(int, r.split(":"))) for r in (args.rows or ("6:2,6:4" if args.tiny else default)).split(",")]
    offload.host_buffer("frames", (max(g for _, g in runs), 4 * cfg.clip_frames, 3, wan.height, wan.width),
                        torch.float32, DEV)  # pinned before the timed steps, as train.build does for its G
    counting.instrument(ctx)
    randomize_adapters(ctx)
    prime_optimizer(ctx)
    rows, errors, peak, counted_at, last, checks = [], [], {}, None, None, []

    def step(i, s, g, on, compile, count=False, label=""):
        cfg.clip_start, cfg.group_size = s, g
        fast_train.configure(ctx, levers(cfg, on), compile=compile)
        counting.FLOPS.clear(), counting.CALLS.clear()
        counting.COUNTER = counting.FlopCount() if count else None
        t0 = time.perf_counter()
        with counting.COUNTER or contextlib.nullcontext():
            r = train.train_step(i, cfg, ctx)
        counting.COUNTER = None
        print(f"{label}, history {s}, G {g}: {r['step_time']:.1f}s ({time.perf_counter() - t0:.1f}s with the bench's "
              f"hooks), peak {r['peak_mem_gb']:.1f} GB ({peak_phase(r)}), loss {r['policy_loss']:.6g}, grad norm {r['grad_norm']:.6g}, "
              f"reference forwards {counting.CALLS.get('ref', 0)}; {time.perf_counter() - t_start:.0f}s since start",
              flush=True)  # the elapsed time says where a run cut off by a time limit stood
        return r, dict(counting.FLOPS), dict(counting.CALLS)

    def timed(i, s, g, label):  # a fast step's rows, printed and saved as soon as measured
        nonlocal rows, last
        r, _, calls = step(i, s, g, fast, compiled, label=label)
        new = phase_rows(args.preset, r, s, g, "fast" if fast else "eager (--levers=)", counting.scaled(counted_at, s, g, calls))
        show(new)
        rows, last, peak[g] = rows + new, (r, g), r["peak_mem_gb"]
        os.makedirs(OUT_DIR, exist_ok=True)
        with open(os.path.join(OUT_DIR, f"train_{args.preset}_partial.json"), "w") as f:  # kept if a later run is cut off
            json.dump(dict(text_tokens=counts, rows=rows, errors=errors), f, indent=1)

    # the first run's (s, g): the comparisons and the count, at the same seed and inputs (restored between the steps)
    (s0, g0), state = runs[0], snapshot(ctx)
    if args.compare:
        ref, _, _ = step(1, s0, g0, (), False, label="eager reference (first step: warm-up)")
        rows += phase_rows(args.preset, ref, s0, g0, "eager, every lever off (warm-up)")
        restore(ctx, state)
    step(1, s0, g0, fast, compiled, label="fast (compiles: warm-up)")
    if args.compare:
        errors.append(compare_halves(ctx, cfg, state, s0, g0, fast, compiled, "fast"))
        print(f"halves compared; {time.perf_counter() - t_start:.0f}s since start", flush=True)
    if args.flops:
        restore(ctx, state)
        _, flops, calls = step(1, s0, g0, fast, False, count=True, label="fast, eager twin, counted")
        counted_at = (s0, g0, flops, calls)
    if args.profile:
        restore(ctx, state)
        with counting.phase_profiles(ctx) as profiles:
            r, _, refs = step(1, s0, g0, fast, compiled, label="fast, warm, profiled")
        table = counting.profile_rows(r, profiles, counted_at, refs.get("ref", 0))
        print("\nwhere each phase's time goes (the profiled step; FLOPs: the counted step's, by kernel family):")
        show(table)
        print("the largest kernels that do no counted FLOPs, by phase (all: the profile's JSON):")
        show([dict(phase=ph, **k) for ph, (top, _, _) in profiles.items()
              for k in [k for k in top if k["category"] in ("copy/layout", "norm/elementwise")][:6]])
        os.makedirs(OUT_DIR, exist_ok=True)
        with open(os.path.join(OUT_DIR, f"train_{args.preset}_profile.json"), "w") as f:
            json.dump(dict(rows=table, kernels={k: v[0] for k, v in profiles.items()}), f, indent=1)
    if args.each_lever:
        rows += lever_table(args.preset, step, ctx, state, s0, g0, fast, compiled)
    restore(ctx, state)
    del state
    # the later runs first (the first of them always runs), the first run's warm fast step last, each if time allows
    for k, (s, g) in enumerate(runs[1:] + runs[:1], 2):
        if last is not None:
            fixed = sum(last[0].get(f"time/{x}", 0) for x in ("text", "history", "transfer"))  # the same at any G
            estimate = fixed + (last[0]["step_time"] - fixed) * g / last[1]
            if time.perf_counter() - t_start + estimate > BUDGET_S:
                print(f"skipped history {s}, G {g}: about {estimate:.0f}s more would pass the {BUDGET_S:.0f}s budget "
                      f"(BENCH_BUDGET_S); run it alone with --rows={s}:{g}", flush=True)
                continue
        timed(k if k <= len(runs) else 1, s, g, "fast" if k <= len(runs) else "fast, warm (the first run again)")
        if args.check_scaling and counted_at and k <= len(runs):
            _, flops, _ = step(k, s, g, fast, False, count=True, label="fast, eager twin, counted (scaling check)")
            checks += counting.check_scaling(counted_at, s, g, flops)
    if errors:  # none with --compare=0
        print("\neach half of the fast step against the eager one (same seed, inputs and weights; relative errors): "
              "the rollout half's clips and rewards, the update half's loss and theta's gradients on the eager half's "
              "rollouts and rewards (compare_halves says why not whole steps):")
        show(errors)
    if len(peak) > 1 and min(peak.values()) > 0:
        print(f"peak memory of the fast step by G: {peak} GB (max / min {max(peak.values()) / min(peak.values()):.3f})")
    print(counting.SCALING)
    if checks:
        print("the scaling checked: FLOPs counted at G against those scaled from the first run's count")
        show(checks)
    return rows


def lever_table(preset, step, ctx, state, s, g, fast, compiled):
    """The step at (s, g) from `state` with every lever off, with each lever of `fast` alone, with all of them and
    with all but each, after the fast step compiled them all (compiled objects are kept: a lever switched on again
    compiles nothing). A set the fast step's graphs do not cover (compile_train without checkpoint_attention recomputes
    whole blocks: other graphs) compiles in its row; the row then runs again from the same state, and the warm run is
    timed (the compilations column: graphs its first run compiled). Each row's gain per phase against every lever
    off; a lever pays where its gain alone or what the step loses without it (all but it against all) does: levers
    interact (the merged copy's rollouts and selective checkpointing both shorten the training phase). ref_forwards:
    theta_ref's forwards in the training phase, one per micro-batch holding a masked sample; the mask follows rewards
    that each lever's rounding moves, so a row with fewer saves a forward that is not the lever's."""
    from torch._dynamo.utils import counters
    sets = [("every lever off", ())] + [(k, (k,)) for k in fast]
    if len(fast) > 2:  # with two, "all but one" is the other alone
        sets += [("all levers", fast)] + [(f"all but {k}", [x for x in fast if x != k]) for k in fast]
    results, rows = {}, []
    for name, on in sets:
        graphs = counters["stats"]["unique_graphs"]
        for attempt in ("first", "warm"):  # a row that compiled runs again
            restore(ctx, state)
            r, _, calls = step(1, s, g, on, compiled, label=f"lever table: {name}")
            if counters["stats"]["unique_graphs"] == graphs:
                break
        results[name] = (r, calls.get("ref", 0), counters["stats"]["unique_graphs"] - graphs)
        rows += phase_rows(preset, r, s, g, f"lever table: {name}")
    base = results["every lever off"][0]
    table = [dict(levers=k, step_s=r["step_time"], gain_s=base["step_time"] - r["step_time"],
                  **{f"{ph}_gain_s": base.get(f"time/{ph}", 0) - r.get(f"time/{ph}", 0)
                     for ph in ("history", "clips", "decode", "train")},
                  peak_gb=r["peak_mem_gb"], ref_forwards=refs, compilations=n) for k, (r, refs, n) in results.items()]
    print(f"\nthe lever table at s = {s}, G = {g}: seconds saved against every lever off (a lever's share in the "
          f"set: all levers' gain minus all but it)")
    show(table)
    return rows


def phase_rows(preset, r, s, g, variant, flops=None):
    """One table row per phase of a step result r (train_step's dict), then the step's total."""
    flops, out = flops or {}, []
    for ph in [k[5:] for k in r if k.startswith("time/")] + ["step"]:
        secs = r["step_time"] if ph == "step" else r[f"time/{ph}"]
        fl = sum(v for k, v in flops.items() if "/" not in k) if ph == "step" and flops else flops.get(ph)
        out.append(dict(run=f"{preset} s={s} G={g}", variant=variant, phase=ph, seconds=secs,
                        share=secs / r["step_time"], tflop=fl / 1e12 if fl else "", tflops=fl / secs / 1e12 if fl else "",
                        ceiling=fl / secs / counting.CEILING if fl else "",
                        peak_gb=r["peak_mem_gb"] if ph == "step" else r.get(f"peak_gb/{ph}", ""),
                        moved_gb=r["transfer_gb"] if ph == "transfer" else ""))
    return out
