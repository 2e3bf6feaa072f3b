"""Astrolabe RL trainer (paper Algorithm 1, Eq. 1-4) with Streaming Long Tuning.

    python train.py                                   # tiny model, offline rewards, CPU demo (< 5 min)
    torchrun --nproc_per_node 8 train.py --preset=self_forcing --steps=200
    python train.py report out/log.jsonl              # reward curves -> PNG (needs matplotlib)

Config: config.py's dataclass; a preset first, then any field as --key=value (--help lists them). The run's
objects are built in run.py. Every random draw is a function of (seed, step, the prompt's place in the step), so
a resumed run equals an unbroken one, on any number of ranks.
"""
import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
import warnings

import torch
import torch.distributed as dist
from tqdm import tqdm

import evaluation
import loss
import model
import offload
import vae
from config import STEP_LEVERS, check_config, check_frames, parse_config
from files import remove_stale_tmp
from logs import Phases, RunLog, check_log
from policy import clean_stale, full_tensor, load_checkpoint, save_checkpoint
from run import build
from run_dir import release, trim_log
from rollout import SIGMAS, Group, candidate_rollouts, draw_noise, history_rollout, seed_of


def autocast(device):
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def all_sum(*xs):
    t = torch.tensor([float(x) for x in xs], dtype=torch.float64)
    if dist.is_initialized():
        t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
    return t.cpu().tolist()


def all_sum_named(xs):
    """{name: sum over ranks} of {name: this rank's number}, in one all-reduce."""
    return dict(zip(xs, all_sum(*xs.values())))


@dataclasses.dataclass
class Rollouts:
    """One prompt's share of a step: its text, theta_old's text K/V and its group (history, G clean clips)."""
    prompt: str
    text: torch.Tensor  # umT5 embedding [1, 512, 4096]
    kv_old: list        # theta_old's text K/V: the rollout's, used again for its clip caches
    group: Group


def train_step(step, cfg, ctx):
    """One step of Algorithm 1 on this rank (paper Sec. 3, Eq. 1-4; README "Training"); returns the step's metrics."""
    t0, moved, phases = time.perf_counter(), offload.MOVED["bytes"], Phases(ctx.device, ctx.lap_hook)
    s, prompts = clip_start_and_prompts(step, cfg, ctx)
    rollouts, rewards, reward_s = rollout_and_score(step, s, prompts, cfg, ctx, phases)
    with phases("train"):
        A, masked_total, policy_loss, kl_sum = policy_loss_backward(step, rollouts, rewards, cfg, ctx)
    with phases("optimizer"):
        grad_norm, kl, reset = update_policies(step, rewards, kl_sum, masked_total, cfg, ctx)
    ctx.spread = {**{f"reward/{k}": v for k, v in rewards.items()}, "advantage": A}  # this rank's, for histograms
    return dict(step=step, clip_start=s, **step_metrics(rewards, A, policy_loss, cfg, ctx), kl=kl,
                masked=masked_total / (ctx.world * cfg.prompts_per_rank * cfg.group_size), rho=ctx.ctrl.rho,
                tau_kl=ctx.ctrl.tau_kl, ref_reset=reset, grad_norm=grad_norm, step_time=time.perf_counter() - t0,
                **{f"time/{k}": v for k, v in phases.times.items()},
                **{f"time/reward/{k}": v for k, v in reward_s.items()},
                transfer_gb=(offload.MOVED["bytes"] - moved) / 1e9,
                **{f"peak_gb/{k}": v for k, v in phases.peak_gb.items()},
                peak_mem_gb=max(phases.peak_gb.values(), default=0.0))


def clip_start_and_prompts(step, cfg, ctx):
    """The clip start s, a multiple of the block, the same on every rank (drawn from the shared seed; s = 0 trains
    the first clip, s > 0 is Streaming Long Tuning), and this rank's prompts of the step."""
    shared = torch.Generator().manual_seed(seed_of(cfg.seed, step))
    s = cfg.frames_per_block * int(torch.randint(0, cfg.max_history_frames // cfg.frames_per_block + 1, (1,),
                                                 generator=shared))
    s = s if cfg.clip_start is None else cfg.clip_start
    order = torch.randperm(len(ctx.prompts), generator=shared).tolist()
    P = cfg.prompts_per_rank
    return s, [ctx.prompts[order[(ctx.rank * P + j) % len(order)]] for j in range(P)]


