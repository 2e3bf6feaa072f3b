"""Where a run's numbers go: log.jsonl (always; the source of truth that report.py and --resume read) and, with
--log=jsonl,tensorboard, TensorBoard event files under out_dir/tensorboard: every log.jsonl scalar under the same
name at the same step, a histogram of each step's rewards and advantages, and frames of the held-out samples.
Rank 0 only."""
import importlib.util
import json
import os

KINDS = ("jsonl", "tensorboard")


def check_log(spec):
    """The --log spec, and that its packages are installed, before any weight is loaded."""
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or "jsonl" not in kinds:
        raise SystemExit(f"error: --log={spec!r}: a comma-separated list of {', '.join(KINDS)} that includes jsonl")
    if "tensorboard" in kinds and importlib.util.find_spec("tensorboard") is None:
        raise SystemExit("error: --log=tensorboard needs the tensorboard package: pip install tensorboard")
    return kinds


class RunLog:
    """One run's log. start: the step a resumed run continues after; TensorBoard's readers drop the events a
    crashed run wrote past it (purge_step), as trim_log drops those rows of log.jsonl."""

    def __init__(self, out_dir, spec, start=0):
        self.jsonl = open(os.path.join(out_dir, "log.jsonl"), "a")
        self.tb = None
        if "tensorboard" in check_log(spec):
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start + 1 if start else None)

    def row(self, row):
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):  # bools (ref_reset) as 0 / 1
                    self.tb.add_scalar(k, float(v), row["step"])
            self.tb.flush()

    def histograms(self, step, values):
        """values: {name: tensor} of one step (this rank's samples)."""
        for k, v in values.items() if self.tb else ():
            self.tb.add_histogram(f"hist/{k}", v.detach().float().cpu(), step)

    def frames(self, tag, video, step, count=4):
        """A held-out sample as `count` evenly spaced frames (video [F, 3, H, W] in [0, 1]): images need no
        video encoder (TensorBoard's clips need moviepy)."""
        if self.tb:
            pick = [round(i * (video.shape[0] - 1) / max(count - 1, 1)) for i in range(min(count, video.shape[0]))]
            self.tb.add_images(tag, video[pick].detach().float().clamp(0, 1).cpu(), step)

    def close(self):
        self.jsonl.close()
        self.tb and self.tb.close()
