"""An output folder owned by one run, degenerate inputs refused, finite statistics, errors before compute,
seeds that matter: each bad input is checked to stop before any model is built or anything is written; the
generator, the KV cache, the loss and the rewards refuse bad tensors and arguments before they compute."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoints as C
import config
import run_dir
import train
from helpers import N, text_kv, video
from kv_cache import KVCache
from loss import Controller, advantages, kl_loss, policy_loss
from config import DEFAULT_OFFLINE_SPEC
from rewards import build_reward
from rollout import draw_noise, generate, new_cache

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


# ------------------------------------------------------------------ degenerate inputs, finite statistics
def huge(frames, prompts):
    return 1e30 * (1 + frames.flatten(1).mean(1))


def constant(frames, prompts):
    return torch.ones(len(frames))


def test_statistics_stay_finite_and_flat_groups_are_counted(tmp_path, capsys):
    out = tmp_path / "huge"
    train.main(FAST + ["--steps=1", "--reward=test_reliability:huge:1", f"--out_dir={out}"])
    row = json.loads(open(out / "log.jsonl").readline())
    assert all(v == v and abs(v) != float("inf") for v in row.values() if isinstance(v, float))
    assert 0 < row["composite_std"] < 1e30 and row["flat_groups"] == 0
    train.main(FAST + ["--steps=3", "--reward=test_reliability:constant:1", f"--out_dir={tmp_path / 'flat'}"])
    assert [json.loads(r)["flat_groups"] for r in open(tmp_path / "flat" / "log.jsonl")] == [1, 1, 1]
    assert "steps 1-3: every group's candidates got equal rewards" in capsys.readouterr().out


BAD_TRAIN = [
    (["--reward=colorfulness:0,smoothness:0"], "has no nonzero weight"),
    (["--lr=1e38"], r"lr=1e\+38 must be at most 1"),
    (["--lr=0.5", "--weight_decay=3"], "weight_decay=3.0 times lr=0.5 must be below 1"),
    (["--seed=-1"], "seed=-1 must lie in"),
    (["--seed=9223372036854775808"], r"seed=9223372036854775808 must lie in \[0, 2\^63\)"),
    (["--model=/nonexistent/wan"], "model='/nonexistent/wan' does not exist"),
    (["--model={tmp}"], "model='{tmp}': {tmp} is not a diffusers Wan2.1 folder: it lacks transformer/config.json"),
    (["--checkpoint={tmp}"], "checkpoint and base_lora need model=PATH"),
    (["--reward=colorfulness:1,hpsv3:1"], "--reward uses hpsv3, which needs --hpsv3=PATH"),
    (["--reward=videoalign_mq:1"], "--reward uses videoalign_mq, which needs --videoalign=PATH"),
    (["--reward=colorfulness:1,hps:1"], "unknown reward 'hps'"),
    (["--reward=colorfulness:1,test_reliability:nope:1"], "module test_reliability has no function nope"),
    (["--reward=no_such_module:fn:1"], "cannot import module 'no_such_module'"),
]


@pytest.mark.parametrize("args,msg", BAD_TRAIN)
def test_train_refuses_degenerate_flags_before_anything(tmp_path, no_compute, args, msg):
    args = [a.format(tmp=tmp_path) for a in args]
    one_line_error(lambda: train.main(FAST + args + [f"--out_dir={tmp_path / 'run'}"]), msg.format(tmp=tmp_path))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,msg", [
    (["--prompts=/nonexistent.txt"], "does not exist"),
    (["--preset=sd3"], "unknown preset"),
    (["--learning_rate=1"], "unknown config key 'learning_rate'"),
    (["--clip_frames=12", "--window_frames=9"], "longer than window_frames"),
    (["--group_size=1"], "at least 2 candidates"),
    (["steps=3"], "--key=value"),
    (["--steps=abc"], "--steps='abc' is not an int"),
    (["--steps=1.5"], "--steps='1.5' is not an int"),
    (["--lr=1e-3x"], "--lr='1e-3x' is not a number"),
    (["--steps=None"], "--steps=None: steps needs a value"),
    (["--resume=ture"], "--resume='ture' is not a boolean"),
    (["--gradient_checkpointing=maybe"], "--gradient_checkpointing='maybe' is not a boolean"),
    (["--lora_rank=-1"], "lora_rank=-1 must be at least 0"),
    (["--lora_alpha=0"], "lora_alpha=0 must be positive"),
    (["--height=33"], "height=33 must be a positive multiple of 16"),
    (["--width=50"], "width=50 must be a positive multiple of 16"),
    (["--height=0"], "height=0 must be a positive multiple of 16"),
    (["--width=8"], "width=8 must be a positive multiple of 16"),
    (["--save_every=0"], "save_every=0 must be at least 1"),
    (["--log_every=0"], "log_every=0 must be at least 1"),
    (["--eval_every=-1"], r"eval_every=-1 must be at least 0 \(0: never\)"),
    (["--frames_per_block=0"], "frames_per_block=0 must be at least 1"),
    (["--prompts_per_rank=0"], "prompts_per_rank=0 must be at least 1"),
    (["--eval_frames=0"], "eval_frames=0 must be at least 1"),
    (["--clip_frames=0"], "clip_frames=0 must be at least 1"),
    (["--max_history_frames=-3"], "max_history_frames=-3 must be at least 0"),
    (["--clip_start=-3"], "clip_start=-3 must be at least 0"),
    (["--sink_frames=12"], "sink_frames=12 must be at most window_frames=9"),
    (["--window_frames=2", "--clip_frames=3"], "window_frames=2 is smaller than one block"),
    (["--gamma=1.5"], r"gamma=1.5 must lie in \[0, 1\]"),
    (["--rho=2"], r"rho=2.0 must lie in \[0, 1\]"),
    (["--lr=nan"], "lr=nan must be a finite number"),
    (["--a_max=0"], "a_max=0.0 must be positive"),
    (["--grad_clip=0"], "grad_clip=0.0 must be positive"),
    (["--keep_checkpoints=0"], "keep_checkpoints=0 must be at least 1"),
    (["--reward=colorfulness:nan"], "--reward: reward 'colorfulness' has a non-finite weight 'nan'"),
    (["--reward=colorfulness:1,smoothness:inf"], "reward 'smoothness' has a non-finite weight 'inf'"),
    (["--out_dir=README.md"], "out_dir='README.md' is a file"),
    (["--clip_start=1023"], "past the generator's 1024-frame RoPE table"),
])
def test_train_rejects_bad_config_before_rollout(monkeypatch, args, msg):
    monkeypatch.setattr(train, "train_step", lambda *a: pytest.fail("a step ran before the config was rejected"))
    monkeypatch.setattr(train.evaluation, "evaluate_theta", lambda *a: pytest.fail("evaluated before the config was rejected"))
    with pytest.raises(SystemExit, match=msg) as err:
        train.main(args)
    assert "\n" not in str(err.value)  # one line


def test_full_fine_tuning_on_one_gpu_is_refused_before_any_model(tmp_path, monkeypatch, no_compute):
    """Without FSDP2's fp32 masters one GPU would train bf16 weights (README, 14B and sharded full fine-tuning)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("the device was set up before the error"))
    one_line_error(lambda: train.main(["--lora_rank=0", f"--out_dir={tmp_path}"]), r"--lora_rank=0 .* on one GPU")


