"""An output folder belongs to one run: train.py claims it before any model is built.

A fresh run refuses a folder that holds an earlier run's log or checkpoints (keep_checkpoints would delete
them, the log would mix two runs) unless --overwrite moves that run aside; a second process is refused by
an exclusive flock on out_dir/run.lock, which the kernel releases on any exit, even SIGKILL. A lock file left
by a dead process (its pid in it) is taken over, and said so."""
import atexit
import fcntl
import json
import os
import time

from files import pid_alive, write_text_durably

LOCK = "run.lock"
_held = {}  # absolute out_dir -> (open lock file, whether the claim created the folder): a process claims a folder once


def run_files(out_dir):
    """The entries that make out_dir hold a run: its log, the `latest` pointer, checkpoint folders."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return sorted(n for n in names if n in ("log.jsonl", "latest") or n.startswith("ckpt-"))


def _lock(out_dir):
    """flock out_dir/run.lock and write our pid in it; SystemExit naming the holder when it is taken."""
    path = os.path.join(out_dir, LOCK)
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise SystemExit(f"error: out_dir={out_dir!r} is in use by another run (process {holder} holds {path}); "
                             f"wait for it to end or choose another --out_dir") from None
        # a holder that ended between our open and our flock may have unlinked the file: lock the one at `path`
        if os.path.exists(path) and os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
            break
        f.close()
    f.seek(0)
    old = f.read().strip()
    if old.isdigit() and int(old) != os.getpid() and not pid_alive(int(old)):
        print(f"{path}: took over the stale lock of process {old}, which is no longer running")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def claim(out_dir, resume=False, overwrite=False):
    """Make out_dir this process's run folder (created if need be); see the module docstring. Every refusal is
    one line naming the folder; a folder that cannot be created or written is one too."""
    key = os.path.abspath(out_dir)
    if key in _held:
        release(out_dir)
    if resume and not run_files(out_dir):
        raise SystemExit(f"error: --resume=true but out_dir={out_dir!r} holds no run (no log.jsonl or checkpoint)")
    created = not os.path.exists(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = _lock(out_dir)
    except OSError as e:
        if created and os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise SystemExit(f"error: out_dir={out_dir!r} cannot be written ({e.strerror or e})") from None
    found = run_files(out_dir)
    if found and not resume and not overwrite:
        _drop(out_dir, lock)
        raise SystemExit(f"error: out_dir={out_dir!r} holds an earlier run ({', '.join(found[:4])}): continue it with "
                         f"--resume=true, or start anew with another --out_dir or --overwrite=true (which moves the "
                         f"earlier run aside to {key}.old-<time>)")
    if found and overwrite:
        aside = f"{key}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        aside = next(p for p in (aside, *(f"{aside}-{i}" for i in range(1, 1000))) if not os.path.exists(p))
        os.makedirs(aside)
        for name in os.listdir(out_dir):
            if name != LOCK:
                os.rename(os.path.join(out_dir, name), os.path.join(aside, name))
        print(f"--overwrite=true: moved the earlier run in {out_dir} to {aside}")
    _held[key] = (lock, created)
    atexit.register(release, out_dir)  # an error exit frees it too (a kill leaves a stale lock: taken over later)


def release(out_dir):
    """Give the folder up: the lock file is removed, then unlocked (a waiting claim re-checks the inode). A folder
    this claim created that is still empty (the run stopped on an error before writing anything) is removed."""
    lock, created = _held.pop(os.path.abspath(out_dir), (None, False))
    if lock is not None:
        _drop(out_dir, lock)
        try:
            if created and not os.listdir(out_dir):
                os.rmdir(out_dir)
        except OSError:
            pass  # moved, filled or removed meanwhile: leave it as it is


def _drop(out_dir, lock):
    try:
        os.remove(os.path.join(out_dir, LOCK))
    except FileNotFoundError:
        pass  # the folder was moved or cleaned by hand: nothing left to remove
    lock.close()


def claim_on_rank0(out_dir, resume, overwrite, rank, world):
    """Under torch.distributed only rank 0 claims; every rank learns the outcome and stops on a refusal."""
    error = None
    if rank == 0:
        try:
            claim(out_dir, resume, overwrite)
        except SystemExit as e:
            error = str(e)
    if world > 1:
        import torch.distributed as dist
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise SystemExit(error if rank == 0 else f"{error} (rank 0)")


def trim_log(path, step):
    """On resume: drop the rows past the checkpoint's step (the crashed run's steps are redone) and a torn last line."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut by a crash mid-write
    if len(keep) < len(lines):
        write_text_durably(path, "".join(line + "\n" for line in keep))
        print(f"{path}: dropped {len(lines) - len(keep)} row(s) past step {step}")
