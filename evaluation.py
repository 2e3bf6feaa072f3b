"""Held-out evaluation with fixed noise (evaluate.py's and train.py's): the same prompts and noises for every
generator, scored per sample, so two generators (or two training steps) compare sample by sample, as the
paper's Table 1 compares a base model with its Astrolabe-trained version; the paired statistics, the scores'
CSV and the comparison grid."""
import contextlib
import csv
import os

import torch
import torch.distributed as dist
from tqdm import tqdm

import fast
import vae
from files import save_video
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
        dec, blocks = vae.Decoder(wan.vae), []  # progressive: each block decoded as soon as it is generated
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


@torch.no_grad()
def evaluate_theta(step, cfg, ctx):
    """train.py's held-out evaluation: theta on the held-out prompts x eval_seeds fixed noises (score_samples),
    through the compiled sampling path where ctx.fast_eval; per-sample scores, also written to
    samples/scores_stepNNNNN.csv; an mp4 of each prompt's first seed."""
    net, out, dev = ctx.policy.net("default"), os.path.join(cfg.out_dir, "samples"), ctx.device
    os.makedirs(out, exist_ok=True)

    def save(i, seeds, video):
        if seeds[0] == 0:
            save_video(video[0], os.path.join(out, f"step{step:05d}_prompt{i}.mp4"))
            ctx.log and ctx.log.frames(f"eval/sample/prompt{i}", video[0], step)
    seeds = list(range(cfg.eval_seeds))
    amp = lambda: torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda")  # noqa: E731 (as training)
    with fast.compiled(net, ctx.wan.vae) if ctx.fast_eval else contextlib.nullcontext():
        scores = score_samples(net, ctx.wan, ctx.reward_fn, ctx.eval_prompts, seeds, cfg.eval_frames, cfg.sink_frames,
                               cfg.window_frames, cfg.frames_per_block, cfg.micro_batch, cfg.seed, amp, save, ctx.rank,
                               ctx.world)
    if ctx.rank == 0:
        write_scores(os.path.join(out, f"scores_step{step:05d}.csv"), ctx.eval_prompts, seeds, {"theta": scores})
    return scores
