"""Composite clip reward (paper Sec. 3.3 / 4.1): VQ = HPSv3 mu over the top 30% of frames, MQ = VideoAlign
on grayscale frames, TA = VideoAlign on RGB frames (the models: reward_models.py), composite = their weighted
sum; `--reward` specs (parse_spec), custom `module:function` rewards, and offline rewards: cheap pixel-space
stand-ins for the three axes, for runs without weights (config.DEFAULT_OFFLINE_SPEC)."""
import contextlib
import importlib
import math
import re
import time
from functools import partial

import torch

from reward_models import load_hpsv3, load_videoalign, luma, top30_mean

def colorfulness(frames, prompts):
    """VQ stand-in: Hasler & Suesstrunk (2003) colourfulness of each frame, top-30% frame reduction."""
    r, g, b = frames.float().unbind(2)
    rg, yb = r - g, (r + g) / 2 - b
    std = torch.hypot(rg.std((-2, -1), correction=0), yb.std((-2, -1), correction=0))
    return top30_mean(std + 0.3 * torch.hypot(rg.mean((-2, -1)), yb.mean((-2, -1))))


def smoothness(frames, prompts):
    """MQ stand-in: minus the mean absolute frame-to-frame change of the grayscale clip (flicker)."""
    if frames.shape[1] < 2:
        raise ValueError(f"smoothness needs at least 2 frames, got {frames.shape[1]}")
    gray = luma(frames.float())
    return -(gray[:, 1:] - gray[:, :-1]).abs().mean((1, 2, 3))


COLORS = {"red": (1, 0, 0), "green": (0, .5, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "orange": (1, .5, 0),
          "purple": (.5, 0, .5), "pink": (1, .75, .8), "white": (1, 1, 1), "black": (0, 0, 0),
          "gray": (.5, .5, .5), "grey": (.5, .5, .5), "brown": (.6, .3, .1)}


def prompt_color(frames, prompts):
    """TA stand-in: 1 - mean RGB distance / sqrt(3) of the pixels to the first colour word of the prompt
    (0 for a prompt that names no colour: no signal there, by design)."""
    out = torch.zeros(len(prompts))
    for i, prompt in enumerate(prompts):
        if word := re.search(r"\b(" + "|".join(COLORS) + r")\b", prompt.lower()):
            target = torch.tensor(COLORS[word.group(1)], device=frames.device)[:, None, None]
            out[i] = 1 - (frames[i].float() - target).norm(dim=1).mean().item() / math.sqrt(3)
    return out


# ------------------------------------------------------------------------------------ composite
def random_control(frames, prompts):
    """A content-free control: uniform noise from the global generator, whatever the clip. Training on it must
    leave every real reward within noise (README, "Does it learn?")."""
    return torch.rand(len(prompts))


OFFLINE = {"colorfulness": colorfulness, "smoothness": smoothness, "prompt_color": prompt_color,
           "random_control": random_control}
VIDEOALIGN_AXES = {"videoalign_vq": dict(axis="VQ", gray=False), "videoalign_mq": dict(axis="MQ", gray=True),
                   "videoalign_ta": dict(axis="TA", gray=False)}  # the paper: MQ on grayscale, TA on RGB


def resident(model):
    """The context a parked model (offload.park) is on its GPU in; nothing for any other model, or None."""
    return getattr(model, "resident", contextlib.nullcontext)()


class CompositeReward:
    """(frames [B, F, 3, H, W] in [0, 1], B prompts) -> {name: [B] float32 CPU, ..., "composite"}.

    models[i]: the nn.Module reward i runs on (None: none). The rewards of one model run together, inside
    `resident`: a parked model is on the GPU only while it scores. seconds: each reward's wall time
    in the last call (scoring only: a parked model's copy to the GPU is offload.MOVED's)."""

    def __init__(self, names, weights, fns, models=None):
        self.names, self.weights, self.fns = names, weights, fns
        self.models = models or [None] * len(fns)
        self.seconds = {}

    def __call__(self, frames, prompts, batch=None, device=None):
        """batch: score `batch` clips at a time, each moved to `device` (default: where frames are) just before it
        is scored, so the frames may wait in host memory and the GPU holds one batch of them: train.py decodes a
        step's G clips into pinned host memory and scores them per micro-batch, so memory stays flat in G. Every
        reward is per clip, so the scores equal those of one call on all frames, up to the rounding of batched
        kernels (tested); each model is still moved to the GPU once per call."""
        if not torch.is_tensor(frames) or frames.ndim != 5 or frames.shape[2] != 3 or not frames.is_floating_point():
            raise ValueError(f"frames must be a float [B, F, 3, H, W] tensor, got "
                             f"{getattr(frames, 'shape', type(frames))} {getattr(frames, 'dtype', '')}")
        if not isinstance(prompts, (list, tuple)) or len(prompts) != len(frames) or \
                not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"need a list of {len(frames)} prompt strings (one per clip), got {prompts!r:.200}")
        b, device = batch or max(len(frames), 1), device or frames.device
        parts, checked = {}, False
        for model in dict.fromkeys(self.models):  # each model once, in order of first use
            with resident(model):
                for i in range(0, len(frames), b):
                    x = frames[i:i + b].to(device, non_blocking=True)
                    if not checked:  # the range, batch by batch on the device (a host-side pass over GBs is slow)
                        lo, hi = (float(v) for v in torch.stack(x.aminmax())) if x.numel() else (0, 0)
                        if not 0 <= lo <= hi <= 1:
                            raise ValueError(f"frames must lie in [0, 1], got min {lo:.4g} max {hi:.4g}")
                    for name, fn, m in zip(self.names, self.fns, self.models):
                        if m is model:
                            parts.setdefault(name, []).append(self._score(name, fn, x, list(prompts[i:i + b])))
                checked = True
        out = {}
        for name in self.names:
            done = parts.get(name, [])
            self.seconds[name] = sum(t for _, t in done)
            r = torch.cat([r for r, _ in done]) if done else torch.zeros(0)
            if r.shape != (len(frames),):
                raise ValueError(f"reward {name!r} must return {len(frames)} floats, got {r.tolist()}")
            out[name] = _finite(name, r, prompts)
        out["composite"] = _finite("composite", sum(w * out[n] for n, w in zip(self.names, self.weights)), prompts)
        return out

    @staticmethod
    def _score(name, fn, frames, prompts):
        """(scores [B] float32 on the CPU, seconds) of one reward on one batch."""
        t0 = time.perf_counter()
        try:
            r = torch.as_tensor(fn(frames, prompts)).detach().to("cpu", torch.float32)  # waits for the GPU
        except Exception as e:  # a failing reward stops the step; it never turns into a constant
            raise RuntimeError(f"reward {name!r} failed: {type(e).__name__}: {e}") from e
        if r.shape != (len(frames),):
            raise ValueError(f"reward {name!r} must return {len(frames)} floats, got {r.tolist()}")
        return r, time.perf_counter() - t0