def rollout_and_score(step, s, prompts, cfg, ctx, phases):
    """Algorithm 1's sampling half, no grad: per prompt, the history once with theta_old, then G candidate clips
    from that shared prefix (Eq. 3); each clip decoded as the window of its video and scored. Returns the
    Rollouts, the rewards {name: [P G]} (with "composite") and each reward model's seconds. Draws are keyed by the
    prompt's place in the step (rank * P + j), not by rank: a step computes the same on any number of ranks (tests
    check 2 processes against 1)."""
    P, G, n, m, dev = cfg.prompts_per_rank, cfg.group_size, cfg.frames_per_block, cfg.micro_batch, ctx.device
    rollouts, scores, reward_s = [], [], {}
    for j, prompt in enumerate(prompts):
        key = ctx.rank * P + j
        with torch.no_grad(), autocast(dev), ctx.policy.using("old") as old:
            with phases("text"):
                text = ctx.wan.text_encoder([prompt])
            with phases("history"):
                kv_old = old.text_kv(text)
                noise = draw_noise(seed_of(cfg.seed, step, key, 0), 1, ctx.wan.latent_shape(s), dev)
                history, cache = history_rollout(old, kv_old, noise, cfg.sink_frames, cfg.window_frames, n)
            with phases("clips"):  # the clip noise grows with G (0.46 GB at G = 24): dropped once used
                noise = draw_noise(seed_of(cfg.seed, step, key, 1), G, ctx.wan.latent_shape(cfg.clip_frames), dev)
                group = candidate_rollouts(old, kv_old, history, cache, noise, n, m)
                del noise
        rollouts.append(Rollouts(prompt, text, kv_old, group))
    for ro in rollouts:
        # 4 F pixel frames for s > 0 (1 + 4 (F - 1) for s = 0), from the decoder state after the history, shared
        # by the group like the KV prefix (vae.py); kept in (pinned) host memory and scored per micro-batch, so
        # GPU memory stays flat in G (G x 48 frames of 480 x 832 in fp32 are 5.5 GB at G = 24; offload.py)
        with phases("decode"):
            dec, frames, b = vae.history_decoder(ctx.wan.vae, ro.group.history), None, ctx.decode_batch or m
            for i in range(0, G, b):
                x = dec.fork(min(b, G - i))(ro.group.clips[i:i + b])
                frames = offload.host_buffer("frames", (G, *x.shape[1:]), x.dtype, dev) if frames is None else frames
                frames[i:i + x.shape[0]].copy_(x, non_blocking=True)
            del dec
        with phases("reward"):
            scores.append(ctx.reward_fn(frames, [ro.prompt] * G, batch=m, device=dev))
        for k, v in getattr(ctx.reward_fn, "seconds", {}).items():  # each reward's share (CompositeReward)
            reward_s[k] = reward_s.get(k, 0.0) + v
    return rollouts, {k: torch.cat([sc[k] for sc in scores]).to(dev) for k in scores[0]}, reward_s


