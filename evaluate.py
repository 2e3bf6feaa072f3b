"""Held-out evaluation with fixed noise: every generator sees the same prompts and the same noises, so two
generators (or two training steps) are compared sample by sample, as the paper's Table 1 compares a base
model with its Astrolabe-trained version on HPSv3 / MQ / TA.

    python evaluate.py --model checkpoints/Wan2.1-T2V-1.3B-Diffusers --checkpoint checkpoints/self_forcing_dmd.pt \\
        --checkpoint_key generator_ema --lora_b out/ckpt-000400 --prompts prompts/eval.txt --eval_seeds 8 \\
        --reward hpsv3:1,videoalign_mq:1,videoalign_ta:1 --hpsv3 checkpoints/HPSv3.safetensors \\
        --videoalign checkpoints/VideoReward --out_dir eval/

Writes scores.csv (one row per generator, prompt and seed), summary.md (per reward mean +/- standard error;
with --lora_b also the paired difference B - A +/- standard error and B's win rate) and grid.png (first,
middle and last frame of each prompt's first seed, A then B). train.py's evaluation runs score_samples too.
"""
import argparse
import contextlib
import os

import torch

import checkpoints
from config import read_prompts
from fast import PAYS_FROM_FRAMES, compiled, wanted
from rewards import build_reward, check_rewards, parse_spec
from evaluation import save_grid, score_samples, table, write_scores


