"""Sample a video: python sample.py --prompt "a red fox runs through snow" --frames 21 --out fox.mp4

Multi-prompt: --prompt "a fox sleeps|the fox wakes up|the fox runs" --switch 9,18 (latent frames).
With no --model it uses the tiny built-in model (random weights: the video is noise, the code path
is the real one). See README.md for real checkpoints.
"""
import argparse
import os
import signal
import sys
import time

import imageio
import torch

import checkpoints as C
import vae as V
from files import remove_stale_tmp
from rollout import draw_noise, generate, new_cache

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--prompt", required=True, help="a prompt, or several separated by '|' (then give --switch)")
p.add_argument("--switch", default="", help="comma-separated latent frames where the next prompt starts")
p.add_argument("--model", default=None, help="diffusers Wan2.1-T2V folder (default: the tiny built-in model)")
p.add_argument("--checkpoint", default=None, help="original-layout generator: Self-Forcing, Causal-Forcing, LongLive base")
p.add_argument("--checkpoint_key", default=None, help="entry of --checkpoint to use (generator_ema, generator)")
p.add_argument("--base_lora", default=None, help="LongLive lora.pt, merged into the base")
p.add_argument("--lora", default=None, help="a checkpoint folder written by train.py")
p.add_argument("--frames", type=int, default=21, help="latent frames (pixel frames = 1 + 4 (frames - 1))")
p.add_argument("--frames_per_block", type=int, default=3)
p.add_argument("--sink", type=int, default=3, help="sink frames kept in the cache forever")
p.add_argument("--window", type=int, default=21, help="most recent frames attended besides the sink")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (default: the generator's; "
                                                        "a checkpoint samples best at the size it was trained at)")
p.add_argument("--width", type=int, default=None)
p.add_argument("--out", default="video.mp4")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--fast", type=int, default=1,
               help="on GPU: compiled block stages, CUDA graphs and compiled decoder (1, default) or the eager path (0)")


class VideoFile:
    """An mp4 written frame by frame as blocks are decoded, under a temporary name renamed when complete:
    memory stays bounded by a block, and a crash never leaves a half-written file at `path`."""

    def __init__(self, path, fps=16):
        self.path = path
        self.tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{os.getpid()}-{os.path.basename(path)}")
        self.writer = imageio.get_writer(self.tmp, fps=fps, format="FFMPEG", macro_block_size=1)
        self.frames = 0

    def write(self, frames):
        """frames [F, 3, H, W] in [0, 1]"""
        for f in (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy():
            self.writer.append_data(f)
        self.frames += frames.shape[0]

    def __enter__(self):
        return self

    def __exit__(self, error, *_):
        self.writer.close()
        if error is None:
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)


def save_video(frames, path, fps=16):
    """frames [F, 3, H, W] in [0, 1] -> mp4, never half-written."""
    with VideoFile(path, fps) as video:
        video.write(frames)


def check_args(a):
    """Every user error, before any weight is loaded or frame generated."""
    prompts = a.prompt.split("|")
    if any(not q.strip() for q in prompts):
        raise SystemExit(f"error: empty prompt in --prompt {a.prompt!r}")
    if a.frames_per_block < 1:
        raise SystemExit(f"error: --frames_per_block {a.frames_per_block} must be at least 1")
    if a.frames <= 0 or a.frames % a.frames_per_block:
        raise SystemExit(f"error: --frames {a.frames} is not a whole number of {a.frames_per_block}-frame blocks")
    if not 0 <= a.sink <= a.window or a.window < a.frames_per_block:
        raise SystemExit(f"error: --sink {a.sink} / --window {a.window}: need 0 <= sink <= window and a window of at "
                         f"least one block ({a.frames_per_block} frames)")
    try:
        switches = [int(f) for f in a.switch.split(",") if f.strip()]
    except ValueError:
        raise SystemExit(f"error: --switch {a.switch!r} is not a comma-separated list of latent frames") from None
    if len(switches) != len(prompts) - 1:
        raise SystemExit(f"error: {len(prompts)} prompts need {len(prompts) - 1} --switch frames, got {switches}")
    if switches != sorted(set(switches)) or any(not 0 < f < a.frames or f % a.frames_per_block for f in switches):
        raise SystemExit(f"error: --switch {switches} must be increasing block starts inside (0, {a.frames})")
    out_dir = os.path.dirname(os.path.abspath(a.out))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK) or os.path.isdir(a.out):
        raise SystemExit(f"error: cannot write --out {a.out}")
    if os.path.splitext(a.out)[1].lower() != ".mp4":
        raise SystemExit(f"error: --out {a.out!r} must end in .mp4 (the video is written with ffmpeg as mp4)")
    for flag in ("height", "width"):  # the VAE downsamples by 8 and the patch embedding by 2 more
        if getattr(a, flag) is not None and (getattr(a, flag) < 16 or getattr(a, flag) % 16):
            raise SystemExit(f"error: --{flag} {getattr(a, flag)} must be a positive multiple of 16")
    for flag in ("model", "checkpoint", "base_lora", "lora"):
        if getattr(a, flag) and not os.path.exists(getattr(a, flag)):
            raise SystemExit(f"error: --{flag} {getattr(a, flag)} does not exist")
    try:  # the folders' contents too: a wrong folder is named now, not after the generator is built
        if a.model:
            C.check_model_dir(a.model)
        if a.lora:
            C.check_trained(a.lora)
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
    return prompts, switches


