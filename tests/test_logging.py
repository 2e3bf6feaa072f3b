"""--log=jsonl,tensorboard: TensorBoard's own reader gives back every log.jsonl scalar at every step, and a
resumed run's events hold each step once (the crashed run's steps past the checkpoint are dropped)."""
import json
import os
import sys

import numpy as np
import pytest

import train

summary_iterator = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader").EventFileLoader

RUN = ["--prompts_per_rank=1", "--group_size=2", "--micro_batch=2", "--clip_frames=3", "--max_history_frames=3",
       "--eval_every=2", "--eval_seeds=2", "--log=jsonl,tensorboard"]


def events(out):
    """Scalars and histogram steps as TensorBoard shows them (its accumulator applies the resume's purge)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    steps = {tag: [e.step for e in acc.Histograms(tag)] for tag in acc.Tags()["histograms"]}
    steps.update({tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]})
    return scalars, steps


def jsonl_as_events(out):
    """log.jsonl turned into what TensorBoard should hold: per name, (step, float32 value) in step order."""
    want = {}
    for row in map(json.loads, open(os.path.join(out, "log.jsonl"))):
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                want.setdefault(k, []).append((row["step"], float(np.float32(v))))
    return want


def test_tensorboard_holds_every_jsonl_scalar_and_a_resume_adds_no_duplicates(tmp_path):
    out = str(tmp_path / "run")
    # a run that logged step 3 but whose `latest` still names step 2, as after a crash before step 3's save
    train.main(RUN + ["--steps=3", "--save_every=2", "--keep_checkpoints=2", f"--out_dir={out}"])
    with open(os.path.join(out, "latest"), "w") as f:
        f.write("ckpt-000002")
    before, _ = events(out)
    assert [s for s, _ in before["reward/composite"]] == [1, 2, 3]
    train.main(RUN + ["--steps=4", "--save_every=2", "--keep_checkpoints=2", f"--out_dir={out}", "--resume=true"])
    scalars, hists = events(out)
    want = jsonl_as_events(out)
    assert {"eval/composite_delta", "eval/composite_delta_se", "reward/composite", "kl", "time/train"} <= set(want)
    assert scalars == want  # every name, every step once, the same value
    assert [s for s, _ in scalars["reward/composite"]] == [1, 2, 3, 4]
    raw = [e.step for f in sorted(os.listdir(os.path.join(out, "tensorboard")))  # the files: step 3 written twice
           for e in summary_iterator(os.path.join(out, "tensorboard", f)).Load()
           if any(v.tag == "reward/composite" for v in e.summary.value)]
    assert raw == [1, 2, 3, 3, 4]
    assert hists["hist/advantage"] == hists["hist/reward/composite"] == [1, 2, 3, 4]
    images = sorted(k for k in hists if k.startswith("eval/sample/"))  # prompt i's seed-0 sample at each evaluation
    assert len(images) == 4 and all(hists[k] == [0, 2, 4] for k in images)  # 4 held-out prompts, frames in one grid


def test_missing_tensorboard_is_one_line_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setattr(train, "build", lambda cfg: pytest.fail("built the run before checking --log"))
    with pytest.raises(SystemExit, match="--log=tensorboard needs the tensorboard package: pip install tensorboard"):
        train.main(RUN + [f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="--log='jsonl,wandb2'"):
        train.main(["--log=jsonl,wandb2", f"--out_dir={tmp_path}"])
