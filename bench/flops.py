"""bench train's FLOP counting: each phase's FLOPs counted on the real code path with torch's formulas (FlopCount),
marked at logs.Phases' boundaries, and the rule that scales a run counted at G = g0 to another G (checked by
`python -m bench train --check-scaling`); with --profile, each phase's GPU time by kernel family beside them."""
import contextlib

import torch.utils.flop_counter as fc
from torch.utils._python_dispatch import TorchDispatchMode

import vae
from bench.common import kernel_table

CEILING = 805e12  # bf16 dense matmul FLOP/s (bench/README.md)


def _gqa_sdpa_flop_count(query_shape, key_shape, value_shape):
    """FlopCounterMode's SDPA formula asserts equal query and key heads; Qwen2-VL's language model uses grouped
    K/V heads (each K/V head serves several query heads), which costs what as many full heads would."""
    h = query_shape[1]
    return _SDPA_FLOP_COUNT(query_shape, (key_shape[0], h, *key_shape[2:]), (value_shape[0], h, *value_shape[2:]))


_SDPA_FLOP_COUNT = fc.sdpa_flop_count


class FlopCount(TorchDispatchMode):
    """FlopCounterMode's formulas (torch.utils.flop_counter.flop_registry: matmuls, convolutions, attention, forward
    and backward) without its module tracker, whose hooks keep the activations gradient checkpointing frees (the
    step ran out of memory under FlopCounterMode). Ops outside the registry count nothing (norms, elementwise).
    While counting, torch's SDPA formula counts grouped K/V heads (_gqa_sdpa_flop_count); restored after."""

    def __init__(self):
        super().__init__()
        self.total, self.by_kind = 0, {}

    def __enter__(self):
        fc.sdpa_flop_count = _gqa_sdpa_flop_count
        return super().__enter__()

    def __exit__(self, *exc):
        fc.sdpa_flop_count = _SDPA_FLOP_COUNT
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        formula = fc.flop_registry.get(func._overloadpacket)
        if formula is not None:
            n, family = formula(*args, **(kwargs or {}), out_val=out), kind(func)
            self.total += n
            self.by_kind[family] = self.by_kind.get(family, 0) + n
        return out


def kind(func):
    """The kernel family an op's FLOPs run in, named as bench.common.KERNELS names a profile's categories."""
    name = func._overloadpacket.__name__
    if "attention" in name:
        return "attention backward" if "backward" in name else "attention"
    return "conv" if "conv" in name else "matmul"


COUNTER, FLOPS, CALLS = None, {}, {}  # the running step's counter, FLOPs by phase and part, reference forwards


def _add(name, since):
    """FLOPS[name] and FLOPS["kind/<name>/<kernel family>"] += what the counter ran after `since` (its (total, by_kind)
    then, kept under FLOPS["_..."] so that clearing FLOPS clears it too)."""
    total, kinds = since
    FLOPS[name] = FLOPS.get(name, 0) + COUNTER.total - total
    for k, n in COUNTER.by_kind.items():
        FLOPS[f"kind/{name}/{k}"] = FLOPS.get(f"kind/{name}/{k}", 0) + n - kinds.get(k, 0)


def _mark(name, begin):
    """FLOPS[name] (and by kernel family) += the FLOPs between a begin mark and the next end mark (under the counter)."""
    if COUNTER is None:
        return
    if begin:
        FLOPS["_" + name] = (COUNTER.total, dict(COUNTER.by_kind))
    elif "_" + name in FLOPS:
        _add(name, FLOPS.pop("_" + name))


def counted(name, fn):
    """fn, with the FLOPs it runs added to FLOPS["reward/" + name]."""
    def run(*a, **k):
        _mark(f"reward/{name}", True)
        out = fn(*a, **k)
        _mark(f"reward/{name}", False)
        return out
    return run


def instrument(ctx):
    """Phase FLOPs at logs.Phases' boundaries; the decoder warm-up on the history (fixed in G) and theta_ref's forwards
    (only in micro-batches holding a masked sample) apart, so that FLOPs scale with G phase by phase."""
    def lap_hook(name):  # FLOPS[phase] and by kernel family: what ran since the last phase ended
        if COUNTER is not None:
            _add(name, FLOPS.get("_phase", (0, {})))
            FLOPS["_phase"] = (COUNTER.total, dict(COUNTER.by_kind))
    ctx.lap_hook = lap_hook
    warm = vae.history_decoder
    vae.history_decoder = lambda *a, **k: (_mark("decode/warm-up", True), warm(*a, **k), _mark("decode/warm-up", False))[1]
    net = ctx.policy.net

    def policy_net(name):  # train_step asks for "ref", runs its forward, then asks for "default"
        if name == "ref":
            CALLS["ref"] = CALLS.get("ref", 0) + 1
        if name in ("ref", "default"):
            _mark("train/ref", name == "ref")
        return net(name)
    ctx.policy.net = policy_net


