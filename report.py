"""`python train.py report out/log.jsonl [--control out-rand/log.jsonl ...]`: the JSONL log of a run drawn as
reward curves with error bars (PNG), beside the control runs it is read against (e.g. the random reward)."""
import json
import os


def read_log(path):
    if not os.path.isfile(path):
        raise SystemExit(f"error: no log file {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path} line {i} is not JSON ({e})") from None
    if not any("reward/composite" in r or "eval/composite" in r for r in rows if isinstance(r, dict) and "step" in r):
        raise SystemExit(f"error: {path} has no rows with a step and a composite reward: nothing to draw")
    return rows


def parse_args(argv):
    """[LOG] [--control LOG ...] (also --control=LOG); every log is read before anything is drawn."""
    run, controls, args = None, [], list(argv)
    while args:
        a = args.pop(0)
        if a.startswith("--control="):
            controls.append(a.split("=", 1)[1])
        elif a == "--control":
            if not args:
                raise SystemExit("error: --control needs a log file")
            controls.append(args.pop(0))
        elif a.startswith("--") or run is not None:
            raise SystemExit(f"error: train.py report takes one log file and --control LOG, got {a!r}")
        else:
            run = a
    return run or "out/log.jsonl", controls


def report(argv):
    """Logs -> PNG beside the run's log: the composite (training mean over 10 steps; held-out mean +/- s.e.)
    and each held-out reward's paired change since step 0 (mean +/- s.e. of the per-sample differences); each
    control log drawn dashed in the same panels."""
    path, controls = parse_args(argv)
    logs = [(path, read_log(path))] + [(c, read_log(c)) for c in controls]
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: train.py report draws with matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for n, (name, rows) in enumerate(logs):
        series = lambda *keys: list(zip(*[[r["step"]] + [r[k] for k in keys] for r in rows if keys[0] in r])) or \
            [()] * (len(keys) + 1)  # noqa: E731
        tag, style = ("" if n == 0 else f"control {os.path.dirname(name) or name}: "), ("-" if n == 0 else "--")
        steps, comp = series("reward/composite")
        if steps:
            left.plot(steps, [sum(comp[max(0, i - 9):i + 1]) / len(comp[max(0, i - 9):i + 1]) for i in range(len(comp))],
                      style, label=tag + "training (10-step mean)")
        if any("eval/composite" in r for r in rows):
            left.errorbar(*series("eval/composite", "eval/composite_se"), marker="o", capsize=3, ls=style,
                          label=tag + "held-out prompts")
        for key in sorted({k[5:-6] for r in rows for k in r if k.startswith("eval/") and k.endswith("_delta")}):
            right.errorbar(*series(f"eval/{key}_delta", f"eval/{key}_delta_se"), marker="o", capsize=3, ls=style,
                           label=tag + key)
    right.axhline(0, color="gray", lw=0.8)
    for ax, title in ((left, "composite reward"), (right, "held-out change since step 0 (paired)")):
        ax.set_title(title), ax.set_xlabel("step"), ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # an empty legend is a matplotlib warning (no evaluation rows)
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no evaluation rows in the log", ha="center", va="center", transform=ax.transAxes)
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    print(f"wrote {out}")
