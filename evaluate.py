"""Held-out evaluation with fixed noise: every generator sees the same prompts and the same noises, so two
generators (or two training steps) are compared sample by sample, as the paper's Table 1 compares a base
model with its Astrolabe-trained version on HPSv3 / MQ / TA.

    python evaluate.py --model checkpoints/Wan2.1-T2V-1.3B-Diffusers --checkpoint checkpoints/self_forcing_dmd.pt \\
        --checkpoint_key generator_ema --lora_b out/ckpt-000400 --prompts prompts/eval.txt --seeds 8 \\
        --reward hpsv3:1,videoalign_mq:1,videoalign_ta:1 --hpsv3 checkpoints/HPSv3.safetensors \\
        --videoalign checkpoints/VideoReward --out_dir eval/

Writes scores.csv (one row per generator, prompt and seed), summary.md (per reward mean +/- standard error;
with --lora_b also the paired difference B - A +/- standard error and B's win rate) and grid.png (first,
middle and last frame of each prompt's first seed, A then B). train.py's evaluation runs score_samples too.
"""
import argparse
import contextlib
import csv
import os

import imageio
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoints as C
import vae as V
from config import check_rewards, read_prompts
from fast import PAYS_FROM_FRAMES, compiled, wanted
from rewards import build_reward, parse_spec
from rollout import draw_noise, generate, new_cache, seed_of