def test_train_rejects_empty_prompts_and_other_model_size(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SystemExit, match="has no prompts"):
        train.main([f"--prompts={empty}"])
    train.main(FAST + ["--steps=1", f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="differs from the checkpoint's in lora_rank: 8 -> 4"):
        train.main(FAST + ["--steps=2", f"--out_dir={tmp_path}", "--resume=true", "--lora_rank=4"])


def test_an_error_after_the_claim_leaves_no_empty_folder(tmp_path):
    """The RoPE bound is known once the generator is built, after out_dir was claimed (created): the process
    stops with one line and takes the folder it created, still empty, with it."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "train.py", *FAST, "--clip_start=1023", f"--out_dir={out}"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: clip_start/max_history_frames + clip_frames = 1026 or eval_frames = 3 is past the generator's "
        "1024-frame RoPE table"]
    assert not out.exists()
    out.mkdir()  # a folder that was there before the run is left in place
    run_dir.claim(str(out))
    run_dir.release(str(out))
    assert out.is_dir() and os.listdir(out) == []


# train.py run as `python train.py`, with a hook that stops it at a known point: mid-video (a sample video's first
# frames written under VideoFile's temporary name) or mid-save (the first file of ckpt-NNNNNN.tmp written)
STOPPED = """import os, runpy, sys, time
sys.path.insert(0, {root!r})
import safetensors.torch, sample
def stop(real):
    def hooked(*a, **k):
        real(*a, **k)
        while {where!r} == "video" and not os.path.exists(a[0].tmp):  # ffmpeg creates it on its own time
            time.sleep(0.01)
        open({mark!r}, "w").close()
        time.sleep(300)
    return hooked
if {where!r} == "video":
    sample.VideoFile.write = stop(sample.VideoFile.write)
else:
    safetensors.torch.save_file = stop(safetensors.torch.save_file)
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def tree(folder):
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, ds, fs in os.walk(folder) for n in ds + fs)


