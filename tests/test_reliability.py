"""An output folder owned by one run, degenerate inputs refused, finite statistics, errors before compute,
seeds that matter: each bad input is checked to stop before any model is built or anything is written."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import checkpoints as C
import config
import run_dir
import train

FAST = ["--prompts_per_rank=1", "--group_size=2", "--micro_batch=2", "--clip_frames=3", "--max_history_frames=3",
        "--eval_every=0", "--save_every=100"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if a generator is built or a step runs: the error under test had to come first."""
    def built(*a, **k):
        pytest.fail("a model was built before the error")
    monkeypatch.setattr(C, "load", built)
    monkeypatch.setattr(C, "load_tiny", built)
    monkeypatch.setattr(train, "train_step", built)


def one_line_error(fn, match):
    with pytest.raises(SystemExit, match=match) as err:
        fn()
    assert "\n" not in str(err.value)
    return str(err.value)


# ------------------------------------------------------------------ an output folder belongs to one run
def test_fresh_run_into_an_earlier_run_stops_and_overwrite_moves_it_aside(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train.main(FAST + ["--steps=1", f"--out_dir={out}"])
    before = sorted(os.listdir(out))
    assert "run.lock" not in before  # released at the end
    log = (out / "log.jsonl").read_text()
    with monkeypatch.context() as m:
        m.setattr(C, "load", lambda *a, **k: pytest.fail("a model was built before the refusal"))
        msg = one_line_error(lambda: train.main(FAST + ["--steps=2", f"--out_dir={out}"]), "holds an earlier run")
    assert "--resume=true" in msg and "--overwrite=true" in msg and str(out) in msg
    assert sorted(os.listdir(out)) == before and (out / "log.jsonl").read_text() == log  # untouched
    train.main(FAST + ["--steps=2", f"--out_dir={out}", "--overwrite=true"])
    aside = [p for p in os.listdir(tmp_path) if p.startswith("run.old-")]
    assert len(aside) == 1 and f"moved the earlier run in {out} to" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / aside[0])) == before  # the old run whole, beside the new one
    assert (tmp_path / aside[0] / "log.jsonl").read_text() == log
    assert [json.loads(r)["step"] for r in open(out / "log.jsonl")] == [1, 2]
    one_line_error(lambda: train.main(FAST + ["--steps=3", f"--out_dir={out}", "--overwrite=true", "--resume=true"]),
                   "exclude each other")


def test_resume_into_an_empty_folder_and_unwritable_folders_fail_first(tmp_path, no_compute):
    one_line_error(lambda: train.main(FAST + [f"--out_dir={tmp_path / 'none'}", "--resume=true"]), "holds no run")
    assert not (tmp_path / "none").exists()
    (tmp_path / "file").write_text("")
    one_line_error(lambda: train.main(FAST + [f"--out_dir={tmp_path / 'file' / 'sub'}"]), "cannot be written")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # (root writes anywhere: then only the case above applies)
            one_line_error(lambda: train.main(FAST + [f"--out_dir={ro}"]), f"out_dir='{ro}' cannot be written")
            one_line_error(lambda: train.main(FAST + [f"--out_dir={ro / 'sub'}"]), "cannot be written")
    finally:
        ro.chmod(0o700)


HOLD = """import sys, time; sys.path.insert(0, {root!r}); import run_dir
run_dir.claim({out!r}); print("held", flush=True); time.sleep(60)"""


def test_two_runs_on_one_folder_cannot_both_proceed_and_a_dead_holder_is_taken_over(tmp_path, capsys, no_compute):
    out = str(tmp_path / "run")
    other = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT, out=out)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        msg = one_line_error(lambda: train.main(FAST + [f"--out_dir={out}"]), "is in use by another run")
        assert f"process {other.pid}" in msg
    finally:
        other.kill()  # SIGKILL: no clean-up runs, the lock file stays with a dead pid in it
        other.wait()
    assert open(os.path.join(out, "run.lock")).read().strip() == str(other.pid)
    capsys.readouterr()
    run_dir.claim(out)
    assert f"took over the stale lock of process {other.pid}" in capsys.readouterr().out
    assert open(os.path.join(out, "run.lock")).read().strip() == str(os.getpid())
    run_dir.release(out)
    assert os.listdir(out) == []


def test_a_second_claim_in_the_same_process_is_refused_by_another_open_lock(tmp_path):
    out = str(tmp_path / "run")
    run_dir.claim(out)
    try:
        with open(os.path.join(out, "run.lock")) as f:  # another open file: flock treats it as another holder
            import fcntl
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        run_dir.release(out)
