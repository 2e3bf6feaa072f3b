"""--log=jsonl,tensorboard: TensorBoard's own reader gives back every log.jsonl scalar at every step, and a
resumed run's events hold each step once (the crashed run's steps past the checkpoint are dropped).
--log=jsonl,wandb: W&B's own reader of its offline run files gives back every log.jsonl scalar at every step, the
histograms and the held-out frames, and a resumed run continues the same W&B run."""
import dataclasses
import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import config
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def test_missing_wandb_is_one_line_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr(train, "build", lambda cfg: pytest.fail("built the run before checking --log"))
    with pytest.raises(SystemExit, match="--log=wandb needs the wandb package: pip install wandb"):
        train.main(RUN[:-1] + ["--log=jsonl,wandb", f"--out_dir={tmp_path}"])


WANDB_RUNS = """import sys; sys.path.insert(0, {root!r}); import train
train.main({first!r})
train.main({second!r})
"""


def wandb_inspect(run, summary=False):
    """One offline W&B run read back by W&B's own reader of its .wandb file: its records (one JSON object a line), or
    with summary=True the run's config, state and latest values as one object."""
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *["--summary"] * summary, run],
                          capture_output=True, text=True, timeout=120)
    if done.returncode:
        pytest.skip(f"this wandb cannot read its run back with `wandb leet inspect --json`: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout) if summary else [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (optional: pip install "
                                                                      "wandb); --log=wandb is tested where it is")
def test_wandb_offline_run_holds_every_jsonl_scalar_and_a_resume_continues_it(tmp_path):
    out = tmp_path / "run"
    args = [a for a in RUN if not a.startswith("--log=")] + ["--log=jsonl,wandb", "--save_every=2", f"--out_dir={out}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # WANDB_MODE unset: offline by default
    env.update(OMP_NUM_THREADS="1", WANDB_ERROR_REPORTING="false", WANDB_SILENT="true",
               **{f"WANDB_{k}_DIR": str(tmp_path / k.lower()) for k in ("CONFIG", "CACHE", "DATA")})  # not ~/
    code = WANDB_RUNS.format(root=ROOT, first=args + ["--steps=2"], second=args + ["--steps=4", "--resume=true"])
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = (out / "wandb" / "astrolabe-run-id").read_text().strip()
    runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))  # one folder per start, both of the same W&B run
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs), runs
    history = [{r["history"]["item"]["_step"]: r["history"]["item"] for r in wandb_inspect(run)
                if r.get("type") == "history"} for run in runs]
    assert sorted(history[0]) == [0, 1, 2] and sorted(history[1]) == [3, 4]  # each step once: the resume continued
    logged = {**history[0], **history[1]}
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for row in rows:
        item = logged[row["step"]]
        for k, v in row.items():  # every scalar, the same value (JSON both ways: exact)
            if k != "step":
                assert item[k] == v, (row["step"], k)
        if row["step"] > 0:  # the step's 2 candidates (1 prompt x G = 2) in each histogram
            for k in ("advantage", "reward/composite", "reward/colorfulness"):
                assert item[f"hist/{k}._type"] == "histogram" and sum(item[f"hist/{k}.values"]) == 2
        if row["step"] % 2 == 0:  # an evaluation: four frames of each held-out prompt's first-seed sample, as PNGs
            for i in range(4):
                assert item[f"eval/sample/prompt{i}.count"] == 4 and item[f"eval/sample/prompt{i}.width"] == 32
                for name in item[f"eval/sample/prompt{i}.filenames"]:
                    assert os.path.getsize(os.path.join(runs[row["step"] > 2], "files", name)) > 0
    summary = wandb_inspect(runs[1], summary=True)
    assert (summary["project"], summary["run_id"], summary["state"]) == ("astrolabe", run_id, "finished")
    want = json.loads(json.dumps(dataclasses.asdict(config.parse_config(args + ["--steps=4", "--resume=true"]))))
    assert summary["config"] == want
