"""`python train.py report out/log.jsonl`: the JSONL log of a run drawn as reward curves with error bars (PNG)."""
import json
import os


def report(path):
    """JSONL log -> PNG: the composite (training mean over 10 steps; held-out mean +/- s.e.) and each held-out
    reward's paired change since step 0 (mean +/- s.e. of the per-sample differences)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: train.py report draws with matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not os.path.isfile(path):
        raise SystemExit(f"error: no log file {path}")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path} line {i} is not JSON ({e})") from None
    if not any("reward/composite" in r or "eval/composite" in r for r in rows if isinstance(r, dict) and "step" in r):
        raise SystemExit(f"error: {path} has no rows with a step and a composite reward: nothing to draw")
    series = lambda *keys: list(zip(*[[r["step"]] + [r[k] for k in keys] for r in rows if keys[0] in r])) or \
        [()] * (len(keys) + 1)  # noqa: E731
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps, comp = series("reward/composite")
    left.plot(steps, [sum(comp[max(0, i - 9):i + 1]) / len(comp[max(0, i - 9):i + 1]) for i in range(len(comp))],
              label="training (10-step mean)")
    left.errorbar(*series("eval/composite", "eval/composite_se"), marker="o", capsize=3, label="held-out prompts")
    for key in sorted({k[5:-6] for r in rows for k in r if k.startswith("eval/") and k.endswith("_delta")}):
        right.errorbar(*series(f"eval/{key}_delta", f"eval/{key}_delta_se"), marker="o", capsize=3, label=key)
    right.axhline(0, color="gray", lw=0.8)
    for ax, title in ((left, "composite reward"), (right, "held-out change since step 0 (paired)")):
        ax.set_title(title), ax.set_xlabel("step"), ax.legend(fontsize=7), ax.grid(alpha=0.3)
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    print(f"wrote {out}")