def policy_loss_backward(step, rollouts, rewards, cfg, ctx):
    """Algorithm 1's update half, up to the gradients: advantages over the whole step on all ranks (Eq. 4), the
    uncertainty mask, then per micro-batch the three policies' x0 at a fresh noise level in the rollout's attention
    layout and Eq. 1-2's loss plus the selective KL where masked, backward. Returns the advantages A, the step's
    masked count on all ranks, and the summed policy loss and KL (device scalars: no host sync per micro-batch)."""
    P, G, m, dev = cfg.prompts_per_rank, cfg.group_size, cfg.micro_batch, ctx.device
    A, r = loss.advantages(rewards["composite"], G, cfg.a_max)
    mask = ctx.ctrl.uncertainty_mask(rewards["composite"], torch.stack([rewards[k] for k in ctx.reward_fn.names], 1))
    mask_host, micro = mask.cpu(), [(j, i) for j in range(P) for i in range(0, G, m)]  # one transfer: branched on
    # the reference forward runs only where the KL applies; sharded (FSDP2) weights make every forward a collective,
    # so then all ranks decide together. The KL is a mean over the step's masked samples on all ranks: each rank
    # divides by masked_total / world, as gradients are averaged over ranks (one all-reduce)
    need_ref = [bool(mask_host[j * G + i:j * G + i + m].any()) for j, i in micro]
    masked_total, *any_ref = all_sum(mask_host.sum(), *need_ref)
    if not ctx.policy.lora:
        need_ref = [x > 0 for x in any_ref]
    policy_loss = kl_sum = torch.zeros((), device=dev)
    for k, (j, i) in enumerate(micro):
        ro, b = rollouts[j], min(m, G - i)
        if i == 0:
            noise_gen = torch.Generator().manual_seed(seed_of(cfg.seed, step, ctx.rank * P + j, 2))
        sl, x0 = slice(j * G + i, j * G + i + b), ro.group.clips[i:i + b]
        sigma = torch.tensor(SIGMAS)[torch.randint(len(SIGMAS), (b,), generator=noise_gen)].to(dev)
        x_t = model.add_noise(x0, torch.randn(x0.shape, generator=noise_gen).to(dev), sigma)
        args = (x_t, sigma, ro.text)
        with autocast(dev):
            # the history prefix + the candidates' clean clip K/V (Streaming Long Tuning)
            with ctx.policy.using("old") as old:
                cache = ro.group.clip_cache(old, ro.kv_old, i, b, cfg.frames_per_block)
            x0_old = ctx.policy.x0("old", *args, cache, ro.group.start, text_kv=ro.kv_old)
            x0_ref = ctx.policy.x0("ref", *args, cache, ro.group.start) if need_ref[k] else None
        net = ctx.policy.train_net  # DDP: gradients are reduced on the last micro-batch's backward only
        with net.no_sync() if hasattr(net, "no_sync") and k < len(micro) - 1 else contextlib.nullcontext():
            with autocast(dev):
                x0_theta = ctx.policy.x0("default", *args, cache, ro.group.start)
            mb_loss = loss.policy_loss(x0_theta, x0_old, x0, r[sl], cfg.beta, n=P * G)  # Eq. 1-2
            if x0_ref is not None:  # selective KL on the masked samples
                mb_loss = mb_loss + loss.kl_loss(x0_theta, x0_ref, mask[sl], cfg.kl_weight, masked_total / ctx.world)
                kl_sum = kl_sum + ((x0_theta.detach() - x0_ref).square().flatten(1).mean(1) * mask[sl]).sum()
            mb_loss.backward()
        policy_loss = policy_loss + mb_loss.detach()
        del cache  # before the next micro-batch builds its own (10.3 GB for 3 candidates at the 1.3B size)
    return A, masked_total, policy_loss, kl_sum


def update_policies(step, rewards, kl_sum, masked_total, cfg, ctx):
    """Algorithm 1's last lines: AdamW on theta (clipped gradients), theta_old's EMA, the dynamic reference
    (theta_ref <- theta when the step's KL passes tau_KL or K_max steps passed). Returns the gradient norm, the
    step's mean masked KL on all ranks and whether the reference was reset."""
    params = ctx.policy.params("default")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    if not math.isfinite(grad_norm):  # before the optimizer step: theta stays as it was
        raise RuntimeError(f"step {step}: the gradient norm is {grad_norm} (lr={cfg.lr}, rewards "
                           f"{ {k: float(v.double().abs().max()) for k, v in rewards.items()} } at most)")
    ctx.opt.step()
    ctx.opt.zero_grad(set_to_none=True)
    loss.ema_(ctx.policy.params("old"), params, cfg.gamma)
    ctx.policy.merge_old()  # the rollouts' merged copy follows theta_old
    kl = all_sum(kl_sum)[0] / max(masked_total, 1)
    reset = ctx.ctrl.should_reset_reference(kl)
    if reset:
        loss.copy_(ctx.policy.params("ref"), params)
    return grad_norm, kl, reset