@pytest.mark.parametrize("where", ["step", "video", "save"])
def test_sigterm_unwinds_train_releasing_the_lock_and_removing_temporary_files(tmp_path, where):
    """SIGTERM used to kill train.py outright (exit -15): run.lock stayed (a later run takes it over as stale) and a
    half-written ckpt-*.tmp or .tmp-<pid>-*.mp4 stayed until the next start. Now it exits 143 without a traceback,
    having released the lock and removed what it was writing."""
    out, mark = tmp_path / "run", tmp_path / "mark"
    args = FAST + ["--steps=10000", f"--out_dir={out}"]
    if where == "step":  # plain `python train.py`: killed between or inside steps, once it has logged one
        cmd, ready = [sys.executable, "train.py", *args], lambda: "\n" in (out / "log.jsonl").read_text()
    else:
        args += ["--eval_every=1", "--eval_seeds=1"] if where == "video" else ["--save_every=1"]
        cmd, ready = [sys.executable, "-c", STOPPED.format(root=ROOT, mark=str(mark), where=where), *args], mark.exists
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        while not ((out / "run.lock").is_file() and (out / "log.jsonl").is_file() and ready()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        assert (out / "run.lock").read_text().strip() == str(proc.pid)
        during = tree(out)
        if where == "video":
            assert f"samples/.tmp-{proc.pid}-step00000_prompt0.mp4" in during
        if where == "save":
            assert "ckpt-000001.tmp/adapter_model.safetensors" in during
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    after = tree(out)
    assert "run.lock" not in after and not [p for p in after if ".tmp" in p], after
    assert "log.jsonl" in after and ("latest" not in after if where == "save" else True)


RANKS = """import os, sys; sys.path.insert(0, {root!r}); import torch.distributed as dist, run_dir
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://{store}", rank=rank, world_size=2)
try:
    run_dir.claim_on_rank0({out!r}, False, False, rank, 2)
    print("claimed", os.getpid(), open(os.path.join({out!r}, "run.lock")).read().strip(), flush=True)
except SystemExit as e:
    print("refused", e, flush=True)
dist.barrier()
dist.destroy_process_group()  # torn down at exit instead, gloo can abort the process (SIGABRT)
"""


@pytest.mark.parametrize("earlier", [False, True])
def test_under_torchrun_rank0_alone_claims_and_every_rank_learns_the_outcome(tmp_path, earlier):
    out = tmp_path / "run"
    if earlier:
        out.mkdir()
        (out / "log.jsonl").write_text('{"step": 1}\n')
    code = RANKS.format(root=ROOT, store=str(tmp_path / "store"), out=str(out))  # the ranks meet in a file
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE, text=True) for r in (0, 1)]
    lines = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], lines
    if earlier:  # rank 0's refusal, word for word on rank 1 too
        assert lines[0].startswith(f"refused error: out_dir='{out}' holds an earlier run (log.jsonl)")
        assert lines[1] == lines[0] + " (rank 0)"
    else:  # one lock, rank 0's pid in it; rank 1 reads it, it took none of its own
        (w0, pid0, held0), (w1, _, held1) = (x.split() for x in lines)
        assert (w0, w1) == ("claimed", "claimed") and held0 == held1 == pid0


