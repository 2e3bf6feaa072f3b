"""The user's command, timed as the user runs it: `sample.py` in fresh processes on a diffusers folder of random
weights at the real sizes, with its own printed FPS parsed (bench generate's headline rows; the in-process rows
are the breakdown). Cold = empty inductor and Triton caches, warm = the caches the cold run filled."""
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from bench.common import OUT_DIR, PROMPT
from bench.models import real_wan

WROTE = re.compile(r"wrote \S+: (\d+) frames .* in ([\d.]+)s \(([\d.]+) FPS.*first frames after ([\d.]+)s"
                   r"(?:; (\d+) compilations during the video)?")
WARM_UP = re.compile(r"warm-up \((\d+) frames\): ([\d.]+)s")


def write_random_folder(path):
    """The real-size random-weight transformer, umT5 encoder, tokenizer and VAE (models.real_wan) as a diffusers
    Wan2.1 folder (what --model reads); the models leave the GPU with this call, for the subprocesses."""
    if os.path.isdir(os.path.join(path, "vae")):
        return path
    wan = real_wan()
    wan.model.transformer.save_pretrained(os.path.join(path, "transformer"))
    wan.text_encoder.encoder.save_pretrained(os.path.join(path, "text_encoder"))
    wan.text_encoder.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    wan.vae.save_pretrained(os.path.join(path, "vae"))
    del wan
    torch.cuda.empty_cache()
    return path


def run(args, env):
    """sample.py in a new process: (whole command's wall seconds, [per video: frames, s, FPS, first-frame s,
    compilations, captures], (warm-up frames, warm-up s) or None)."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "sample.py", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    done = sum(f.startswith("sample-") for f in os.listdir(os.path.join(OUT_DIR, "user")))
    with open(os.path.join(OUT_DIR, "user", f"sample-{done}.log"), "w") as f:
        f.write(f"sample.py {' '.join(args)}\n{p.stdout}\n{p.stderr}")  # TORCH_LOGS=recompiles: what compiled when
    if p.returncode:
        raise RuntimeError(f"sample.py {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    videos = [tuple(float(x) if x else float("nan") for x in m.groups()) for m in WROTE.finditer(p.stdout)]
    warm = WARM_UP.search(p.stdout)
    return wall, videos, warm and (int(warm.group(1)), float(warm.group(2)))


def user_rows(tiny=False):
    """One short video on the fast path cold and warm, then on the eager path, one long video, a
    multi-prompt video, three videos in one process: what sample.py prints, beside the whole command's wall time
    (the fast path's break-even, fast.PAYS_FROM_FRAMES, comes from these rows)."""
    out = os.path.join(OUT_DIR, "user")
    os.makedirs(out, exist_ok=True)
    folder = [] if tiny else ["--model", write_random_folder(os.path.join(OUT_DIR, "wan-random"))]
    caches = tempfile.mkdtemp(prefix="compile-caches-")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"),
               TRITON_CACHE_DIR=os.path.join(caches, "triton"), PYTHONUNBUFFERED="1", TORCH_LOGS="recompiles")
    prompts = os.path.join(out, "prompts.txt")
    with open(prompts, "w") as f:
        f.write(f"{PROMPT}\na drone flies over a rocky coastline\na cat sleeps on a warm windowsill\n")
    short = ["--frames", "21", "--prompt", PROMPT, "--out", os.path.join(out, "short.mp4")]
    long = ["--frames", "120", "--sink_frames", "3", "--window_frames", "21", "--prompt", PROMPT, "--out", os.path.join(out, "long.mp4")]
    jobs = [("81 frames, --fast 1, first process (empty compile caches)", short + ["--fast", "1"]),
            ("81 frames, --fast 1, warm compile caches", short + ["--fast", "1"]),
            ("81 frames, --fast 0 (eager)", short + ["--fast", "0"]),
            ("477 frames, --sink_frames 3 --window_frames 21, --fast 1", long + ["--fast", "1"]),
            ("81 frames, 3 prompts, --switch 6,12, --fast 1", ["--frames", "21", "--prompt", f"{PROMPT}|the fox stops|"
                                                               "the fox sleeps", "--switch", "6,12", "--fast", "1",
                                                               "--out", os.path.join(out, "mp.mp4")]),
            ("3 x 81 frames, --prompts FILE, --fast 1", ["--frames", "21", "--prompts", prompts, "--fast", "1", "--out",
                                                         os.path.join(out, "many")])]
    rows = []
    picked = os.environ.get("BENCH_USER_JOBS")  # e.g. 0,1,1: the cold row, then the warm row twice (its spread)
    for name, args in [jobs[int(i)] for i in picked.split(",")] if picked else jobs:
        wall, videos, warm = run(folder + args, env)
        first = videos[0]
        rows.append(dict(part="sample.py", variant=name, fps_end_to_end=first[2], seconds=first[1],
                         first_frame_s=first[3], warm_up_s=warm[1] if warm else 0.0, command_s=wall,
                         compiles_in_video=first[4],
                         **({"fps_later_videos": sum(v[2] for v in videos[1:]) / (len(videos) - 1)}
                            if len(videos) > 1 else {})))
        print(rows[-1], flush=True)
    return rows