def step_metrics(rewards, A, policy_loss, cfg, ctx):
    """The step's statistics over all ranks, by name: reward means, the composite's spread, groups whose
    candidates all scored alike (no advantage), advantages, the policy loss. In float64, the spread from centred
    values: a statistic stays finite whenever the rewards are."""
    comp = rewards["composite"].double()
    groups = comp.view(-1, cfg.group_size)
    local = {**{f"reward/{k}": float(v.double().sum()) for k, v in rewards.items()},
             "flat_groups": float((groups.amax(1) == groups.amin(1)).sum()),
             "adv_abs_mean": float(A.abs().sum()), "adv_clipped": float((A.abs() >= cfg.a_max).sum()),
             "samples": len(comp), "policy_loss": float(policy_loss)}
    total = all_sum_named(local)
    n = total["samples"]
    mean = {k: total[k] / n for k in local if k.startswith("reward/")}
    return dict(**mean, flat_groups=int(total["flat_groups"]),
                composite_std=(all_sum(float((comp - mean["reward/composite"]).square().sum()))[0] / n) ** 0.5,
                adv_abs_mean=total["adv_abs_mean"] / n, adv_clipped=total["adv_clipped"] / n,
                policy_loss=total["policy_loss"] / ctx.world)


FLAT_STEPS = 3  # this many flat steps in a row earn a warning


def main(argv):
    if argv[:1] == ["report"]:
        from report import report
        return report(argv[1:])
    cfg = parse_config(argv)
    check_config(cfg)
    # FSDP2 (policy.shard) warns at every forward that a unit returns views (text K/V, velocities): nothing here
    # changes them in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    # a step allocates and frees blocks of many sizes (candidates, decoder chunks, reward batches): expandable segments
    # let freed memory serve other sizes (an out-of-memory left 22 GB reserved and unused, H100, 2026-12-06); the
    # bench's step table (bench/README.md) was measured so. Read when CUDA first allocates, so set before build
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if torch.cuda.is_available():  # the compiled paths' process-wide settings (why: fast.py)
        torch.backends.cudnn.benchmark = True
        torch._dynamo.config.recompile_limit = 64
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
              f"trainable parameters: {trainable:,} ({'LoRA r=%d' % cfg.lora_rank if ctx.policy.lora else 'full'}); "
              f"fast paths: {', '.join(k for k in STEP_LEVERS if getattr(cfg, k)) or 'none'} (fast_train.py)")
    log = ctx.log = RunLog(cfg.out_dir, cfg.log, start, dataclasses.asdict(cfg)) if ctx.rank == 0 else None
    base = last_eval = None  # held-out scores at step 0 (every later evaluation is paired with them), latest
    base_csv = os.path.join(cfg.out_dir, "samples", "scores_step00000.csv")
    if start == 0 and cfg.eval_every:
        base = evaluation.evaluate_theta(0, cfg, ctx)
        log and log.row({"step": 0, **evaluation.summary(base, base)})
    elif cfg.eval_every and os.path.isfile(base_csv):
        base = evaluation.read_scores(base_csv, "theta")
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
            last_eval = evaluation.evaluate_theta(step, cfg, ctx)
            row.update(evaluation.summary(last_eval, base))
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
              f"{cfg.steps}:\n" + evaluation.table({"step 0": base, f"step {cfg.steps}": last_eval},
                                                    ["step 0", f"step {cfg.steps}"]))
    if ctx.rank == 0:
        release(cfg.out_dir)
    if ctx.world > 1:  # drop DDP's reducer while its process group lives: torn down at exit, gloo can deadlock
        del ctx.policy.train_net
        dist.destroy_process_group()


if __name__ == "__main__":
    # a kill unwinds as an error exit does: the lock is released (run_dir), a half-written sample video (VideoFile) or
    # checkpoint (above) is removed; a SIGKILL leaves them to the next start (stale lock, clean_stale, remove_stale_tmp)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main(sys.argv[1:])