def test_prompts_read_as_utf8_without_bom_and_crlf(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffa red fox\r\n\r\nsnow\r\n".encode("utf-8"))
    assert config.read_prompts(str(f)) == ["a red fox", "snow"]
    f.write_bytes(b"fine\nalso fine\ncaf\xe9\n")
    one_line_error(lambda: config.read_prompts(str(f)), f"{f} line 3 is not UTF-8 text")


# ------------------------------------------------------------------ seeds
def test_lora_initialisation_follows_the_seed(monkeypatch):
    def adapters(seed):
        ctx = train.build(config.parse_config(FAST + [f"--seed={seed}"]))
        return torch.cat([p.detach().flatten() for p in ctx.policy.params("default")])
    a0, b0, a1 = adapters(0), adapters(0), adapters(1)
    assert torch.equal(a0, b0) and not torch.equal(a0, a1)


# ------------------------------------------------------------------ evaluate.py, sample.py: errors first
def test_evaluate_checks_lora_b_and_out_dir_before_generator_a(tmp_path, no_compute):
    import evaluate
    not_ckpt = tmp_path / "notckpt"
    not_ckpt.mkdir()
    one_line_error(lambda: evaluate.main(["--lora_b", str(not_ckpt), "--out_dir", str(tmp_path / "ev")]),
                   "is not a train.py checkpoint folder")
    one_line_error(lambda: evaluate.main(["--model", str(not_ckpt), "--out_dir", str(tmp_path / "ev")]),
                   "is not a diffusers Wan2.1 folder: it lacks transformer/config.json")
    one_line_error(lambda: evaluate.main(["--height", "40", "--out_dir", str(tmp_path / "ev")]), "--height 40")
    one_line_error(lambda: evaluate.main(["--reward", "colorfulness:0", "--out_dir", str(tmp_path / "ev")]),
                   "no nonzero weight")
    assert not (tmp_path / "ev").exists()


BAD_EVALUATE = [
    (["--reward", "hpsv3:1"], "--reward uses hpsv3, which needs --hpsv3=PATH"),
    ([], "--reward uses hpsv3, which needs --hpsv3=PATH"),  # the default spec is the paper's three model rewards
    (["--reward", "colorfulness:1,videoalign_ta:1"], "--reward uses videoalign_ta, which needs --videoalign=PATH"),
    (["--reward", "colorfulness:1,no_such_module:fn:1"], "cannot import module 'no_such_module'"),
    (["--reward", "colorfulness:1", "--out_dir", "{tmp}/file"], "--out_dir {tmp}/file is a file, not a folder"),
    (["--reward", "colorfulness:1", "--out_dir", "{tmp}/file/sub"], "--out_dir {tmp}/file/sub cannot be created"),
]


@pytest.mark.parametrize("args,msg", BAD_EVALUATE)
def test_evaluate_refuses_model_rewards_without_their_path_and_a_file_as_out_dir(tmp_path, monkeypatch, no_compute,
                                                                                 args, msg):
    """Before: the reward models were looked for after --out_dir was created (a traceback from build_reward), and a
    file as --out_dir gave errno's line without the flag. Now: one line naming the flag, nothing created or built."""
    import evaluate
    monkeypatch.setattr(evaluate, "build_reward", lambda *a, **k: pytest.fail("built the rewards before the error"))
    (tmp_path / "file").write_text("not a folder")
    args = [x.format(tmp=tmp_path) for x in args]
    if "--out_dir" not in args:
        args += ["--out_dir", str(tmp_path / "ev")]
    one_line_error(lambda: evaluate.main(args), msg.format(tmp=re.escape(str(tmp_path))))
    assert sorted(os.listdir(tmp_path)) == ["file"] and (tmp_path / "file").read_text() == "not a folder"


def test_sample_checks_folders_and_size_first_and_removes_stale_tmp(tmp_path, monkeypatch, no_compute):
    import sample
    not_ckpt = tmp_path / "notckpt"
    not_ckpt.mkdir()
    out = str(tmp_path / "v.mp4")
    one_line_error(lambda: sample.main(["--prompt", "a", "--lora", str(not_ckpt), "--out", out, "--device", "cpu"]),
                   "is not a train.py checkpoint folder")
    one_line_error(lambda: sample.main(["--prompt", "a", "--width", "20", "--out", out, "--device", "cpu"]),
                   "--width 20 must be a positive multiple of 16")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tmp-{dead.stdout.strip()}-v.mp4"
    stale.write_bytes(b"partial")
    mine = tmp_path / f".tmp-{os.getpid()}-w.mp4"  # a live writer's: kept
    mine.write_bytes(b"in progress")
    with pytest.raises(pytest.fail.Exception, match="a model was built"):  # the inputs are good: it goes on
        sample.main(["--prompt", "a", "--out", out, "--device", "cpu"])
    assert not stale.exists() and mine.exists()


def test_train_removes_the_videos_a_killed_evaluation_left_half_written(tmp_path, capsys):
    samples = tmp_path / "run" / "samples"
    samples.mkdir(parents=True)  # samples/ alone (killed during the step-0 evaluation) is not yet a run
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = samples / f".tmp-{dead.stdout.strip()}-step00000_prompt0.mp4"
    stale.write_bytes(b"partial")
    live = samples / f".tmp-{os.getpid()}-step00000_prompt1.mp4"  # a live writer's: kept
    live.write_bytes(b"in progress")
    train.main(FAST + ["--steps=1", f"--out_dir={tmp_path / 'run'}"])
    assert not stale.exists() and live.exists()
    assert f"removed {stale}, left by an interrupted write" in capsys.readouterr().out


BAD_SEED = [  # (command, flags, message): sample.py seeds video i (a --prompts line) with --seed + i
    ("sample", ["--seed", "-1"], r"--seed -1 must lie in \[0, 2\^63\)"),
    ("sample", ["--seed", str(2 ** 63)], r"--seed 9223372036854775808 must lie in \[0, 2\^63\)"),
    ("sample", ["--prompts", "{three}", "--seed", str(2 ** 63 - 2)],
     r"the videos' seeds 9223372036854775806 \.\. 9223372036854775808 \(--seed \+ line\) must lie in \[0, 2\^63\)"),
    ("evaluate", ["--seed", "-1"], r"--seed -1 must lie in \[0, 2\^63\)"),
    ("evaluate", ["--seed", str(2 ** 63)], r"--seed 9223372036854775808 must lie in \[0, 2\^63\)"),
]


@pytest.mark.parametrize("command,args,msg", BAD_SEED)
def test_sample_and_evaluate_refuse_seeds_out_of_range_first(tmp_path, monkeypatch, no_compute, command, args, msg):
    """Before: the seed reached torch's generator after the model was built (2^64 and up: a traceback there)."""
    import evaluate
    import sample
    monkeypatch.setattr(evaluate, "build_reward", lambda *a, **k: pytest.fail("built the rewards before the error"))
    three = tmp_path / "three.txt"
    three.write_text("a fox\na cat\na dog\n")
    args = [x.format(three=three) for x in args]
    if command == "sample":
        many = "--prompts" in args  # then --out is a folder
        run = lambda: sample.main(["--prompt", "a fox"] * (not many) + args +  # noqa: E731
                                  ["--out", str(tmp_path / ("v" if many else "v.mp4")), "--device", "cpu"])
    else:
        run = lambda: evaluate.main(args + ["--reward", "colorfulness:1", "--out_dir", str(tmp_path / "ev")])  # noqa: E731
    one_line_error(run, msg)
    assert sorted(os.listdir(tmp_path)) == ["three.txt"]


def test_sample_takes_the_last_seed_below_2_63(tmp_path, no_compute):
    """The bound is exact: the last video's seed 2^63 - 1 is good (the run goes on to build the model)."""
    import sample
    three = tmp_path / "three.txt"
    three.write_text("a fox\na cat\na dog\n")
    with pytest.raises(pytest.fail.Exception, match="a model was built"):
        sample.main(["--prompts", str(three), "--seed", str(2 ** 63 - 3), "--out", str(tmp_path / "v"), "--device", "cpu"])


def test_sample_size_flags_set_the_video_size(tmp_path):
    import imageio
    import sample
    out = tmp_path / "v.mp4"
    sample.main(["--prompt", "a fox", "--frames", "3", "--height", "32", "--width", "48", "--out", str(out),
                 "--device", "cpu"])
    assert imageio.mimread(str(out))[0].shape == (32, 48, 3)


@pytest.mark.parametrize("args,msg", [
    (["--prompt", " "], "empty prompt"),
    (["--prompt", "a", "--frames", "7"], "whole number"),
    (["--prompt", "a|b", "--switch", "21", "--frames", "9"], "increasing latent frames"),
    (["--prompt", "a|b|c", "--switch", "6,3", "--frames", "9"], "increasing latent frames"),
    (["--prompt", "a|b", "--switch", "7", "--frames", "9"], "frame 7 would take effect at frame 9"),
    (["--prompt", "a", "--base_lora_alpha", "0"], "--base_lora_alpha 0.0 must be positive"),
    (["--prompt", "a|b"], "need 1 --switch"),
    (["--prompt", "a", "--out", "/nonexistent/dir/x.mp4"], "cannot write"),
    (["--prompt", "a", "--frames", "6", "--frames_per_block", "0"], "--frames_per_block 0 must be at least 1"),
    (["--prompt", "a", "--sink_frames", "-1"], "--sink_frames -1 / --window_frames 21"),
    (["--prompt", "a", "--sink_frames", "9", "--window_frames", "6"], "--sink_frames 9 / --window_frames 6"),
    (["--prompt", "a", "--window_frames", "2"], "--window_frames 2"),
    (["--prompt", "a|b", "--frames", "6", "--switch", "abc"], "--switch 'abc' is not a comma-separated"),
    (["--prompt", "a", "--out", "v.txt"], "--out 'v.txt' must end in .mp4"),
    (["--prompt", "a", "--out", "video"], "--out 'video' must end in .mp4"),
    (["--prompt", "a", "--device", "tpu"], "--device 'tpu' is not a torch device"),
    (["--prompt", "a", "--lora", "/nonexistent/ckpt"], "--lora /nonexistent/ckpt does not exist"),
    (["--prompt", "a", "--model", "/nonexistent/wan"], "--model /nonexistent/wan does not exist"),
    (["--prompt", "a", "--checkpoint", os.path.abspath(__file__)], "need --model"),
    (["--prompt", "a", "--frames", "1026"], "--frames 1026 is past the generator's 1024-frame RoPE table"),
])
def test_sample_rejects_bad_input_before_generating(tmp_path, monkeypatch, args, msg):
    import sample
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("generated before rejecting the input"))
    args = args if "--out" in args else args + ["--out", str(tmp_path / "v.mp4")]
    with pytest.raises(SystemExit, match=re.escape(msg)):
        sample.main(args + ["--device", "cpu"] * ("--device" not in args))
    assert list(tmp_path.iterdir()) == []  # nothing written


