"""Sample a video: python sample.py --prompt "a red fox runs through snow" --frames 21 --out fox.mp4

Multi-prompt: --prompt "a fox sleeps|the fox wakes up|the fox runs" --switch 9,18 (latent frames), with
LongLive 1.0's KV re-cache at each switch (rollout.recache; README, multi-prompt).
Many videos: --prompts FILE --out FOLDER writes one video per line (NNN-slug.mp4; line i, from 0, is seeded
--seed + i, so `--prompt LINE --seed S+i` remakes it), one compiled model, cache and warm-up for all.
With no --model it uses the tiny built-in model (random weights: the video is noise, the code path
is the real one). See README.md for real checkpoints.
"""
import argparse
import math
import os
import re
import signal
import sys
import tempfile
import time

import torch

import checkpoints
import vae
from config import read_prompts
from fast import PAYS_FROM_FRAMES, compile_blocks, speed_up, wanted
from files import VideoFile, remove_stale_tmp
from rollout import draw_noise, generate, new_cache, switch_starts

class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the docstring as written, every flag with its default."""


p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
p.add_argument("--prompt", default=None, help="a prompt, or several separated by '|' (then give --switch)")
p.add_argument("--prompts", default=None, help="a file of prompts, one video per line (--out is then a folder)")
p.add_argument("--switch", default="", help="comma-separated latent frames where the next prompt starts; a frame that "
               "is not a block start takes effect at the next block start (LongLive's rule)")
p.add_argument("--global_sink", type=int, default=1, choices=(0, 1),
               help="at a switch past sink + window frames, keep the sink's K/V (1, LongLive's interactive default) or "
                    "make the re-cached window's first frames the new sink (0, LongLive's long-tuning config)")
p.add_argument("--model", default=None, help="diffusers Wan2.1-T2V folder (default: the tiny built-in model)")
p.add_argument("--checkpoint", default=None, help="original-layout generator: Self-Forcing, Causal-Forcing, LongLive base")
p.add_argument("--checkpoint_key", default=None, help="entry of --checkpoint to use (generator_ema, generator)")
p.add_argument("--base_lora", default=None, help="LongLive lora.pt, merged into the base")
p.add_argument("--base_lora_alpha", type=float, default=None,
               help="LoRA alpha of --base_lora (default: its rank r, read from the tensors; LongLive uses 256 / 256)")
p.add_argument("--lora", default=None, help="a checkpoint folder written by train.py")
p.add_argument("--frames", type=int, default=21, help="latent frames (pixel frames = 1 + 4 (frames - 1))")
p.add_argument("--frames_per_block", type=int, default=3, help="latent frames generated together (one block)")
p.add_argument("--sink_frames", type=int, default=3, help="sink frames kept in the cache forever")
p.add_argument("--window_frames", type=int, default=21, help="most recent frames attended besides the sink")
p.add_argument("--seed", type=int, default=0, help="the noise's seed (with --prompts: line i is seeded --seed + i)")
p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (default: the generator's; "
                                                        "a checkpoint samples best at the size it was trained at)")
p.add_argument("--width", type=int, default=None, help="pixels, as --height")
p.add_argument("--out", default=None, help="the mp4 (default video.mp4), or with --prompts a folder (default videos)")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
p.add_argument("--fast", type=int, default=None, choices=(0, 1, 2),
               help="compiled block stages and decoder after a warm-up (1, on a GPU) or the eager path (0); 2 "
                    "compiles on any device (the tests' check of the warm-up); default: 1 on a GPU when the "
                    f"videos hold at least {PAYS_FROM_FRAMES} latent frames in all (where the warm-up pays), else 0")


def check_args(a):
    """Every user error, before any weight is loaded or frame generated. Returns the videos to make, each
    (path, prompts, seed), and the switch frames they share."""
    if (a.prompt is None) == (a.prompts is None):
        raise SystemExit("error: give --prompt TEXT or --prompts FILE (one of the two)")
    lines = [a.prompt] if a.prompts is None else read_prompts(a.prompts)
    for q in lines:
        if any(not part.strip() for part in q.split("|")):
            raise SystemExit(f"error: empty prompt in {'--prompt' if a.prompts is None else a.prompts} {q!r}")
    prompts = lines[0].split("|")
    if len({len(q.split("|")) for q in lines}) > 1:
        raise SystemExit(f"error: every line of {a.prompts} must hold as many '|'-separated prompts (they share --switch)")
    if a.frames_per_block < 1:
        raise SystemExit(f"error: --frames_per_block {a.frames_per_block} must be at least 1")
    if a.frames <= 0 or a.frames % a.frames_per_block:
        raise SystemExit(f"error: --frames {a.frames} is not a whole number of {a.frames_per_block}-frame blocks")
    if not 0 <= a.sink_frames <= a.window_frames or a.window_frames < a.frames_per_block:
        raise SystemExit(f"error: --sink_frames {a.sink_frames} / --window_frames {a.window_frames}: need 0 <= sink <= window and a window of at "
                         f"least one block ({a.frames_per_block} frames)")
    try:
        switches = [int(f) for f in a.switch.split(",") if f.strip()]
    except ValueError:
        raise SystemExit(f"error: --switch {a.switch!r} is not a comma-separated list of latent frames") from None
    if len(switches) != len(prompts) - 1:
        raise SystemExit(f"error: {len(prompts)} prompts need {len(prompts) - 1} --switch frames, got {switches}")
    if switches != sorted(set(switches)) or any(not 0 < f < a.frames for f in switches):
        raise SystemExit(f"error: --switch {switches} must be increasing latent frames inside (0, {a.frames})")
    try:
        starts = switch_starts(switches, 0, a.frames, a.frames_per_block)
    except ValueError as e:
        raise SystemExit(f"error: --switch: {e}") from None
    if a.base_lora_alpha is not None and not a.base_lora_alpha > 0:
        raise SystemExit(f"error: --base_lora_alpha {a.base_lora_alpha} must be positive")
    if a.prompts is None:
        a.out = a.out or "video.mp4"
        out_dir = os.path.dirname(os.path.abspath(a.out))
        if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK) or os.path.isdir(a.out):
            raise SystemExit(f"error: cannot write --out {a.out}")
        if os.path.splitext(a.out)[1].lower() != ".mp4":
            raise SystemExit(f"error: --out {a.out!r} must end in .mp4 (the video is written with ffmpeg as mp4)")
        jobs = [(a.out, prompts, a.seed)]
    else:
        a.out = a.out or "videos"
        if os.path.splitext(a.out)[1].lower() == ".mp4" or os.path.isfile(a.out):
            raise SystemExit(f"error: with --prompts, --out {a.out!r} is a folder for the videos, not a file")
        parent = os.path.dirname(os.path.abspath(a.out))
        if not os.access(a.out if os.path.isdir(a.out) else parent, os.W_OK):
            raise SystemExit(f"error: cannot write --out {a.out}")
        width = max(3, len(str(len(lines) - 1)))
        jobs = [(os.path.join(a.out, f"{i:0{width}d}-{slug(q)}.mp4"), q.split("|"), a.seed + i)
                for i, q in enumerate(lines)]
    if a.seed < 0 or jobs[-1][2] >= 2 ** 63:  # each video's noise is torch.manual_seed(its seed), as train.py's seed
        raise SystemExit(f"error: --seed {a.seed} must lie in [0, 2^63)" if len(jobs) == 1 else
                         f"error: --seed {a.seed}: the videos' seeds {a.seed} .. {jobs[-1][2]} (--seed + line) "
                         f"must lie in [0, 2^63)")
    for flag in ("height", "width"):  # the VAE downsamples by 8 and the patch embedding by 2 more
        if getattr(a, flag) is not None and (getattr(a, flag) < 16 or getattr(a, flag) % 16):
            raise SystemExit(f"error: --{flag} {getattr(a, flag)} must be a positive multiple of 16")
    for flag in ("model", "checkpoint", "base_lora", "lora"):
        if getattr(a, flag) and not os.path.exists(getattr(a, flag)):
            raise SystemExit(f"error: --{flag} {getattr(a, flag)} does not exist")
    try:  # the folders' contents too: a wrong folder is named now, not after the generator is built
        if a.model:
            checkpoints.check_model_dir(a.model)
        if a.lora:
            checkpoints.check_trained(a.lora)
    except OSError as e:
        raise SystemExit(f"error: {e}") from None
    if (a.checkpoint or a.base_lora) and not a.model:
        raise SystemExit("error: --checkpoint and --base_lora need --model, the diffusers Wan2.1 folder they build on")
    try:
        device = torch.device(a.device)
    except RuntimeError:
        raise SystemExit(f"error: --device {a.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {a.device}: no CUDA GPU is available")
    for i, (f, s) in enumerate(zip(switches, starts)):
        if f != s:
            print(f"--switch {f}: prompt {i + 2} starts at latent frame {s}, "
                  f"the next block start without a switch (as LongLive schedules it)")
    return jobs, starts


def slug(text, length=40):
    """A file-name piece from a prompt: lower-case words joined by '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length].rstrip("-") or "prompt"


