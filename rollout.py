"""Few-step autoregressive sampling and the shared-prefix group rollout (paper Eq. 3).

Per block of `frames_per_block` latent frames (Self-Forcing's convention, paper Sec. 3):
4 denoising steps at the warped sigmas, re-noising x0 with fresh noise between steps, then one
"context pass" of the clean x0 at t = 0 whose K/V overwrite the block's slot in the cache.

Noise is an explicit tensor [B, steps, C, F, h, w]: noise[:, 0] starts each block, noise[:, k]
re-noises before step k. Drawing it per sample up front makes a rollout a pure function of its
noise, so outputs do not depend on the micro-batch size.
"""
from dataclasses import dataclass

import torch
from tqdm import tqdm

from kv_cache import KVCache
from model import SIGMAS, add_noise, to_x0


def seed_of(*xs):
    """A 31-bit seed from ints (Python hashes int tuples the same in every process)."""
    return hash(xs) & 0x7FFFFFFF


def draw_noise(seed, batch, latent_shape, device="cpu"):
    """Seeded noise [batch, steps, C, F, h, w], drawn on the CPU so every device agrees."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, len(SIGMAS), *latent_shape), generator=g).to(device)


def new_cache(model, batch, latent_shape, sink_frames, window_frames, frames_per_block, dtype=None):
    _, _, h, w = latent_shape
    cfg = model.transformer.config
    p = model.patch
    if h % p[1] or w % p[2]:
        raise ValueError(f"latent size {h}x{w} is not divisible by the patch {p[1:]}")
    return KVCache(cfg.num_layers, batch, sink_frames + window_frames, (h // p[1]) * (w // p[2]),
                   cfg.num_attention_heads, cfg.attention_head_dim, sink_frames, window_frames, frames_per_block,
                   dtype or model.dtype, model.transformer.device)


@torch.no_grad()
def generate(model, text_kv, noise, cache, start_frame=0, frames_per_block=3, switches=(), latents=None,
             progress=False, on_block=None, cache_last_block=True, global_sink=True):
    """Generate noise.shape[3] latent frames from `start_frame` on, block by block, into `cache`.

    switches: [(frame, text_kv)], frames increasing: the new prompt starts at the first block start at or
    past `frame` (switch_starts), where its K/V re-cache the window (recache; global_sink as there).
    `latents` holds earlier frames [B, C, start_frame, h, w] when the re-cache reaches back before this call.
    on_block(x0): called with each block's clean latents as soon as they exist (progressive decoding).
    cache_last_block=False skips the last block's context pass when nothing will attend to it (sampling, the
    candidate clips).
    Returns clean latents [B, C, F, h, w] in fp32."""
    if noise.ndim != 6 or noise.shape[1] != len(SIGMAS):
        raise ValueError(f"noise must be [B, {len(SIGMAS)}, C, F, h, w] (draw_noise), got {tuple(noise.shape)}")
    for name, x in (("noise", noise), ("latents", latents)):  # a NaN would spread through every later frame's cache
        if x is not None and not torch.isfinite(x).all():
            raise ValueError(f"{name} holds non-finite (NaN or inf) values")
    B, S, C, F, h, w = noise.shape
    n = frames_per_block
    if n < 1 or F % n:
        raise ValueError(f"{F} latent frames is not a whole number of {n}-frame blocks")
    if start_frame < 0 or start_frame + F > model.max_frames:  # checked before generating, not at the last block
        raise ValueError(f"frames [{start_frame}, {start_frame + F}) are past the {model.max_frames}-position "
                         f"RoPE table")
    if cache.k[0].shape[0] != B:
        raise ValueError(f"noise has batch {B}, the cache batch {cache.k[0].shape[0]}")
    first_frame = start_frame - (0 if latents is None else latents.shape[2])
    starts = switch_starts([f for f, _ in switches], start_frame, start_frame + F, n)
    for s in starts:  # the re-cache reads the clean frames of the window before the switch
        if s - min(cache.sink + cache.window, s) < first_frame:
            raise ValueError(f"the prompt switch at frame {s} re-caches frames from "
                             f"{s - min(cache.sink + cache.window, s)} on: pass their latents (latents=)")
    switches = dict(zip(starts, [kv for _, kv in switches]))
    dtype = model.dtype
    out = torch.empty(B, C, F, h, w, dtype=torch.float32, device=noise.device)
    for b in tqdm(range(F // n), desc="blocks", disable=not progress, leave=False):
        s = start_frame + b * n
        if s in switches:
            text_kv = switches[s]
            done = out[:, :, :b * n] if latents is None else torch.cat([latents.float(), out[:, :, :b * n]], 2)
            recache(model, text_kv, cache, done, first_frame, s, global_sink)
        cache.begin_block(s, n)
        x = noise[:, 0, :, b * n:(b + 1) * n]
        for k, sigma in enumerate(SIGMAS):
            v = model(x.to(dtype), sigma * 1000, text_kv, cache, s, store=True)
            x0 = to_x0(x, v, sigma)
            if k + 1 < len(SIGMAS):
                x = add_noise(x0, noise[:, k + 1, :, b * n:(b + 1) * n], SIGMAS[k + 1])
        if cache_last_block or b + 1 < F // n:
            model(x0.to(dtype), 0.0, text_kv, cache, s, store=True)  # context pass: clean K/V into the cache
        out[:, :, b * n:(b + 1) * n] = x0
        if on_block is not None:
            on_block(x0)
    return out


def context_pass(model, text_kv, cache, latents, start, frames_per_block=3):
    """Run clean latents [B, C, F, h, w] of frames [start, start + F) through the model at t = 0, block by
    block, writing their K/V into `cache` (blocks already held are overwritten in place)."""
    dtype, n = model.dtype, frames_per_block
    for b in range(latents.shape[2] // n):
        cache.begin_block(start + b * n, n)
        model(latents[:, :, b * n:(b + 1) * n].to(dtype), 0.0, text_kv, cache, start + b * n, store=True)


def switch_starts(frames, start, end, n):
    """The block starts where prompt switches at `frames` take effect, as LongLive 1.0 schedules them
    (pipeline/interactive_causal_inference.py: a block at or past the next switch frame switches, one
    switch a block): a frame that is not a block start is rounded up to the next one."""
    if list(frames) != sorted(set(frames)) or any(not start <= f < end for f in frames):
        raise ValueError(f"prompt switches {list(frames)} must be increasing frames in [{start}, {end})")
    out = []
    for f in frames:
        s = start + -(-(f - start) // n) * n
        out.append(max(s, out[-1] + n) if out else s)
        if out[-1] >= end:
            raise ValueError(f"the prompt switch at frame {f} would take effect at frame {out[-1]} (the next block "
                             f"start, one switch a block), past the last block of [{start}, {end})")
    return out


@torch.no_grad()
def recache(model, text_kv, cache, latents, first_frame, switch_frame, global_sink=True):
    """LongLive 1.0's KV re-cache at a prompt switch (pipeline/interactive_causal_inference.py,
    _recache_after_switch): ONE call at t = 0 with the new prompt over the clean frames [r0, switch_frame),
    r0 = switch_frame - min(sink + window, switch_frame), at their absolute positions, every frame attending
    to every rewritten slot and the sink, later frames included (upstream's cached path reads no mask).
    Frame r0 + j goes into slot j; the sink keeps its K/V only when r0 > 0 and global_sink (LongLive's
    interactive default); otherwise frames r0 .. r0 + sink - 1 become the sink. latents [B, C, F, h, w]
    hold frames [first_frame, first_frame + F)."""
    r0 = switch_frame - min(cache.sink + cache.window, switch_frame)
    if r0 == switch_frame:
        return  # a switch at the first frame: nothing generated yet
    (a, _), _ = cache.rewrite(r0, switch_frame, keep_sink=global_sink and r0 > 0)
    first = cache.frames[a]
    x = latents[:, :, first - first_frame:switch_frame - first_frame]
    model(x.to(model.dtype), 0.0, text_kv, cache, first, store=True)


@dataclass
class Group:
    """One prompt's group: the detached history and its cache, and the G candidates' clean clips."""
    history: torch.Tensor  # [1, C, s, h, w] clean latents of the shared history
    clips: torch.Tensor    # [G, C, clip_frames, h, w] clean x0 of each candidate
    cache: KVCache         # the history's K/V (batch 1): the prefix every candidate attends to
    start: int             # clip start frame s

    @torch.no_grad()
    def clip_cache(self, model, text_kv, i, b, frames_per_block=3):
        """The cache candidates [i, i + b) are trained in: the shared history prefix plus their clean clip K/V,
        which the rollout's context passes wrote and which are recomputed here with the same policy (theta_old)
        from the same clean blocks. Keeping them for all G would cost G x 2.6 GB at the 1.3B size. The last
        block's K/V are not recomputed: in the training forward (clip_velocity) a block attends to the blocks
        before it, so nothing reads them (a quarter of this pass at 4 clip blocks)."""
        cache = self.cache.fork(b, self.clips.shape[2], frames_per_block)
        context_pass(model, text_kv, cache, self.clips[i:i + b, :, :-frames_per_block], self.start, frames_per_block)
        return cache


@torch.no_grad()
def history_rollout(model, text_kv, history_noise, sink_frames, window_frames, frames_per_block=3):
    """A group's shared history (Streaming Long Tuning): its s frames generated once, no grad, from noise
    [1, steps, C, s, h, w]. Returns the clean latents and their cache, detached: the frozen prefix of Eq. 3."""
    _, _, C, s, h, w = history_noise.shape
    if history_noise.shape[0] != 1:
        raise ValueError(f"history noise must have batch 1, got {tuple(history_noise.shape)}")
    if s % frames_per_block:
        raise ValueError(f"history ({s}) must be whole {frames_per_block}-frame blocks")
    cache = new_cache(model, 1, (C, s, h, w), sink_frames, window_frames, frames_per_block)
    return generate(model, text_kv, history_noise, cache, 0, frames_per_block), cache.detach_()


@torch.no_grad()
def candidate_rollouts(model, text_kv, history, cache, clip_noise, frames_per_block=3, micro_batch=None):
    """Paper Eq. 3: the G candidate clips of clip_noise [G, steps, C, clip_frames, h, w], each continuing the
    shared history from its cache (viewed, never copied), in micro-batches. Returns the Group (detached);
    Group.clip_cache gives the training forward its cache."""
    G, _, C, clip_frames, h, w = clip_noise.shape
    s = history.shape[2]
    if clip_frames % frames_per_block:
        raise ValueError(f"clip ({clip_frames}) must be whole {frames_per_block}-frame blocks")
    if clip_frames > cache.window:
        raise ValueError(f"clip_frames={clip_frames} exceeds window_frames={cache.window}: the clip's own "
                         f"blocks would leave the window it is trained in")
    clips = torch.empty(G, C, clip_frames, h, w, device=clip_noise.device)
    m = micro_batch or G
    for i in range(0, G, m):  # each micro-batch appends to its own buffers after the shared (viewed) prefix;
        # forked inline, so the previous micro-batch's buffers (10.3 GB for 3 candidates at 1.3B) are freed first.
        # The last block's context pass is skipped: these buffers are dropped after it (Group.clip_cache recomputes
        # the K/V the training forward reads), so it would be one forward in 5 x blocks for nothing
        clips[i:i + m] = generate(model, text_kv, clip_noise[i:i + m],
                                  cache.fork(min(m, G - i), clip_frames, frames_per_block), s, frames_per_block,
                                  cache_last_block=False)
    return Group(history, clips, cache, s)


def group_rollout(model, text_kv, history_noise, clip_noise, sink_frames, window_frames, frames_per_block=3,
                  micro_batch=None):
    """The history once, then the G candidates from it (Eq. 3): history_rollout, then candidate_rollouts."""
    history, cache = history_rollout(model, text_kv, history_noise, sink_frames, window_frames, frames_per_block)
    return candidate_rollouts(model, text_kv, history, cache, clip_noise, frames_per_block, micro_batch)


def clip_velocity(model, x_t, sigma, text_kv, cache, start, frames_per_block=3):
    """The training forward in exactly the rollout's attention layout: each noisy block of the clip
    attends to the detached history prefix, to the candidate's clean K/V of its earlier clip blocks
    (both read from `cache`, never written) and to itself. x_t [m, C, clip_frames, h, w]; sigma [m]."""
    n = frames_per_block
    dtype = model.dtype
    out = []
    for b in range(x_t.shape[2] // n):
        cache.begin_block(start + b * n, n)
        out.append(model(x_t[:, :, b * n:(b + 1) * n].to(dtype), sigma * 1000, text_kv, cache, start + b * n))
    return torch.cat(out, dim=2)