# ------------------------------------------------------------------ report
def test_report_draws_controls_beside_the_run_without_warnings(tmp_path, recwarn):
    run, ctl = tmp_path / "run.jsonl", tmp_path / "rand" / "log.jsonl"
    ctl.parent.mkdir()
    for path, d in ((run, 0.1), (ctl, 0.0)):
        path.write_text("".join(json.dumps({"step": s, "reward/composite": d * s}) + "\n" for s in range(1, 5)))
    train.main(["report", str(run), "--control", str(ctl)])
    assert (tmp_path / "run.png").stat().st_size > 0
    assert not [w for w in recwarn.list if "legend" in str(w.message).lower()]
    one_line_error(lambda: train.main(["report", str(run), "--control"]), "--control needs a log file")
    one_line_error(lambda: train.main(["report", str(run), "--control", str(tmp_path / "none")]), "no log file")


@pytest.mark.parametrize("content,msg", [
    (None, "no log file"), ("", "has no rows with a step and a composite reward"),
    ('{"step": 1, "eval/composite": 0.5}\n{oops\n', "line 2 is not JSON"),
    ('{"step": 1, "time/rollout": 2.0}\n', "has no rows with a step and a composite reward"),
])
def test_report_refuses_logs_with_nothing_to_draw(tmp_path, content, msg):
    path = tmp_path / "log.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit, match=msg):
        train.main(["report", str(path)])
    assert not (tmp_path / "log.png").exists()


