"""What the benchmarks share: the command line (one --key=value dialect, as train.py's), the device, where the
tables go, and the timing and printing helpers."""
import dataclasses
import os
import re
import statistics
import time

import torch

from config import BOOLS, PRESETS, STEP_LEVERS, flag_help

DEV = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
DT = torch.bfloat16 if DEV.type == "cuda" else torch.float32
OUT_DIR = os.environ.get("BENCH_OUT", "out/bench")  # generated: JSON tables and profiles (ignored by git)
PROMPT = "a red fox runs through fresh snow at sunrise"  # the prompt timed runs encode


@dataclasses.dataclass
class Args:
    """python -m bench COMMAND [--key=value ...]; a bare --key is --key=true."""
    tiny: bool = False          # the tiny model instead of the real sizes (a CPU smoke test)
    preset: str = "self_forcing"  # train, scaling: the config preset the step runs
    part: str = "all"           # generate: all, breakdown (in-process rows), e2e (without profiles and evaluate's
    #                             rows), user (sample.py itself)
    rows: str = None            # train: the runs, "s:G,s:G" (default: the preset's)
    levers: str = ",".join(k for k in STEP_LEVERS if PRESETS["self_forcing"].get(k))  # train: the fast step's levers
    #                             (default: the presets')
    flops: bool = True          # train: count the FLOPs per phase
    compare: bool = True        # train: the first run's eager reference step and the halves' errors (off: only the
    #                             fast steps, so that longlive's G = 24 row, cold then warm, fits a 10-minute call)
    profile: bool = False       # train: then the first run's fast step warm under the profiler, phase by phase
    check_scaling: bool = False  # train: count each later run's eager twin too, against the scaled FLOPs
    each_lever: bool = False    # train: then the first run's step with every lever off, each lever alone and, with
    #                             3 or more levers, all and all but each (warm, from the same state): the lever table
    compile: bool = None        # train: the compiled paths (default: on CUDA)


def parse(argv, commands=""):
    """(command, Args) from the command line; every error names the flag; --help prints `commands` and the flags."""
    if {"--help", "-h"} & set(argv):
        print(commands + "\nflags (a bare --key is --key=true):\n" + "\n".join(flag_help(Args)))
        raise SystemExit(0)
    words = [a for a in argv if not a.startswith("--")]
    types = {f.name: f.type for f in dataclasses.fields(Args)}
    args = Args()
    for a in argv:
        if not a.startswith("--"):
            continue
        key, _, value = a[2:].partition("=")
        key = key.replace("-", "_")
        if key not in types:
            raise SystemExit(f"error: unknown flag --{key}; flags: {', '.join(types)}")
        if types[key] is bool:
            if value.lower() not in BOOLS and value:
                raise SystemExit(f"error: --{key}={value!r} is not a boolean (true/false, 1/0)")
            setattr(args, key, BOOLS.get(value.lower(), True))
        else:
            setattr(args, key, value)
    return (words[0] if len(words) == 1 else None), args


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


def show(rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(k), *(len(fmt(r.get(k, ""))) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(k, "")).ljust(w) for k, w in zip(keys, widths)))


KERNELS = [  # a kernel's category from its name, first match; inductor's fused kernels carry their ops' names
    ("norm/elementwise", r"^triton_(poi|red|per)"),  # (a fused "..._scaled_dot_product_..." is not attention)
    ("attention backward", r"(fmha|flash|sdpa|attention).*(bwd|bprop|backward)|cutlassB"),
    ("attention", r"fmha|flash|sdpa|attention"), ("conv", r"fprop|dgrad|wgrad|conv|implicit"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|mma"), ("copy/layout", r"copy|cat|pad|transpose|permute|memcpy|memset|fill"),
    ("norm/elementwise", r".")]


def kernel_table(prof, top=12):
    """Per-kernel GPU time of a profile: (rows, GPU-busy ms, {category: share}) with each kernel's category."""
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0 and e.device_type.name == "CUDA"
              and not e.key.startswith("## ")]  # "## Call CompiledFxGraph ...": annotations, not kernels
    total = sum(e.self_device_time_total for e in events)
    out = []
    for e in sorted(events, key=lambda e: -e.self_device_time_total):
        cat = next(c for c, pat in KERNELS if re.search(pat, e.key, re.I))
        name = re.sub(r"void |at::native::|\(anonymous namespace\)::|at::cuda::", "", e.key)  # what tells copies apart
        out.append(dict(kernel=name[:110], category=cat, calls=e.count, ms=e.self_device_time_total / 1e3,
                        share=e.self_device_time_total / total))
    by_cat = {}
    for r in out:
        by_cat[r["category"]] = by_cat.get(r["category"], 0) + r["share"]
    return out[:top], total / 1e3, by_cat