def main(argv=None):
    a = p.parse_args(argv)
    prompts, switches = check_args(a)
    remove_stale_tmp(os.path.dirname(os.path.abspath(a.out)))
    cuda = a.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    try:  # the loaders raise ValueError / OSError naming the bad file, key or value: one line, no traceback
        wan = C.load(a.model, a.checkpoint, a.checkpoint_key, a.base_lora, dtype=dtype)
        if a.lora:
            C.load_trained(wan.model.transformer, a.lora)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if a.frames > wan.model.max_frames:  # cached keys keep absolute positions: the RoPE table bounds the video
        raise SystemExit(f"error: --frames {a.frames} is past the generator's {wan.model.max_frames}-frame RoPE table")
    wan.to(a.device)
    wan.height, wan.width = a.height or wan.height, a.width or wan.width
    m, n, shape = wan.model, a.frames_per_block, wan.latent_shape(a.frames)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cache = new_cache(m, 1, shape, a.sink, a.window, n)  # one cache: its addresses key the CUDA graphs
    if cuda and a.fast:  # compiled block stages, CUDA graphs, compiled decoder: a dry run compiles and captures
        t0 = time.perf_counter()
        m.compile_blocks().cuda_graphs()
        V.speed_up(wan.vae)
        # every cache slot a block can sit in is met by the time the window is full: capture them all now
        dry = wan.latent_shape(min(a.frames, (a.sink + a.window) // n * n + n))
        generate(m, m.text_kv(wan.text_encoder([prompts[0]])), draw_noise(a.seed, 1, dry, a.device), cache, 0, n,
                 cache_last_block=False)
        cache.reset()
        V.decode(wan.vae, torch.randn(1, *wan.latent_shape(3 + V.Decoder(wan.vae).chunk), device=a.device))  # 3 layouts
        sync()
        print(f"compile, CUDA graph capture and warm-up: {time.perf_counter() - t0:.1f}s (once per process)")
    t0 = time.perf_counter()
    first = []
    with VideoFile(a.out) as video:
        kvs = [m.text_kv(wan.text_encoder([q])) for q in prompts]
        decoder = V.Decoder(wan.vae)

        def on_block(x0):  # progressive: each block is decoded and written as soon as it is generated
            for part in (x0[:, :, :1], x0[:, :, 1:]) if decoder.frames == 0 else (x0,):  # first frame out at once
                video.write(decoder(part)[0])
                if not first:
                    first.append(time.perf_counter() - t0)

        generate(m, kvs[0], draw_noise(a.seed, 1, shape, a.device), cache, 0, n,
                 switches=list(zip(switches, kvs[1:])), progress=True, on_block=on_block, cache_last_block=False)
        sync()
        dt = time.perf_counter() - t0
    print(f"wrote {a.out}: {video.frames} frames {shape[2] * 8}x{shape[3] * 8} in {dt:.2f}s "
          f"({video.frames / dt:.1f} FPS, text encoding and decoding included; first frames after {first[0]:.2f}s)")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill unwinds VideoFile: no temporary file left
    main()
