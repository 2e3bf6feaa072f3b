"""Where a run's numbers go: log.jsonl (always; the source of truth that report.py and --resume read) and, with
--log=jsonl,tensorboard, TensorBoard event files under out_dir/tensorboard: every log.jsonl scalar under the same
name at the same step, a histogram of each step's rewards and advantages, and frames of the held-out samples.
--log=jsonl,wandb sends the same to Weights & Biases: a run of project "astrolabe" under out_dir/wandb, offline
unless WANDB_MODE says otherwise (`wandb sync` uploads it later). Rank 0 only. Phases measures what a step's
time/* and peak_gb/* fields say."""
import contextlib
import importlib.util
import json
import os
import secrets
import time

import torch

import offload

KINDS = ("jsonl", "tensorboard", "wandb")
OPTIONAL = ("tensorboard", "wandb")  # each kind is its own package, not in requirements.txt
WANDB_ID = "astrolabe-run-id"  # under out_dir/wandb: the W&B run id of the run in out_dir


def check_log(spec):
    """The --log spec, and that its packages are installed, before any weight is loaded."""
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or "jsonl" not in kinds:
        raise SystemExit(f"error: --log={spec!r}: a comma-separated list of {', '.join(KINDS)} that includes jsonl")
    for kind in OPTIONAL:
        if kind in kinds and importlib.util.find_spec(kind) is None:
            raise SystemExit(f"error: --log={kind} needs the {kind} package: pip install {kind}")
    return kinds


def wandb_id(out_dir):
    """The W&B run id of the run in out_dir: made by its first start, kept in out_dir/wandb, read again on --resume
    (the same W&B run continues). A run started anew with --overwrite finds none (the folder moved aside with the
    old run) and gets a new id, where a name derived from the path would continue the old run's."""
    path = os.path.join(out_dir, "wandb", WANDB_ID)
    if os.path.isfile(path):
        with open(path) as f:
            found = f.read().strip()
        if found.isalnum():
            return found
    os.makedirs(os.path.dirname(path), exist_ok=True)
    run_id = secrets.token_hex(8)
    with open(path, "w") as f:
        f.write(run_id + "\n")
    return run_id


class RunLog:
    """One run's log. start: the step a resumed run continues after; TensorBoard's readers drop the events a
    crashed run wrote past it (purge_step), as trim_log drops those rows of log.jsonl. config: the run's settings
    (W&B shows them beside the run)."""

    def __init__(self, out_dir, spec, start=0, config=None):
        self.jsonl = open(os.path.join(out_dir, "log.jsonl"), "a")
        self.tb = self.wandb = None
        kinds = check_log(spec)
        if "tensorboard" in kinds:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start + 1 if start else None)
        if "wandb" in kinds:
            import wandb
            self.wandb = wandb.init(project="astrolabe", dir=out_dir, mode=os.environ.get("WANDB_MODE", "offline"),
                                    resume="allow", id=wandb_id(out_dir), config=config)

    def row(self, row):
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb:
            for k, v in scalars.items():  # bools (ref_reset) as 0 / 1
                self.tb.add_scalar(k, float(v), row["step"])
            self.tb.flush()
        if self.wandb:
            self.wandb.log(scalars, step=row["step"])

    def histograms(self, step, values):
        """values: {name: tensor} of one step (this rank's samples)."""
        for k, v in values.items() if self.tb else ():
            self.tb.add_histogram(f"hist/{k}", v.detach().float().cpu(), step)
        if self.wandb and values:
            import wandb
            self.wandb.log({f"hist/{k}": wandb.Histogram(v.detach().double().cpu().numpy()) for k, v in values.items()},
                           step=step)

    def frames(self, tag, video, step, count=4):
        """A held-out sample as `count` evenly spaced frames (video [F, 3, H, W] in [0, 1]): images need no
        video encoder (TensorBoard's clips and W&B's videos need moviepy)."""
        if not (self.tb or self.wandb):
            return
        pick = [round(i * (video.shape[0] - 1) / max(count - 1, 1)) for i in range(min(count, video.shape[0]))]
        frames = video[pick].detach().float().clamp(0, 1).cpu()
        if self.tb:
            self.tb.add_images(tag, frames, step)
        if self.wandb:
            import wandb
            pixels = (frames * 255).round().byte().permute(0, 2, 3, 1).numpy()  # [count, H, W, 3]
            self.wandb.log({tag: [wandb.Image(p, caption=f"frame {t}") for p, t in zip(pixels, pick)]}, step=step)

    def close(self):
        self.jsonl.close()
        self.tb and self.tb.close()
        self.wandb and self.wandb.finish()


class Phases:
    """Wall time and peak memory of a step's phases: `with phases("decode"): ...`. On CUDA each boundary
    synchronises (a few per step, none per micro-batch) and resets the peak-memory counter. The host-to-device
    copies of parked models (offload.MOVED) are taken out of the phase they happen in and counted as "transfer"."""

    def __init__(self, device, hook=None):
        self.cuda, self.hook = device.type == "cuda", hook
        self.times, self.peak_gb = {"transfer": 0.0}, {}

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), offload.MOVED["seconds"]

    @contextlib.contextmanager
    def __call__(self, name):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0, moved0 = self._now()
        yield
        t, moved = self._now()
        self.hook and self.hook(name)
        self.times["transfer"] += moved - moved0
        self.times[name] = self.times.get(name, 0.0) + t - t0 - (moved - moved0)
        if self.cuda:
            self.peak_gb[name] = max(self.peak_gb.get(name, 0.0), torch.cuda.max_memory_allocated() / 1e9)