SCALING = ("FLOPs: counted (FlopCount) on the fast step's eager twin at the first run's G = g0 and s; a run at G: text, "
           "history, optimizer x 1; clips, reward x G/g0; decode: the history warm-up x 1, the rest x G/g0; train: all "
           "but theta_ref's forwards x G/g0, plus each reference forward the run made at the counted cost of one "
           "(runs at another s: no FLOPs)")


def scaled(counted_at, s, g, calls):
    """FLOPs by phase of a run at (s, g) from the counted run (SCALING says how)."""
    if counted_at is None or counted_at[0] != s:
        return {}
    _, g0, f, c = counted_at
    x = g / g0
    out = {k: f.get(k, 0) for k in ("text", "history", "optimizer")}
    out.update({k: v * x for k, v in f.items() if k.startswith("reward")})
    out["clips"] = f.get("clips", 0) * x
    warm = f.get("decode/warm-up", 0)
    out["decode"] = warm + (f.get("decode", 0) - warm) * x
    ref = f.get("train/ref", 0)
    per_ref = ref / c["ref"] if c.get("ref") else 0.0  # (none counted: the run's reference forwards count nothing)
    out["train"] = (f.get("train", 0) - ref) * x + per_ref * calls.get("ref", 0)
    return out


def check_scaling(counted_at, s, g, flops):
    """Rows: each phase's FLOPs counted at (s, g) against scaled from counted_at (theta_ref's forwards left out of
    both: how many run depends on the mask, the scaling counts them one by one)."""
    want, out = scaled(counted_at, s, g, {}), []
    for ph in ("text", "history", "clips", "decode", "reward", "train", "optimizer"):
        got = flops.get(ph, 0) - (flops.get("train/ref", 0) if ph == "train" else 0)
        out.append(dict(run=f"s={s} G={g}", phase=ph, counted_tflop=got / 1e12, scaled_tflop=want.get(ph, 0) / 1e12,
                        rel_diff=abs(got - want.get(ph, 0)) / max(got, 1)))
    return out


@contextlib.contextmanager
def phase_profiles(ctx):
    """{phase: kernel_table} of the step run inside: a CUDA profiler stopped and started again at each phase's end
    (logs.Phases' hook, after its synchronisation), so each table holds one phase's kernels."""
    from torch.profiler import ProfilerActivity, profile
    hook, out, prof = ctx.lap_hook, {}, [None]

    def start():
        prof[0] = profile(activities=[ProfilerActivity.CUDA])
        prof[0].start()

    def lap(name):
        hook and hook(name)
        if name in out:  # a phase entered twice in a step (prompts_per_rank > 1): its wall time would cover both
            raise SystemExit(f"--profile: phase {name!r} ran twice in the step; profile with prompts_per_rank=1")
        prof[0].stop()
        out[name] = kernel_table(prof[0], top=20)
        start()
    ctx.lap_hook = lap
    start()
    try:
        yield out
    finally:
        prof[0].stop()
        ctx.lap_hook = hook


def profile_rows(r, profiles, counted_at, refs):
    """Rows per phase and kernel family: GPU seconds, share of the phase's wall time, counted TFLOP, TFLOP/s, ceiling.
    The training phase's FLOPs count the profiled step's `refs` theta_ref forwards, not the counted step's (the mask
    follows rewards that the compiled path rounds differently)."""
    flops, rows = dict(counted_at[2]) if counted_at else {}, []
    counted_refs = counted_at[3].get("ref", 0) if counted_at else 0
    if counted_at and refs and not counted_refs:  # no counted forward to scale from: say so, not a silent low rate
        print(f"--profile: the profiled step ran {refs} theta_ref forward(s), the counted step none: the train rows' "
              f"FLOPs leave them out, so their TFLOP/s read low")
    for k in [k for k in flops if k.startswith("kind/train/ref/")] + ["train/ref"]:
        target = "train" if k == "train/ref" else k.replace("/ref/", "/")
        flops[target] = flops.get(target, 0) - flops.get(k, 0) * (1 - refs / counted_refs if counted_refs else 1)
    for ph, (_, busy_ms, by_cat) in profiles.items():
        wall = r.get(f"time/{ph}", 0)
        for cat, share in [("all kernels", 1.0)] + sorted(by_cat.items(), key=lambda kv: -kv[1]):
            secs = busy_ms * share / 1e3
            fl = flops.get(ph, 0) if cat == "all kernels" else flops.get(f"kind/{ph}/{cat}", 0)
            rows.append(dict(phase=ph, kernels=cat, gpu_s=secs, of_wall=secs / wall if wall else "",
                             tflop=fl / 1e12 if fl else "", tflops=fl / secs / 1e12 if fl and secs else "",
                             ceiling=fl / secs / CEILING if fl and secs else ""))
    return rows