# ------------------------------------------ the generator, the cache, the loss, the rewards: errors before compute
def test_generate_refuses_non_finite_noise_before_any_forward(wan, monkeypatch):
    from rollout import draw_noise, generate, new_cache
    shape = wan.latent_shape(3)
    noise = draw_noise(0, 1, shape)
    noise[0, 1, 0, 0, 0, 0] = float("nan")
    monkeypatch.setattr(type(wan.model), "forward", lambda *a, **k: pytest.fail("a forward ran"))
    with pytest.raises(ValueError, match="noise holds non-finite"):
        generate(wan.model, None, noise, new_cache(wan.model, 1, shape, 3, 9, 3), 0, 3)


def test_bad_input_is_rejected_before_compute(wan):
    m, kv = wan.model, text_kv(wan)
    with pytest.raises(ValueError, match="latents must be"):
        m(torch.randn(16, 3, 8, 8), 0.0, kv)
    with pytest.raises(ValueError, match="RoPE"):
        m(torch.randn(1, 16, 3, 8, 8), 0.0, kv, start_frame=1022)
    with pytest.raises(ValueError, match="smaller than one block"):
        KVCache(2, 1, 12, 16, 2, 16, sink_frames=0, window_frames=2, frames_per_block=3)
    with pytest.raises(ValueError, match="sink_frames=10"):
        KVCache(2, 1, 12, 16, 2, 16, sink_frames=10, window_frames=9, frames_per_block=3)
    with pytest.raises(ValueError, match="not a whole number"):
        generate(m, kv, draw_noise(0, 1, (16, 4, 8, 8)), new_cache(m, 1, (16, 4, 8, 8), 3, 9, N))
    cache = new_cache(m, 1, (16, 6, 8, 8), 3, 9, N)
    cache.begin_block(0, 3)
    with pytest.raises(ValueError, match="must start at frame 3"):
        cache.begin_block(6, 3)
    with pytest.raises(ValueError, match="non-empty strings"):
        wan.text_encoder([""])


