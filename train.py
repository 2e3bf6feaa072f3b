"""Astrolabe RL trainer (paper Algorithm 1, Eq. 1-4) with Streaming Long Tuning.

    python train.py                                   # tiny model, offline rewards, CPU demo (< 5 min)
    torchrun --nproc_per_node 8 train.py --preset=self_forcing --steps=200
    python train.py report out/log.jsonl              # reward curves -> PNG (needs matplotlib)

Config: config.py's dataclass; a preset first, then any field as --key=value.
Every random draw is a function of (seed, step, rank), so a resumed run equals an unbroken one.
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import evaluate as E
import fast
import loss as L
import checkpoints as C
import model as M
import offload
import vae as V
from config import check_config, check_frames, check_paths, parse_config, read_prompts
from files import remove_stale_tmp
from logs import RunLog, check_log
from policy import ClipForward, Policy, clean_stale, full_tensor, load_checkpoint, save_checkpoint
from rewards import build_reward
from run_dir import claim_on_rank0, release, trim_log
from rollout import SIGMAS, clip_velocity, draw_noise, group_rollout, seed_of
from sample import save_video


def autocast(device):
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def all_sum(*xs):
    t = torch.tensor([float(x) for x in xs], dtype=torch.float64)
    if dist.is_initialized():
        t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
    return t.cpu().tolist()


class Laps:
    """Wall time and peak memory of a step's phases: lap(name) ends the running phase and starts `name`
    (None: ends it). On CUDA each boundary synchronises (a few per step, none per micro-batch) and resets the
    peak-memory counter. The host-to-device copies of parked models (offload.MOVED) are taken out of the
    phase they happen in and counted as "transfer", so the phases add up to the step. hook(name), if given,
    runs at each boundary after the synchronisation with the phase that ends (bench.py counts FLOPs there)."""

    def __init__(self, device, hook=None):
        self.cuda, self.hook, self.name = device.type == "cuda", hook, None
        self.times, self.peak_gb = {"transfer": 0.0}, {}

    def __call__(self, name):
        if self.cuda:
            torch.cuda.synchronize()
        now, moved = time.perf_counter(), offload.MOVED["seconds"]
        if self.name is not None:
            self.hook and self.hook(self.name)
            self.times["transfer"] += moved - self.moved
            self.times[self.name] = self.times.get(self.name, 0.0) + now - self.t0 - (moved - self.moved)
            if self.cuda:
                self.peak_gb[self.name] = max(self.peak_gb.get(self.name, 0.0), torch.cuda.max_memory_allocated() / 1e9)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.name, self.t0, self.moved = name, now, moved


def train_step(step, cfg, ctx):
    """One step of Algorithm 1 on this rank (paper Sec. 3, Eq. 1-4; README "Training"); returns the step's metrics."""
    P, G, n, m, dev = cfg.prompts_per_rank, cfg.group_size, cfg.frames_per_block, cfg.micro_batch, ctx.device
    lap, t0, moved = Laps(dev, getattr(ctx, "lap_hook", None)), time.perf_counter(), offload.MOVED["bytes"]
    # 1. clip start s, the same on every rank (drawn from the shared seed); s = 0 trains the first clip
    shared = torch.Generator().manual_seed(seed_of(cfg.seed, step))
    s = n * int(torch.randint(0, cfg.max_history_frames // n + 1, (1,), generator=shared))
    s = s if cfg.clip_start is None else cfg.clip_start
    order = torch.randperm(len(ctx.prompts), generator=shared).tolist()
    prompts = [ctx.prompts[order[(ctx.rank * P + j) % len(order)]] for j in range(P)]
    # 2. per prompt: history once with theta_old (no grad), then G candidate clips from the shared prefix (Eq. 3).
    # Draws are keyed by the prompt's place in the step (rank * P + j), not by rank: a step computes the same on
    # any number of ranks (test_astrolabe.py checks 2 processes against 1)
    old, groups = ctx.policy.rollout_net(), []
    with torch.no_grad(), autocast(dev):
        for j, prompt in enumerate(prompts):
            lap("text")
            text = ctx.wan.text_encoder([prompt])
            lap("history")
            hist = draw_noise(seed_of(cfg.seed, step, ctx.rank * P + j, 0), 1, ctx.wan.latent_shape(s), dev)
            clip = draw_noise(seed_of(cfg.seed, step, ctx.rank * P + j, 1), G, ctx.wan.latent_shape(cfg.clip_frames), dev)
            kv_old = old.text_kv(text)  # theta_old's text K/V: used again for its clip caches below
            groups.append((prompt, text, kv_old, group_rollout(old, kv_old, hist, clip, cfg.sink_frames,
                                                               cfg.window_frames, n, m, lambda: lap("clips"))))
            del hist, clip  # the clip noise grows with G (0.46 GB at G = 24): not kept through the step
    # 3. decode each candidate clip as the window of its video (the decoder state after the history, shared by
    # the group like the KV prefix; vae.py) and score it: 4 F pixel frames for s > 0, 1 + 4 (F - 1) for s = 0
    scores, reward_s = [], {}
    for prompt, _, _, g in groups:
        lap("decode")
        dec = V.history_decoder(ctx.wan.vae, g.history)
        frames = None  # in (pinned) host memory, scored per micro-batch: GPU memory stays flat in G (offload.py)
        for i in range(0, G, m):
            x = dec.fork(min(m, G - i))(g.clips[i:i + m])
            frames = offload.host_buffer("frames", (G, *x.shape[1:]), x.dtype, dev) if frames is None else frames
            frames[i:i + x.shape[0]].copy_(x, non_blocking=True)
        lap("reward")
        scores.append(ctx.reward_fn(frames, [prompt] * G, batch=m, device=dev))
        for k, v in getattr(ctx.reward_fn, "seconds", {}).items():  # each reward's share (CompositeReward)
            reward_s[k] = reward_s.get(k, 0.0) + v
        del dec, frames  # training needs neither: G x 48 frames of 480 x 832 in fp32 are 5.5 GB at G = 24
    lap("train")
    rewards = {k: torch.cat([sc[k] for sc in scores]).to(dev) for k in scores[0]}
    # 4. advantages (Eq. 4) and the uncertainty mask, both over the whole step on all ranks
    A, r = L.advantages(rewards["composite"], G, cfg.a_max)
    ctx.spread = {**{f"reward/{k}": v for k, v in rewards.items()}, "advantage": A}  # this rank's, for histograms
    mask = ctx.ctrl.uncertainty_mask(rewards["composite"], torch.stack([rewards[k] for k in ctx.reward_fn.names], 1))
    # 5. Eq. 1, 2 + selective KL, per micro-batch, in the rollout's attention layout
    N, mask_host = P * G, mask.cpu()  # one transfer: the loop below branches on it
    micro = [(j, i) for j in range(P) for i in range(0, G, m)]
    # the reference forward runs only where the KL applies; sharded (FSDP2) weights make every forward a
    # collective, so then all ranks decide together. The KL is a mean over the step's masked samples on all
    # ranks: each rank divides by masked_total / world, as gradients are averaged over ranks (one all-reduce)
    need_ref = [bool(mask_host[j * G + i:j * G + i + m].any()) for j, i in micro]
    masked_total, *any_ref = all_sum(mask_host.sum(), *need_ref)
    if not ctx.policy.lora:
        need_ref = [x > 0 for x in any_ref]
    policy_loss = kl_sum = torch.zeros((), device=dev)  # accumulated on the device: no host sync per micro-batch
    for k, (j, i) in enumerate(micro):
        _, text, kv_old, g = groups[j]
        if i == 0:
            noise_gen = torch.Generator().manual_seed(seed_of(cfg.seed, step, ctx.rank * P + j, 2))
        b = min(m, G - i)
        sl, x0 = slice(j * G + i, j * G + i + b), g.clips[i:i + b]
        sigma = torch.tensor(SIGMAS)[torch.randint(len(SIGMAS), (b,), generator=noise_gen)].to(dev)
        x_t = M.add_noise(x0, torch.randn(x0.shape, generator=noise_gen).to(dev), sigma)
        with torch.no_grad(), autocast(dev):
            net = ctx.policy.rollout_net()
            cache = g.clip_cache(net, kv_old, i, b, n)  # history prefix + the candidates' clean clip K/V
            x0_old = M.to_x0(x_t, clip_velocity(net, x_t, sigma, kv_old, cache, g.start, n), sigma)
            x0_ref = None
            if need_ref[k]:
                net = ctx.policy.net("ref")
                x0_ref = M.to_x0(x_t, clip_velocity(net, x_t, sigma, net.text_kv(text), cache, g.start, n), sigma)
        ctx.policy.net("default")
        last = k == len(micro) - 1
        with (ctx.train_net.no_sync() if hasattr(ctx.train_net, "no_sync") and not last else torch.enable_grad()):
            with autocast(dev):
                x0_theta = M.to_x0(x_t, ctx.train_net(text, x_t, sigma, cache, g.start), sigma)
            loss = L.policy_loss(x0_theta, x0_old, x0, r[sl], cfg.beta, n=N)
            if x0_ref is not None:
                loss = loss + L.kl_loss(x0_theta, x0_ref, mask[sl], cfg.kl_weight, masked_total / ctx.world)
                kl_sum = kl_sum + ((x0_theta.detach() - x0_ref).square().flatten(1).mean(1) * mask[sl]).sum()
            loss.backward()
        policy_loss = policy_loss + loss.detach()
        del cache  # before the next micro-batch builds its own (10.3 GB for 3 candidates at the 1.3B size)
    lap("optimizer")
    # 6-8. optimizer step, EMA of theta_old, dynamic reference
    params = ctx.policy.params("default")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    if not math.isfinite(grad_norm):  # before the optimizer step: theta stays as it was
        raise RuntimeError(f"step {step}: the gradient norm is {grad_norm} (lr={cfg.lr}, rewards "
                           f"{ {k: float(v.double().abs().max()) for k, v in rewards.items()} } at most)")
    ctx.opt.step()
    ctx.opt.zero_grad(set_to_none=True)
    L.ema_(ctx.policy.params("old"), params, cfg.gamma)
    ctx.policy.merge_old()  # the rollouts' merged copy follows theta_old
    kl = all_sum(kl_sum)[0] / max(masked_total, 1)
    reset = ctx.ctrl.should_reset_reference(kl)
    if reset:
        L.copy_(ctx.policy.params("ref"), params)
    lap(None)
    # float64, and the spread from centred values: a statistic stays finite whenever the rewards are
    comp64, flat = rewards["composite"].double(), (lambda R: float((R.amax(1) == R.amin(1)).sum()))
    sums = all_sum(*(float(v.double().sum()) for v in rewards.values()), flat(rewards["composite"].view(-1, G)),
                   float(A.abs().sum()), float((A.abs() >= cfg.a_max).sum()), N, policy_loss)
    count = sums[-2]
    means = {f"reward/{k}": v / count for k, v in zip(rewards, sums)}
    comp = means["reward/composite"]
    return dict(step=step, clip_start=s, **means, flat_groups=int(sums[len(rewards)]),
                composite_std=(all_sum(float((comp64 - comp).square().sum()))[0] / count) ** 0.5,
                adv_abs_mean=sums[len(rewards) + 1] / count, adv_clipped=sums[len(rewards) + 2] / count,
                policy_loss=sums[-1] / ctx.world, kl=kl, masked=masked_total / count, rho=ctx.ctrl.rho,
                tau_kl=ctx.ctrl.tau_kl, ref_reset=reset, grad_norm=grad_norm,
                step_time=time.perf_counter() - t0, **{f"time/{k}": v for k, v in lap.times.items()},
                **{f"time/reward/{k}": v for k, v in reward_s.items()}, transfer_gb=(offload.MOVED["bytes"] - moved) / 1e9,
                **{f"peak_gb/{k}": v for k, v in lap.peak_gb.items()}, peak_mem_gb=max(lap.peak_gb.values(), default=0.0))


@torch.no_grad()
def evaluate(step, cfg, ctx):
    """theta on the held-out prompts x eval_seeds fixed noises (evaluate.score_samples): per-sample scores,
    also written to samples/scores_stepNNNNN.csv; an mp4 of each prompt's first seed."""
    net, out = ctx.policy.net("default"), os.path.join(cfg.out_dir, "samples")
    os.makedirs(out, exist_ok=True)

    def save(i, seeds, video):
        if seeds[0] == 0:
            save_video(video[0], os.path.join(out, f"step{step:05d}_prompt{i}.mp4"))
            ctx.log and ctx.log.frames(f"eval/sample/prompt{i}", video[0], step)
    seeds = list(range(cfg.eval_seeds))
    with fast.compiled(net, ctx.wan.vae) if ctx.fast_eval else contextlib.nullcontext():
        scores = E.score_samples(net, ctx.wan, ctx.reward_fn, ctx.eval_prompts, seeds, cfg.eval_frames,
                                 cfg.sink_frames, cfg.window_frames, cfg.frames_per_block, cfg.micro_batch, cfg.seed,
                                 lambda: autocast(ctx.device), save, ctx.rank, ctx.world)
    if ctx.rank == 0:
        E.write_scores(os.path.join(out, f"scores_step{step:05d}.csv"), ctx.eval_prompts, seeds, {"theta": scores})
    return scores


def build(cfg, wan=None, reward_fn=None, claim=False):
    """Everything a run needs, on this rank's device: prompts, generator, rewards, policies, optimizer.
    claim: first make out_dir this run's (run_dir.claim), before any model is built."""
    ctx = type("Context", (), {})()
    ctx.prompts, ctx.eval_prompts = read_prompts(cfg.prompts), read_prompts(cfg.eval_prompts)
    check_paths(cfg, generator=wan is None, rewards=reward_fn is None)
    ctx.rank, ctx.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    ctx.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")  # CPU threads: OMP_NUM_THREADS (torchrun sets 1 per process)
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    if ctx.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if ctx.device.type == "cuda" else "gloo")
    if claim:
        claim_on_rank0(cfg.out_dir, cfg.resume, cfg.overwrite, ctx.rank, ctx.world)
    paths = {"hpsv3": cfg.hpsv3, "hpsv3_tokenizer": cfg.hpsv3_tokenizer, "videoalign": cfg.videoalign,
             "videoalign_base": cfg.videoalign_base}
    ctx.reward_fn = reward_fn or build_reward(cfg.reward, ctx.device, {k: v for k, v in paths.items() if v})
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    ctx.wan = (wan or C.load(cfg.model, cfg.checkpoint, cfg.checkpoint_key, cfg.base_lora, cfg.base_lora_alpha,
                             dtype=dtype)).to(ctx.device)
    ctx.wan.height, ctx.wan.width = cfg.height or ctx.wan.height, cfg.width or ctx.wan.width
    # umT5 and the reward models wait in pinned CPU memory outside their phase (offload.py; no-op on the CPU)
    offload.park(ctx.wan.text_encoder.encoder.requires_grad_(False), ctx.device)
    for model in filter(None, getattr(ctx.reward_fn, "models", [])):
        offload.park(model, ctx.device)
    torch.manual_seed(cfg.seed)  # after loading: load_tiny seeds its fixed weights itself; the LoRA init follows --seed
    ctx.policy = Policy(cfg, ctx.wan, ctx.world)
    ctx.train_net = ClipForward(ctx.policy.model, cfg.frames_per_block)
    if ctx.world > 1 and ctx.policy.lora:
        ctx.train_net = torch.nn.parallel.DistributedDataParallel(ctx.train_net, broadcast_buffers=False)
    ctx.opt = torch.optim.AdamW(ctx.policy.params("default"), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=cfg.weight_decay)
    ctx.ctrl = L.Controller(cfg.rho, tau_kl=cfg.tau_kl, k_max=cfg.k_max)
    # the decoded clips' host buffer (train_step), pinned now: pinning 5.5 GB would take seconds of the first step
    offload.host_buffer("frames", (cfg.group_size, 4 * cfg.clip_frames, 3, ctx.wan.height, ctx.wan.width),
                        torch.float32, ctx.device)
    # the held-out evaluations through the compiled sampling path (fast.py) where the run's evaluations, all
    # together, generate enough to pay for compiling; not on FSDP2-sharded weights (each forward a collective)
    evals = (cfg.steps // cfg.eval_every + 1) if cfg.eval_every else 0
    ctx.fast_eval = (ctx.policy.lora or ctx.world == 1) and \
        fast.wanted(None, ctx.device, evals * len(ctx.eval_prompts) * cfg.eval_seeds * cfg.eval_frames / ctx.world)
    from fast_train import configure
    return configure(ctx, cfg)  # the fast paths: merged rollouts, compiled decoder, attention (fast_train.py)


FLAT_STEPS = 3  # this many flat steps in a row earn a warning


def main(argv):
    if argv[:1] == ["report"]:
        from report import report
        return report(argv[1:])
    cfg = parse_config(argv)
    check_config(cfg)
    check_log(cfg.log)
    try:  # loaders raise ValueError / OSError naming the bad file, key or value: one line, no traceback
        ctx = build(cfg, claim=True)
        check_frames(cfg, ctx.wan.model.max_frames)
        if ctx.rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
            clean_stale(cfg.out_dir)
            remove_stale_tmp(os.path.join(cfg.out_dir, "samples"))  # videos of a killed evaluation
        start, changes = load_checkpoint(cfg, ctx) if cfg.resume else (0, {})
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if ctx.rank == 0 and cfg.resume:
        print(f"resuming from step {start}" + "".join(f"; {k} {a!r} -> {b!r}" for k, (a, b) in sorted(changes.items())))
        trim_log(os.path.join(cfg.out_dir, "log.jsonl"), start)
    trainable = sum(p.numel() for p in ctx.policy.params("default"))
    if ctx.rank == 0:
        P, G = cfg.prompts_per_rank, cfg.group_size
        print(f"{ctx.world} rank(s) x {P} prompt(s) x {G} candidates = {ctx.world * P * G} clips per step; "
              f"per prompt: history 0-{cfg.max_history_frames} + {G} x {cfg.clip_frames} latent frames "
              f"(up to {ctx.world * P * (cfg.max_history_frames + G * cfg.clip_frames)} per step); "
              f"trainable parameters: {trainable:,} ({'LoRA r=%d' % cfg.lora_rank if ctx.policy.lora else 'full'})")
    log = ctx.log = RunLog(cfg.out_dir, cfg.log, start, dataclasses.asdict(cfg)) if ctx.rank == 0 else None
    base = last_eval = None  # held-out scores at step 0 (every later evaluation is paired with them), latest
    base_csv = os.path.join(cfg.out_dir, "samples", "scores_step00000.csv")
    if start == 0 and cfg.eval_every:
        base = evaluate(0, cfg, ctx)
        log and log.row({"step": 0, **E.summary(base, base)})
    elif cfg.eval_every and os.path.isfile(base_csv):
        base = E.read_scores(base_csv, "theta")
        if base["composite"].shape != (len(ctx.eval_prompts), cfg.eval_seeds):
            raise SystemExit(f"error: {base_csv} holds {tuple(base['composite'].shape)} prompts x seeds, this run "
                             f"evaluates {len(ctx.eval_prompts)} x eval_seeds={cfg.eval_seeds}: they cannot be paired")
    flat_run = 0  # consecutive steps whose every group had equal rewards: no advantage, nothing learnt
    for step in tqdm(range(start + 1, cfg.steps + 1), desc="steps", disable=ctx.rank != 0):
        row = train_step(step, cfg, ctx)
        flat_run = flat_run + 1 if row["flat_groups"] == ctx.world * cfg.prompts_per_rank else 0
        if flat_run == FLAT_STEPS and ctx.rank == 0:
            tqdm.write(f"warning: steps {step - FLAT_STEPS + 1}-{step}: every group's candidates got equal rewards "
                       f"(--reward={cfg.reward}): zero advantages, nothing is being learnt (log: flat_groups)")
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            last_eval = evaluate(step, cfg, ctx)
            row.update(E.summary(last_eval, base))
        if log and (step % cfg.log_every == 0 or "eval/composite" in row):
            log.row(row)
            log.histograms(step, ctx.spread)
        if step % cfg.save_every == 0 or step == cfg.steps:
            try:
                save_checkpoint(step, cfg, ctx)
            except BaseException:  # SIGTERM, Ctrl-C or an error mid-save: its ckpt-*.tmp / latest.tmp go too
                if ctx.rank == 0:
                    clean_stale(cfg.out_dir)
                raise
    # every rank must end with the same theta: check it rather than assume it
    checksum = sum(float(full_tensor(p).double().sum()) for p in ctx.policy.params("default"))
    print(f"rank {ctx.rank} trainable checksum {checksum:.12e}", flush=True)
    sums = all_sum(checksum, checksum ** 2)
    if abs(sums[1] / ctx.world - (sums[0] / ctx.world) ** 2) > 1e-9 * max(1.0, checksum ** 2):
        raise RuntimeError("ranks ended with different trainable weights")
    log and log.close()
    if ctx.rank == 0 and base is not None and last_eval is not None:
        print(f"held-out rewards, {base['composite'].numel()} samples (fixed noise), paired change step 0 -> "
              f"{cfg.steps}:\n" + E.table({"step 0": base, f"step {cfg.steps}": last_eval}, ["step 0", f"step {cfg.steps}"]))
    if ctx.rank == 0:
        release(cfg.out_dir)
    if ctx.world > 1:  # drop DDP's reducer while its process group lives: torn down at exit, gloo can deadlock
        del ctx.train_net
        dist.destroy_process_group()


if __name__ == "__main__":
    # a kill unwinds as an error exit does: the lock is released (run_dir), a half-written sample video (VideoFile) or
    # checkpoint (above) is removed; a SIGKILL leaves them to the next start (stale lock, clean_stale, remove_stale_tmp)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main(sys.argv[1:])
