"""Run configuration (nanoGPT habit): a dataclass of every knob, presets for the real generators, and
`--key=value` overrides on the command line; plus the checks that must pass before any rollout starts."""
import dataclasses
import os
from dataclasses import dataclass

from rewards import DEFAULT_OFFLINE_SPEC


@dataclass
class Config:
    # generator (None: the tiny built-in model); see model.load
    model: str = None
    checkpoint: str = None
    checkpoint_key: str = None
    base_lora: str = None
    # prompts, one per line
    prompts: str = "prompts/train.txt"
    eval_prompts: str = "prompts/eval.txt"
    # streaming rollout (latent frames); video size in pixels (None: the generator's default)
    height: int = 32              # the tiny demo decodes 32x32 frames (4.6x faster than 64x64, as learnable)
    width: int = 32
    frames_per_block: int = 3
    sink_frames: int = 3
    window_frames: int = 9
    clip_frames: int = 3
    max_history_frames: int = 3   # clip start s: random block multiple in [0, this] (Streaming Long Tuning)
    clip_start: int = None        # or always this s
    # RL
    prompts_per_rank: int = 2
    group_size: int = 16          # G candidates per prompt
    micro_batch: int = 16         # candidates per rollout / training forward
    beta: float = 1.0
    a_max: float = 5.0
    kl_weight: float = 1e-4
    gamma: float = 0.0            # theta_old EMA; the tiny demo lets theta_old = theta (fast, no trust region)
    tau_kl: float = 0.15
    k_max: int = 15
    rho: float = 0.1
    reward: str = DEFAULT_OFFLINE_SPEC
    hpsv3: str = None             # HPSv3.safetensors
    hpsv3_tokenizer: str = None   # Qwen2-VL-7B-Instruct tokenizer folder (default: the Hub name)
    videoalign: str = None        # VideoReward checkpoint folder
    videoalign_base: str = None   # Qwen2-VL-2B-Instruct folder (VideoReward's LoRA form only)
    # optimisation
    lora_rank: int = 8            # 0: full fine-tuning (three copies; FSDP2 under torchrun)
    lora_alpha: int = 8
    lr: float = 2e-2
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    steps: int = 100
    seed: int = 0
    # output
    out_dir: str = "out"
    log_every: int = 1
    eval_every: int = 25
    eval_frames: int = 3
    eval_seeds: int = 16          # fixed noises per held-out prompt: the same samples at every evaluation (paired)
    save_every: int = 100
    resume: bool = False


_PAPER = dict(height=None, width=None, gamma=0.9, window_frames=21, clip_frames=12, prompts_per_rank=1, group_size=24,
              micro_batch=3, lora_rank=256,
              lora_alpha=256, lr=1e-5, gradient_checkpointing=True, steps=400, eval_every=50, eval_frames=21,
              eval_seeds=4,
              save_every=50, reward="hpsv3:1,videoalign_mq:1,videoalign_ta:1", hpsv3="checkpoints/HPSv3.safetensors",
              videoalign="checkpoints/VideoReward", model="checkpoints/Wan2.1-T2V-1.3B-Diffusers",
              prompts="prompts/vidprom.txt")
PRESETS = {
    "tiny": {},
    "self_forcing": dict(_PAPER, checkpoint="checkpoints/self_forcing_dmd.pt", checkpoint_key="generator_ema",
                         max_history_frames=9),
    "causal_forcing": dict(_PAPER, checkpoint="checkpoints/causal_forcing.pt", max_history_frames=9),
    "longlive": dict(_PAPER, checkpoint="checkpoints/longlive_base.pt", checkpoint_key="generator",
                     base_lora="checkpoints/lora.pt", window_frames=15, max_history_frames=228),
}


def parse_config(argv):
    """--preset=NAME first, then --key=value for any Config field; unknown names are errors."""
    kv = {}
    for a in argv:
        if not a.startswith("--") or "=" not in a:
            raise SystemExit(f"error: arguments are --key=value, got {a!r}")
        k, v = a[2:].split("=", 1)
        kv[k] = v
    preset = kv.pop("preset", "tiny")
    if preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = Config(**PRESETS[preset])
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    for k, v in kv.items():
        if k not in types:
            raise SystemExit(f"error: unknown config key {k!r}; keys: {sorted(types)}")
        t = types[k]
        if v.lower() == "none":
            val = None
        elif t is bool:
            val = v.lower() in ("1", "true", "yes")
        else:
            val = (str if t is str else t)(v)
        setattr(cfg, k, val)
    return cfg


def read_prompts(path):
    if not os.path.isfile(path):
        raise SystemExit(f"error: prompt file {path} does not exist")
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise SystemExit(f"error: prompt file {path} has no prompts")
    return prompts


def check_config(cfg):
    n = cfg.frames_per_block
    for k in ("clip_frames", "max_history_frames", "eval_frames", "clip_start"):
        if (getattr(cfg, k) or 0) % n:
            raise SystemExit(f"error: {k}={getattr(cfg, k)} is not a multiple of frames_per_block={n}")
    if cfg.clip_frames > cfg.window_frames:
        raise SystemExit(f"error: clip_frames={cfg.clip_frames} is longer than window_frames={cfg.window_frames} allows")
    if cfg.group_size < 2:
        raise SystemExit(f"error: group_size={cfg.group_size}: advantages need at least 2 candidates per prompt")
    if cfg.micro_batch < 1:
        raise SystemExit(f"error: micro_batch={cfg.micro_batch} must be at least 1")