def test_forward_rejects_a_start_frame_the_cache_disagrees_with(wan):
    m, kv = wan.model, text_kv(wan)
    cache = new_cache(m, 1, (16, 6, 8, 8), 3, 9, N)
    cache.begin_block(0, N)
    x = torch.randn(1, 16, N, 8, 8)
    with pytest.raises(ValueError, match="start_frame=3 but the cache is positioned at frame 0"):
        m(x, 500.0, kv, cache, start_frame=3, store=True)
    with pytest.raises(ValueError, match="timestep must be a float or hold 1 or B=2"):
        m(torch.randn(2, 16, N, 8, 8), torch.full((2, N), 500.0), kv)


def test_generate_rejects_switches_off_block_starts_and_frames_past_rope(wan):
    m, kv = wan.model, text_kv(wan)
    calls, forward = [], m.forward
    m.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    try:
        for frames, msg in [((4,), r"switch at frame 4 would take effect at frame 6 .* past the last block of \[0, 6\)"),
                            ((9,), r"switches \[9\] must be increasing frames in \[0, 6\)"), ((-3,), r"switches \[-3\]")]:
            with pytest.raises(ValueError, match=msg):
                generate(m, kv, draw_noise(5, 1, (16, 6, 8, 8)), new_cache(m, 1, (16, 6, 8, 8), 3, 9, N),
                         switches=[(f, kv) for f in frames])
        with pytest.raises(ValueError, match=r"frames \[1020, 1026\) are past the 1024-position RoPE table"):
            generate(m, kv, draw_noise(5, 1, (16, 6, 8, 8)), new_cache(m, 1, (16, 6, 8, 8), 3, 9, N), 1020)
        with pytest.raises(ValueError, match=r"noise must be \[B, 4, C, F, h, w\]"):
            generate(m, kv, torch.randn(1, 16, 6, 8, 8), new_cache(m, 1, (16, 6, 8, 8), 3, 9, N))
        with pytest.raises(ValueError, match="noise has batch 2, the cache batch 1"):
            generate(m, kv, draw_noise(5, 2, (16, 3, 8, 8)), new_cache(m, 1, (16, 3, 8, 8), 3, 9, N))
        with pytest.raises(ValueError, match=r"latent size 7x8 is not divisible by the patch \(2, 2\)"):
            new_cache(m, 1, (16, 3, 7, 8), 3, 9, N)
        with pytest.raises(ValueError, match="cache sizes must be positive ints"):
            KVCache(2, 0, 12, 16, 2, 16, sink_frames=3, window_frames=9, frames_per_block=3)
        with pytest.raises(ValueError, match="attend\\(\\) before begin_block"):
            KVCache(2, 1, 12, 16, 2, 16, 3, 9, 3).attend(0, torch.randn(1, 48, 2, 16), torch.randn(1, 48, 2, 16))
        assert calls == []  # every error came before the first forward
    finally:
        del m.forward