def _finite(name, r, prompts):
    """A NaN or inf score would turn every advantage of the step into NaN: stop, naming the reward and sample."""
    bad = (~torch.isfinite(r)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"reward {name!r} is {r[bad[0]].item()} (not finite) for sample {bad[0]} of the batch "
                         f"(prompt {prompts[bad[0]]!r:.80})" + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))
    return r


def parse_spec(spec):
    """'name:weight,...' -> [(name, weight)]: names unique, weights finite (a NaN weight makes every composite NaN)."""
    terms = []
    for term in filter(None, map(str.strip, spec.split(","))):
        name, _, weight = term.rpartition(":")
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"reward term {term!r} must be name:weight") from None
        if not math.isfinite(w):
            raise ValueError(f"reward {name!r} has a non-finite weight {weight!r}")
        if not name or name in dict(terms) or name == "composite":
            raise ValueError(f"reward name {name!r} is empty, repeated or reserved")
        terms.append((name, w))
    if not terms:
        raise ValueError(f"empty reward spec {spec!r}")
    if not any(w for _, w in terms):  # a zero composite gives zero advantages: the whole run would train nothing
        raise ValueError(f"reward spec {spec!r} has no nonzero weight: the composite would be 0 and nothing trained")
    return terms


def build_reward(spec, device="cpu", paths=None):
    """spec: comma-separated name:weight terms; a name is an offline reward (colorfulness, smoothness,
    prompt_color), a model reward (hpsv3, videoalign_vq/_mq/_ta) or module:function on (frames, prompts).
    paths: "hpsv3" (HPSv3.safetensors), "videoalign" (VideoReward folder); optional "hpsv3_tokenizer",
    "videoalign_tokenizer", "videoalign_base" (Qwen2-VL-2B-Instruct folder, LoRA form only)."""
    paths, names, weights, fns, owners, models = dict(paths or {}), [], [], [], [], {}
    for name, weight in parse_spec(spec):
        weights.append(weight)
        key = "hpsv3" if name == "hpsv3" else "videoalign" if name in VIDEOALIGN_AXES else None
        if key and key not in models:  # one VideoAlign model serves all its axes
            if key not in paths:
                raise ValueError(f"reward {name!r} needs paths[{key!r}]")
            models[key] = (load_hpsv3(paths[key], device, paths.get("hpsv3_tokenizer", "Qwen/Qwen2-VL-7B-Instruct"))
                           if key == "hpsv3" else load_videoalign(paths[key], device, paths.get("videoalign_tokenizer"),
                                                                  paths.get("videoalign_base")))
        if key == "videoalign":
            fn = partial(models[key].score, **VIDEOALIGN_AXES[name])
        elif key:
            fn = models[key].score
        elif name in OFFLINE:
            fn = OFFLINE[name]
        elif ":" in name:
            module, _, attr = name.partition(":")
            try:
                mod = importlib.import_module(module)
            except ImportError as e:
                raise ValueError(f"reward {name!r}: cannot import module {module!r} ({e})") from None
            if not callable(fn := getattr(mod, attr, None)):
                raise ValueError(f"reward {name!r}: module {module} has no function {attr}")
        else:
            raise ValueError(f"unknown reward {name!r}: use {[*OFFLINE, 'hpsv3', *VIDEOALIGN_AXES]} or module:function")
        names.append(name)
        fns.append(fn)
        owners.append(models.get(key))
    return CompositeReward(names, weights, fns, owners)


def check_rewards(names, cfg):
    """Every reward of the spec can be built (build_reward would fail only after loading the models named before
    it): a known name, its model's path given, a module:function that imports."""
    flags = {"hpsv3": ("hpsv3", "HPSv3.safetensors"),
             **{k: ("videoalign", "the VideoReward folder") for k in VIDEOALIGN_AXES}}
    for name in names:
        if name in flags:
            key, what = flags[name]
            if getattr(cfg, key) is None:
                raise SystemExit(f"error: --reward uses {name}, which needs --{key}=PATH ({what})")
        elif name not in OFFLINE:
            module, _, attr = name.partition(":")
            if not attr:
                raise SystemExit(f"error: --reward: unknown reward {name!r}: use {[*OFFLINE, *flags]} or "
                                 f"module:function")
            try:
                mod = importlib.import_module(module)
            except ImportError as e:
                raise SystemExit(f"error: --reward: reward {name!r}: cannot import module {module!r} ({e})") from None
            if not callable(getattr(mod, attr, None)):
                raise SystemExit(f"error: --reward: reward {name!r}: module {module} has no function {attr}")
