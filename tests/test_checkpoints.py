"""train.py's checkpoints: written durably (files fsynced, then renamed, then the folder fsynced); a crash while
saving keeps the previous checkpoint; a resumed run equals an unbroken one bit for bit; a resume trims the log, clears
an interrupted save's leftovers and keeps the last k checkpoints; and it validates the checkpoint and the config
before it goes on."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import train
from helpers import FAST, CodeInPickle, assert_same_tree, read_ckpt


def test_replace_durably_fsyncs_files_then_renames_then_fsyncs_the_folder(tmp_path, monkeypatch):
    import files
    events, real_replace = [], os.replace
    monkeypatch.setattr(files, "fsync", lambda path: events.append(("fsync", os.path.basename(path))))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", os.path.basename(b))), real_replace(a, b)))
    (tmp_path / "ckpt.tmp").mkdir()
    for name in ("a.safetensors", "state.pt"):
        (tmp_path / "ckpt.tmp" / name).write_bytes(os.urandom(8))
    files.replace_durably(str(tmp_path / "ckpt.tmp"), str(tmp_path / "ckpt"))
    assert sorted(events[:2]) == [("fsync", "a.safetensors"), ("fsync", "state.pt")]
    assert events[2:] == [("fsync", "ckpt.tmp"), ("rename", "ckpt"), ("fsync", tmp_path.name)]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["a.safetensors", "state.pt"]


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(FAST + ["--steps=1", f"--out_dir={out}"])
    before, _ = read_ckpt(out)
    import safetensors.torch
    real, calls = safetensors.torch.save_file, []

    def dying_save(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while saving")
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.main(FAST + ["--steps=2", f"--out_dir={out}", "--resume=true"])
    monkeypatch.undo()
    after, state = read_ckpt(out)
    assert state["step"] == 1
    assert_same_tree(before, after)
    train.main(FAST + ["--steps=2", f"--out_dir={out}", "--resume=true"])  # and it resumes from there
    assert read_ckpt(out)[1]["step"] == 2


def test_resume_equals_an_unbroken_run(tmp_path):
    args = FAST + ["--gamma=0.9"]  # an EMA theta_old, so its state must survive the resume too
    train.main(args + ["--steps=4", f"--out_dir={tmp_path / 'a'}"])
    train.main(args + ["--steps=2", f"--out_dir={tmp_path / 'b'}"])
    train.main(args + ["--steps=4", f"--out_dir={tmp_path / 'b'}", "--resume=true"])
    (wa, sa), (wb, sb) = read_ckpt(tmp_path / "a"), read_ckpt(tmp_path / "b")
    assert_same_tree(wa, wb)
    assert_same_tree(sa["optimizer"], sb["optimizer"])
    assert sa["step"] == sb["step"] == 4 and sa["controller"] == sb["controller"]
    theta, old = wa["adapter_model.safetensors"], wa["old.safetensors"]
    lora_b = [k for k in theta if "lora_B" in k]  # zero at init: only training (theta) and the EMA (old) move them
    assert all(theta[k].abs().sum() > 0 and old[k].abs().sum() > 0 for k in lora_b)
    assert not all(torch.equal(theta[k], old[k]) for k in lora_b)  # with gamma 0.9 theta_old lags theta


def test_resume_trims_the_log_cleans_tmp_and_keeps_k_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    args = FAST + ["--save_every=1", "--keep_checkpoints=2", f"--out_dir={out}"]
    train.main(args + ["--steps=3"])
    assert sorted(os.listdir(out)) == ["ckpt-000002", "ckpt-000003", "latest", "log.jsonl"]
    # a crash after step 3 was logged, while its checkpoint was being written: ckpt-000003 never renamed
    shutil.rmtree(out / "ckpt-000003")
    (out / "ckpt-000003.tmp").mkdir()
    (out / "ckpt-000003.tmp" / "old.safetensors").write_bytes(b"")
    (out / "latest").write_text("ckpt-000002")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 4, "reward/comp')  # a line torn by the crash
    capsys.readouterr()
    train.main(args + ["--steps=4", "--resume=true"])
    printed = capsys.readouterr().out
    assert "ckpt-000003.tmp, left by an interrupted save" in printed
    assert "resuming from step 2" in printed and "dropped 2 row(s) past step 2" in printed
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2, 3, 4]
    assert sorted(os.listdir(out)) == ["ckpt-000003", "ckpt-000004", "latest", "log.jsonl"]


def test_resume_validates_the_checkpoint_and_the_config(tmp_path, capsys):
    import shutil as sh
    src = tmp_path / "src"
    train.main(FAST + ["--steps=1", f"--out_dir={src}"])

    def attempt(name, damage, *extra):
        out = tmp_path / name
        sh.copytree(src, out)
        damage(out, out / "ckpt-000001")
        train.main(FAST + [f"--out_dir={out}", "--resume=true", "--steps=2", *extra])
        return out

    cases = [
        ("outside", lambda o, c: (o / "latest").write_text("../src/ckpt-000001"), "not the name of a ckpt-NNNNNN folder"),
        ("gone", lambda o, c: (o / "latest").write_text("ckpt-000007"), "ckpt-000007, which does not exist"),
        ("code", lambda o, c: torch.save({"step": 1, "x": CodeInPickle()}, c / "state.pt"), "state.pt holds code"),
        ("junk", lambda o, c: (c / "state.pt").write_bytes(os.urandom(40)), "state.pt: damaged or not a torch checkpoint"),
        ("keys", lambda o, c: torch.save({"step": 1}, c / "state.pt"), "state.pt lacks"),
        ("nostate", lambda o, c: os.remove(c / "state.pt"), "state.pt: no such file"),
        ("cut", lambda o, c: (c / "old.safetensors").write_bytes(b"\x05"), "old.safetensors: damaged"),
        ("nan", lambda o, c: save_file({k: v.fill_(float("nan")) for k, v in
                                        __import__("safetensors.torch").torch.load_file(c / "ref.safetensors").items()},
                                       c / "ref.safetensors"), "ref.safetensors: non-finite"),
    ]
    for name, damage, msg in cases:
        with pytest.raises(SystemExit, match=msg):
            attempt(name, damage)
    with pytest.raises(SystemExit, match=r"differs from the checkpoint's in group_size: 2 -> 4, micro_batch: 2 -> 4, "
                                         r"seed: 0 -> 5 \(only steps, lr"):
        attempt("config", lambda o, c: None, "--group_size=4", "--micro_batch=4", "--seed=5")
    with pytest.raises(SystemExit, match="--steps=1: .* is already at step 1"):
        attempt("behind", lambda o, c: None, "--steps=1")
    capsys.readouterr()
    out = attempt("lr", lambda o, c: None, "--lr=0.001")  # applied to the optimizer, and said so
    assert "resuming from step 1; lr 0.02 -> 0.001" in capsys.readouterr().out
    state = read_ckpt(out)[1]
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.001] and state["config"]["lr"] == 0.001