def test_bad_input_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="shape"):
        policy_loss(x, torch.randn(4, 2), x, torch.rand(4))
    with pytest.raises(ValueError, match="shape"):
        policy_loss(x, x, torch.randn(3, 3), torch.rand(4))
    with pytest.raises(ValueError, match="shape"):
        policy_loss(x, x, x, torch.rand(3))
    with pytest.raises(ValueError, match="shape"):
        kl_loss(x, torch.randn(4, 4), torch.tensor([True, False, False, False]))
    with pytest.raises(ValueError, match="does not divide"):
        advantages(torch.randn(10), group_size=4)
    with pytest.raises(ValueError, match="nan"):
        advantages(torch.tensor([1.0, float("nan"), 2.0, 3.0]), group_size=2)
    with pytest.raises(ValueError, match="inf"):
        advantages(torch.tensor([1.0, 0.0, float("inf"), 3.0]), group_size=2)
    with pytest.raises(ValueError, match="shape"):
        Controller().uncertainty_mask(torch.randn(5), torch.randn(4, 2))
    with pytest.raises(ValueError, match="auxiliaries.*nan"):
        Controller().uncertainty_mask(torch.randn(3), torch.tensor([[0.0], [float("nan")], [1.0]]))


def test_bad_inputs_raise_clear_errors(tmp_path):
    reward_fn, frames = build_reward(DEFAULT_OFFLINE_SPEC), video(2, 9, 64, 64)
    with pytest.raises(ValueError, match=r"\[0, 1\], got min .* max 1.5"):
        reward_fn(frames * 1.5, ["a", "b"])
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\].*\[2, 9, 64, 64\]"):
        reward_fn(frames[:, :, 0], ["a", "b"])
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\].*\[2, 9, 4, 64, 64\]"):
        reward_fn(torch.cat([frames, frames[:, :, :1]], 2), ["a", "b"])
    with pytest.raises(ValueError, match="list of 2 prompt strings"):
        reward_fn(frames, ["a"])
    with pytest.raises(ValueError, match="unknown reward 'hps'"):
        build_reward("hps:1")
    with pytest.raises(ValueError, match="must be name:weight"):
        build_reward("colorfulness")
    with pytest.raises(ValueError, match="needs paths\\['hpsv3'\\]"):
        build_reward("hpsv3:1")
    with pytest.raises(FileNotFoundError, match="nowhere/HPSv3.safetensors"):
        build_reward("hpsv3:1", paths={"hpsv3": str(tmp_path / "nowhere/HPSv3.safetensors")})
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        build_reward("videoalign_mq:1", paths={"videoalign": str(tmp_path)})
    with pytest.raises(ValueError, match="has no function nope"):
        build_reward("test_astrolabe:nope:1")