@torch.no_grad()
def score_samples(net, wan, reward_fn, prompts, seeds, frames, sink, window, n=3, batch=16, seed=0,
                  amp=contextlib.nullcontext, on_frames=None, rank=0, world=1, progress=False):
    """Generate len(seeds) clips of `frames` latent frames per prompt and score them.

    Sample (prompt i, seed s) starts from draw_noise(seed_of(seed, i, s)), whatever the batch or the number of
    ranks, so every evaluation of the same prompts and seeds sees the same noises. Up to `batch` seeds of one
    prompt share a generate call. Ranks take turns over the calls and all run the same number of them (padding
    repeats a call unscored: sharded FSDP2 weights make every forward a collective). on_frames(i, seeds, video)
    sees each decoded batch. Returns {"composite" and each reward: float64 [len(prompts), len(seeds)]}, on
    every rank."""
    shape, dev = wan.latent_shape(frames), next(net.parameters()).device
    work = [(i, j) for i in range(len(prompts)) for j in range(0, len(seeds), batch)]
    keys = ["composite", *reward_fn.names]
    out = torch.zeros(len(keys), len(prompts), len(seeds), dtype=torch.float64)
    for w in tqdm(range(rank, -(-len(work) // world) * world, world), desc="evaluation", disable=not progress):
        i, j = work[w % len(work)]
        chunk = seeds[j:j + batch]
        noise = torch.cat([draw_noise(seed_of(seed, i, s), 1, shape, dev) for s in chunk])
        dec, blocks = V.Decoder(wan.vae), []  # progressive: each block decoded as soon as it is generated
        with amp():
            cache = new_cache(net, len(chunk), shape, sink, window, n)
            generate(net, net.text_kv(wan.text_encoder([prompts[i]])), noise, cache, 0, n, cache_last_block=False,
                     on_block=lambda x0: blocks.append(dec(x0)))
        if w >= len(work):  # padding: generated only to keep the ranks in step
            continue
        video = torch.cat(blocks, 1)
        r = reward_fn(video, [prompts[i]] * len(chunk))
        out[:, i, j:j + len(chunk)] = torch.stack([r[k].double() for k in keys])
        if on_frames:
            on_frames(i, chunk, video)
    if world > 1:  # each sample was scored on one rank, zeros elsewhere: a sum gathers them
        t = out.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        out = t.cpu()
    return dict(zip(keys, out))


def mean_se(x):
    """Mean and standard error (sample standard deviation / sqrt(n); 0 for one sample) of a float tensor."""
    x = x.double().flatten()
    return float(x.mean()), float(x.std() / len(x) ** 0.5) if len(x) > 1 else 0.0


def paired(a, b):
    """b against a, sample by sample: mean and standard error of b - a, and the fraction of samples where b is
    higher (ties count one half)."""
    d = (b.double() - a.double()).flatten()
    return (*mean_se(d), float(((d > 0).double() + 0.5 * (d == 0).double()).mean()))


def summary(scores, base=None, prefix="eval/"):
    """Flat log entries: per reward {prefix}k (mean), k_se; against `base` (same prompts and seeds):
    k_delta, k_delta_se and k_improved (the paired change and the fraction of samples that gained)."""
    row = {}
    for k, v in scores.items():
        row[f"{prefix}{k}"], row[f"{prefix}{k}_se"] = mean_se(v)
        if base is not None:
            row[f"{prefix}{k}_delta"], row[f"{prefix}{k}_delta_se"], row[f"{prefix}{k}_improved"] = paired(base[k], v)
    return row


def write_scores(path, prompts, seeds, runs):
    """runs: {generator label: scores}. One CSV row per generator, prompt and seed."""
    keys = list(next(iter(runs.values())))
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["generator", "prompt_index", "seed", "prompt", *keys])
        for label, sc in runs.items():
            for i, prompt in enumerate(prompts):
                for j, s in enumerate(seeds):
                    w.writerow([label, i, s, prompt, *(repr(float(sc[k][i, j])) for k in keys)])
    os.replace(tmp, path)


def read_scores(path, label):
    """The scores of one generator from a write_scores CSV, as score_samples returns them."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["generator"] == label]
    if not rows:
        raise ValueError(f"{path} has no rows for generator {label!r}")
    keys = [k for k in rows[0] if k not in ("generator", "prompt_index", "seed", "prompt")]
    P = 1 + max(int(r["prompt_index"]) for r in rows)  # rows are written prompt by prompt, seed by seed
    return {k: torch.tensor([float(r[k]) for r in rows], dtype=torch.float64).view(P, -1) for k in keys}


def table(runs, labels):
    """Markdown: per reward each generator's mean +/- s.e.; for two, B - A (paired) +/- s.e. and the fraction of
    samples where B is higher (ties one half)."""
    a = runs[labels[0]]
    b = labels[-1]
    head = ["reward", *(f"{x}: mean ± s.e." for x in labels)] + \
        ([f"{b} − {labels[0]} (paired) ± s.e.", f"{b} higher"] if len(labels) > 1 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for k in a:
        cells = [k] + ["%.4f ± %.4f" % mean_se(runs[x][k]) for x in labels]
        if len(labels) > 1:
            d, se, win = paired(a[k], runs[labels[1]][k])
            cells += [f"{d:+.4f} ± {se:.4f}", f"{100 * win:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_grid(path, rows, columns, prompts, frame_px=128):
    """rows: one list per prompt of videos [T, 3, H, W] in [0, 1], one per generator; each shows its first,
    middle and last frame side by side, generators separated by a white gap. Written as a PNG, frames scaled up
    (nearest) to about frame_px, with the generator names (`columns`) above and each row's prompt at its left.
    Returns where the frames lie: (scale, top, left) of the scaled mosaic in the image."""
    from PIL import Image, ImageDraw, ImageFont

    def strip(video):
        T = video.shape[0]
        return torch.cat([video[t] for t in (0, T // 2, T - 1)], 2)  # [3, H, 3W]
    lines = []
    for videos in rows:
        parts = [strip(v) for v in videos]
        gap = torch.ones(3, parts[0].shape[1], 4)
        lines.append(torch.cat([x for p in parts for x in (p, gap)][:-1], 2))
    img = torch.cat([x for line in lines for x in (line, torch.ones(3, 4, line.shape[2]))][:-1], 1)
    H, W = rows[0][0].shape[2:]
    k = max(1, -(-frame_px // H))
    mosaic = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    mosaic = mosaic.repeat(k, 0).repeat(k, 1)
    font = ImageFont.load_default(size=14)
    top, left = 44, 260
    canvas = Image.new("RGB", (left + mosaic.shape[1], top + mosaic.shape[0]), "white")
    canvas.paste(Image.fromarray(mosaic), (left, top))
    draw = ImageDraw.Draw(canvas)
    for g, name in enumerate(columns):
        draw.text((left + g * (3 * W + 4) * k, 4), str(name)[-40:], fill="black", font=font)
        draw.text((left + g * (3 * W + 4) * k, 24), "first | middle | last frame", fill="gray", font=font)
    for i, prompt in enumerate(prompts):
        text = f"{i}: {prompt}"
        wrapped = [text[j:j + 30] for j in range(0, min(len(text), 120), 30)]
        draw.multiline_text((4, top + i * (H + 4) * k), "\n".join(wrapped), fill="black", font=font)
    canvas.save(path)
    return k, top, left


p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default=None, help="diffusers Wan2.1-T2V folder (default: the tiny built-in model)")
p.add_argument("--checkpoint", default=None, help="original-layout generator: Self-Forcing, Causal-Forcing, LongLive base")
p.add_argument("--checkpoint_key", default=None, help="entry of --checkpoint to use (generator_ema, generator)")
p.add_argument("--base_lora", default=None, help="LongLive lora.pt, merged into the base")
p.add_argument("--base_lora_alpha", type=float, default=None,
               help="LoRA alpha of --base_lora (default: its rank r, read from the tensors; LongLive uses 256 / 256)")
p.add_argument("--lora", default=None, help="generator A = base + this train.py checkpoint folder (default: the base)")
p.add_argument("--lora_b", default=None, help="generator B = base + this train.py checkpoint folder: compare B with A")
p.add_argument("--prompts", default="prompts/eval.txt", help="prompt file, one per line")
p.add_argument("--seeds", type=int, default=4, help="noises per prompt (seeds 0 .. N-1)")
p.add_argument("--seed", type=int, default=0, help="base seed of the fixed noises")
p.add_argument("--reward", default="hpsv3:1,videoalign_mq:1,videoalign_ta:1", help="reward spec, as train.py's --reward")
p.add_argument("--hpsv3", default=None, help="HPSv3.safetensors")
p.add_argument("--hpsv3_tokenizer", default=None, help="Qwen2-VL-7B-Instruct tokenizer folder")
p.add_argument("--videoalign", default=None, help="VideoReward checkpoint folder")
p.add_argument("--videoalign_base", default=None, help="Qwen2-VL-2B-Instruct folder (VideoReward's LoRA form only)")
p.add_argument("--frames", type=int, default=21, help="latent frames per video")
p.add_argument("--frames_per_block", type=int, default=3)
p.add_argument("--sink", type=int, default=3)
p.add_argument("--window", type=int, default=21)
p.add_argument("--height", type=int, default=None, help="pixels (default: the generator's)")
p.add_argument("--width", type=int, default=None)
p.add_argument("--batch", type=int, default=4, help="seeds of one prompt per generate call")
p.add_argument("--grid", type=int, default=8, help="prompts shown in grid.png (first seed of each)")
p.add_argument("--out_dir", default="eval")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--fast", type=int, default=None, choices=(0, 1, 2),
               help="compiled block stages and decoder (1, on a GPU) or the eager path (0); 2 compiles on any device; "
                    f"default: 1 on a GPU when the evaluation generates at least {PAYS_FROM_FRAMES} latent frames")


def check_args(a):
    """Every flag, file and folder, before any generator is built (B's folder too: not found after A's run)."""
    prompts = read_prompts(a.prompts)
    if a.seeds < 1 or a.batch < 1 or a.grid < 0 or a.frames_per_block < 1:
        raise SystemExit(f"error: --seeds {a.seeds}, --batch {a.batch}, --frames_per_block {a.frames_per_block} "
                         f"must be >= 1 and --grid {a.grid} >= 0")
    if a.frames <= 0 or a.frames % a.frames_per_block:
        raise SystemExit(f"error: --frames {a.frames} is not a whole number of {a.frames_per_block}-frame blocks")
    if a.base_lora_alpha is not None and not a.base_lora_alpha > 0:
        raise SystemExit(f"error: --base_lora_alpha {a.base_lora_alpha} must be positive")
    if not 0 <= a.sink <= a.window or a.window < a.frames_per_block:
        raise SystemExit(f"error: --sink {a.sink} / --window {a.window}: need 0 <= sink <= window and a window of at "
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
            C.check_model_dir(a.model)
        for flag in ("lora", "lora_b"):
            if getattr(a, flag):
                C.check_trained(getattr(a, flag))
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
    seeds, runs, grid = list(range(a.seeds)), {}, {}
    fast = wanted(a.fast, dev, len(prompts) * a.seeds * a.frames * (2 if a.lora_b else 1))
    for label, lora in [("A", a.lora)] + ([("B", a.lora_b)] if a.lora_b else []):
        wan = C.load(a.model, a.checkpoint, a.checkpoint_key, a.base_lora, a.base_lora_alpha,
                     dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
        if lora:
            C.load_trained(wan.model.transformer, lora)
        wan.to(dev)
        wan.height, wan.width = a.height or wan.height, a.width or wan.width

        def keep(i, chunk, video):
            if i < a.grid and chunk[0] == 0:
                grid.setdefault(i, []).append(video[0].cpu())
        print(f"generator {label}: {a.model or 'tiny'}" + (f" + {lora}" if lora else "") +
              (" (compiled block stages and decoder)" if fast else ""))
        with compiled(wan.model, wan.vae) if fast else contextlib.nullcontext():
            runs[label] = score_samples(wan.model, wan, reward_fn, prompts, seeds, a.frames, a.sink, a.window,
                                        a.frames_per_block, a.batch, a.seed, amp, keep, progress=True)
        del wan
    write_scores(os.path.join(a.out_dir, "scores.csv"), prompts, seeds, runs)
    text = table(runs, list(runs)) + f"\n\n{len(prompts)} prompts x {a.seeds} seeds, fixed noise; A = " + \
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