def dry_run(frames, switches, sink, window, n, chunk=3):
    """The shortest video that meets every shape and code path the real one meets, so that the warm-up compiles and
    captures all of them and the timed video none (returns its frames and switches).

    Calls differ in their cache slot until the sink + window is full, after which every block sits in the same slots;
    a prompt switch's re-cache differs in its reach until the switch frame passes the sink + window (from there
    on it starts at r0 > 0, and with global_sink re-caches the window alone), then repeats: a late switch is
    rehearsed at the first block start past the sink + window;
    the decoder meets its first latent frame alone, then chunks that end on multiples of `chunk`, each keyed by the
    layout of the chunk before (a cached slice keeps the strides of the tensor it was cut from), so the pattern
    repeats after lcm(n, chunk) frames once a chunk of `chunk` frames has been decoded. Two more blocks past the
    last of these cover the steady state and the last block, which skips its context pass."""
    full = -(-(sink + window) // n) * n  # first block start at which the cache is full
    period = n * chunk // math.gcd(n, chunk)
    late = (sink + window) // n * n + n  # the first block start past the sink + window (rollout.recache: r0 > 0)
    dry_switches = [s for s in switches if s < late] + ([late] if any(s >= late for s in switches) else [])
    need = max(full, 1 + chunk + 2 * period, *(s + n for s in dry_switches)) + 2 * n
    if need >= frames:
        return frames, switches
    return -(-need // n) * n, dry_switches


def render(wan, kvs, switches, noise, cache, n, global_sink=True, write=lambda frames: None, progress=False):
    """One video through the sampling path: generate block by block into `cache`, each block decoded as soon as it
    exists (progressive) and passed to write(frames [T, 3, H, W]). Returns the seconds to the first frames."""
    t0, first, decoder = time.perf_counter(), [], vae.Decoder(wan.vae)

    def on_block(x0):
        for part in (x0[:, :, :1], x0[:, :, 1:]) if decoder.frames == 0 else (x0,):  # first frame out at once
            write(decoder(part)[0])
            if not first:  # write returns before the frames are on the host (VideoFile): wait for them once
                x0.is_cuda and torch.cuda.synchronize()
                first.append(time.perf_counter() - t0)

    cache.reset()
    generate(wan.model, kvs[0], noise, cache, 0, n, switches=list(zip(switches, kvs[1:])), progress=progress,
             on_block=on_block, cache_last_block=False, global_sink=global_sink)
    return first[0]


def compilations():
    """Frames dynamo has compiled (first compilations and recompilations) so far in this process."""
    return torch._dynamo.utils.counters["frames"]["total"]


def main(argv=None):
    a = p.parse_args(argv)
    jobs, switches = check_args(a)
    for folder in {os.path.dirname(os.path.abspath(path)) for path, _, _ in jobs}:
        remove_stale_tmp(folder)  # partial videos of a killed earlier run
    cuda = a.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    try:  # the loaders raise ValueError / OSError naming the bad file, key or value: one line, no traceback
        wan = checkpoints.load(a.model, a.checkpoint, a.checkpoint_key, a.base_lora, a.base_lora_alpha, dtype=dtype)
        if a.lora:
            checkpoints.load_trained(wan.model.transformer, a.lora)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if a.frames > wan.model.max_frames:  # cached keys keep absolute positions: the RoPE table bounds the video
        raise SystemExit(f"error: --frames {a.frames} is past the generator's {wan.model.max_frames}-frame RoPE table")
    wan.to(a.device)
    wan.height, wan.width = a.height or wan.height, a.width or wan.width
    m, n, shape = wan.model, a.frames_per_block, wan.latent_shape(a.frames)
    cache = new_cache(m, 1, shape, a.sink_frames, a.window_frames, n)  # one cache for every video (KVCache.reset between them)
    fast = wanted(a.fast, a.device, a.frames * len(jobs))
    why = f"--fast {a.fast}" if a.fast is not None else f"the default for {a.frames * len(jobs)} latent frames on {a.device}"
    print(f"{'fast' if fast else 'eager'} path ({why}; README, Sampling: when the fast path pays)")
    if fast:  # compiled block stages and decoder: a dry run compiles every call the videos will make
        torch.backends.cudnn.benchmark = True  # the compiled path's process-wide settings (why: fast.py)
        torch._dynamo.config.recompile_limit = 64
        t0 = time.perf_counter()
        compile_blocks(m)
        speed_up(wan.vae)
        frames, dry_switches = dry_run(a.frames, switches, a.sink_frames, a.window_frames, n)
        kv = m.text_kv(wan.text_encoder([jobs[0][1][0]]))
        # written to a throw-away mp4, so that the writer's first use (imageio's ffmpeg set-up, 0.2 s of imports and
        # subprocesses on the writer thread beside the GPU's work; pinned host buffers) is not in the first video
        with tempfile.TemporaryDirectory() as tmp, VideoFile(os.path.join(tmp, "warm-up.mp4")) as video:
            render(wan, [kv] * (1 + len(dry_switches)), dry_switches,
                   draw_noise(a.seed, 1, wan.latent_shape(frames), a.device), cache, n, bool(a.global_sink), video.write)
            video.flush()
        print(f"compile and warm-up ({frames} frames): {time.perf_counter() - t0:.1f}s "
              f"(once per process)")
    os.makedirs(os.path.dirname(os.path.abspath(jobs[0][0])), exist_ok=True)  # --prompts: the folder
    for path, prompts, seed in jobs:
        before = compilations()
        t0 = time.perf_counter()
        with VideoFile(path) as video:
            kvs = [m.text_kv(wan.text_encoder([q])) for q in prompts]
            first = render(wan, kvs, switches, draw_noise(seed, 1, shape, a.device), cache, n, bool(a.global_sink),
                           video.write, progress=True)
            video.flush()  # every frame with the encoder, as the in-process bench's frames are on the host
            dt = time.perf_counter() - t0
        extra = f"; {compilations() - before} compilations during the video" if fast else ""
        if fast and compilations() > before:  # the warm-up missed a call: TORCH_LOGS=recompiles names it
            extra += " (the warm-up missed them: TORCH_LOGS=recompiles says which)"
        print(f"wrote {path}: {video.frames} frames {shape[2] * 8}x{shape[3] * 8} in {dt:.2f}s "
              f"({video.frames / dt:.1f} FPS, text encoding and decoding included; first frames after {first:.2f}s"
              f"{extra})")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill unwinds VideoFile: no temporary file left
    main()