class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the docstring as written, every flag with its default."""


p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
p.add_argument("--model", default=None, help="diffusers Wan2.1-T2V folder (default: the tiny built-in model)")
p.add_argument("--checkpoint", default=None, help="original-layout generator: Self-Forcing, Causal-Forcing, LongLive base")
p.add_argument("--checkpoint_key", default=None, help="entry of --checkpoint to use (generator_ema, generator)")
p.add_argument("--base_lora", default=None, help="LongLive lora.pt, merged into the base")
p.add_argument("--base_lora_alpha", type=float, default=None,
               help="LoRA alpha of --base_lora (default: its rank r, read from the tensors; LongLive uses 256 / 256)")
p.add_argument("--lora", default=None, help="generator A = base + this train.py checkpoint folder (default: the base)")
p.add_argument("--lora_b", default=None, help="generator B = base + this train.py checkpoint folder: compare B with A")
p.add_argument("--prompts", default="prompts/eval.txt", help="prompt file, one per line")
p.add_argument("--eval_seeds", type=int, default=4, help="noises per prompt (seeds 0 .. N-1)")
p.add_argument("--seed", type=int, default=0, help="base seed of the fixed noises")
p.add_argument("--reward", default="hpsv3:1,videoalign_mq:1,videoalign_ta:1", help="reward spec, as train.py's --reward")
p.add_argument("--hpsv3", default=None, help="HPSv3.safetensors")
p.add_argument("--hpsv3_tokenizer", default=None, help="Qwen2-VL-7B-Instruct tokenizer folder")
p.add_argument("--videoalign", default=None, help="VideoReward checkpoint folder")
p.add_argument("--videoalign_base", default=None, help="Qwen2-VL-2B-Instruct folder (VideoReward's LoRA form only)")
p.add_argument("--frames", type=int, default=21, help="latent frames per video")
p.add_argument("--frames_per_block", type=int, default=3, help="latent frames generated together (one block)")
p.add_argument("--sink_frames", type=int, default=3, help="sink frames kept in the cache forever")
p.add_argument("--window_frames", type=int, default=21, help="most recent frames attended besides the sink")
p.add_argument("--height", type=int, default=None, help="pixels (default: the generator's)")
p.add_argument("--width", type=int, default=None, help="pixels, as --height")
p.add_argument("--batch", type=int, default=4, help="seeds of one prompt per generate call")
p.add_argument("--grid", type=int, default=8, help="prompts shown in grid.png (first seed of each)")
p.add_argument("--out_dir", default="eval", help="scores.csv, summary.md and grid.png go here")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
p.add_argument("--fast", type=int, default=None, choices=(0, 1, 2),
               help="compiled block stages and decoder (1, on a GPU) or the eager path (0); 2 compiles on any device; "
                    f"default: 1 on a GPU when the evaluation generates at least {PAYS_FROM_FRAMES} latent frames")


def check_args(a):
    """Every flag, file and folder, before any generator is built (B's folder too: not found after A's run)."""
    prompts = read_prompts(a.prompts)
    if a.eval_seeds < 1 or a.batch < 1 or a.grid < 0 or a.frames_per_block < 1:
        raise SystemExit(f"error: --eval_seeds {a.eval_seeds}, --batch {a.batch}, --frames_per_block {a.frames_per_block} "
                         f"must be >= 1 and --grid {a.grid} >= 0")
    if a.frames <= 0 or a.frames % a.frames_per_block:
        raise SystemExit(f"error: --frames {a.frames} is not a whole number of {a.frames_per_block}-frame blocks")
    if a.base_lora_alpha is not None and not a.base_lora_alpha > 0:
        raise SystemExit(f"error: --base_lora_alpha {a.base_lora_alpha} must be positive")
    if not 0 <= a.sink_frames <= a.window_frames or a.window_frames < a.frames_per_block:
        raise SystemExit(f"error: --sink_frames {a.sink_frames} / --window_frames {a.window_frames}: need 0 <= sink <= window and a window of at "
                         f"least one block ({a.frames_per_block} frames)")
    for flag in ("height", "width"):  # the VAE downsamples by 8 and the patch embedding by 2 more
        if getattr(a, flag) is not None and (getattr(a, flag) < 16 or getattr(a, flag) % 16):
            raise SystemExit(f"error: --{flag} {getattr(a, flag)} must be a positive multiple of 16")
    if not 0 <= a.seed < 2 ** 63:  # as train.py's seed (config.check_config), whose evaluation this repeats
        raise SystemExit(f"error: --seed {a.seed} must lie in [0, 2^63)")
    try:
        names = [name for name, _ in parse_spec(a.reward)]
        for flag in ("model", "checkpoint", "base_lora", "hpsv3", "videoalign", "videoalign_base"):
            if getattr(a, flag) and not os.path.exists(getattr(a, flag)):
                raise FileNotFoundError(f"--{flag} {getattr(a, flag)} does not exist")
        if a.model:
            checkpoints.check_model_dir(a.model)
        for flag in ("lora", "lora_b"):
            if getattr(a, flag):
                checkpoints.check_trained(getattr(a, flag))
        check_rewards(names, a)  # train.py's check: a model reward without its --hpsv3 / --videoalign is refused
        if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"--device {a.device}: no CUDA GPU is available")
    except (ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    if os.path.exists(a.out_dir) and not os.path.isdir(a.out_dir):
        raise SystemExit(f"error: --out_dir {a.out_dir} is a file, not a folder")
    try:
        os.makedirs(a.out_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --out_dir {a.out_dir} cannot be created ({e.strerror or e})") from None
    if not os.access(a.out_dir, os.W_OK):
        raise SystemExit(f"error: --out_dir {a.out_dir} is not writable")
    return prompts


def main(argv=None):
    a = p.parse_args(argv)
    prompts = check_args(a)
    dev = torch.device(a.device)
    paths = {"hpsv3": a.hpsv3, "hpsv3_tokenizer": a.hpsv3_tokenizer, "videoalign": a.videoalign,
             "videoalign_base": a.videoalign_base}
    reward_fn = build_reward(a.reward, dev, {k: v for k, v in paths.items() if v})
    amp = (lambda: torch.autocast("cuda", torch.bfloat16)) if dev.type == "cuda" else contextlib.nullcontext
    seeds, runs, grid = list(range(a.eval_seeds)), {}, {}
    fast = wanted(a.fast, dev, len(prompts) * a.eval_seeds * a.frames * (2 if a.lora_b else 1))
    if fast:
        torch.backends.cudnn.benchmark = True  # the compiled path's process-wide settings (why: fast.py)
        torch._dynamo.config.recompile_limit = 64
    for label, lora in [("A", a.lora)] + ([("B", a.lora_b)] if a.lora_b else []):
        wan = checkpoints.load(a.model, a.checkpoint, a.checkpoint_key, a.base_lora, a.base_lora_alpha,
                     dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
        if lora:
            checkpoints.load_trained(wan.model.transformer, lora)
        wan.to(dev)
        wan.height, wan.width = a.height or wan.height, a.width or wan.width

        def keep(i, chunk, video):
            if i < a.grid and chunk[0] == 0:
                grid.setdefault(i, []).append(video[0].cpu())
        print(f"generator {label}: {a.model or 'tiny'}" + (f" + {lora}" if lora else "") +
              (" (compiled block stages and decoder)" if fast else ""))
        with compiled(wan.model, wan.vae) if fast else contextlib.nullcontext():
            runs[label] = score_samples(wan.model, wan, reward_fn, prompts, seeds, a.frames, a.sink_frames, a.window_frames,
                                        a.frames_per_block, a.batch, a.seed, amp, keep, progress=True)
        del wan
    write_scores(os.path.join(a.out_dir, "scores.csv"), prompts, seeds, runs)
    text = table(runs, list(runs)) + f"\n\n{len(prompts)} prompts x {a.eval_seeds} seeds, fixed noise; A = " + \
        (a.lora or "base") + (f", B = {a.lora_b}" if a.lora_b else "") + "\n"
    with open(os.path.join(a.out_dir, "summary.md"), "w") as f:
        f.write(text)
    if grid:
        names = [f"A: {a.lora or 'base'}"] + ([f"B: {a.lora_b}"] if a.lora_b else [])
        save_grid(os.path.join(a.out_dir, "grid.png"), [grid[i] for i in sorted(grid)], names,
                  [prompts[i] for i in sorted(grid)])
    print(text + f"wrote {a.out_dir}/scores.csv, summary.md" + (", grid.png" if grid else ""))
    return runs


if __name__ == "__main__":
    main()
