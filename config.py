"""Run configuration (nanoGPT habit): a dataclass of every knob, presets for the real generators, and
`--key=value` overrides on the command line; plus the checks that must pass before any rollout starts."""
import dataclasses
import math
import os
from dataclasses import dataclass

# the offline stand-ins of rewards.py, one per axis: a run without reward weights still trains on three rewards
DEFAULT_OFFLINE_SPEC = "colorfulness:1,smoothness:1,prompt_color:1"


@dataclass
class Config:
    # generator (None: the tiny built-in model); see checkpoints.load
    model: str = None             # diffusers Wan2.1-T2V folder
    checkpoint: str = None        # original-layout generator on top of it (Self-Forcing, Causal-Forcing, LongLive, Krea)
    checkpoint_key: str = None    # entry of checkpoint to use (generator_ema, generator)
    base_lora: str = None         # LongLive lora.pt, merged into the base
    base_lora_alpha: float = None  # LoRA alpha of base_lora (LongLive's lora.pt stores none): W + alpha / r B A;
    #                                None: alpha = r, read from the tensors (scale 1, as LongLive's 256 / 256)
    # prompts, one per line
    prompts: str = "prompts/train.txt"     # training prompts
    eval_prompts: str = "prompts/eval.txt"  # held-out prompts (evaluation every eval_every steps)
    # streaming rollout (latent frames); video size in pixels, a multiple of 16 = VAE stride 8 x patch 2
    # (None: the generator's default)
    height: int = 32              # the tiny demo decodes 32x32 frames (4.6x faster than 64x64, as learnable)
    width: int = 32               # pixels, as height
    frames_per_block: int = 3     # latent frames generated together (one block)
    sink_frames: int = 3          # first frames kept in the KV cache for good (Sec. 3)
    window_frames: int = 9        # most recent frames attended besides the sink (paper: 21, LongLive 15)
    clip_frames: int = 3          # latent frames of each candidate clip (trained)
    max_history_frames: int = 3   # clip start s: random block multiple in [0, this] (Streaming Long Tuning)
    clip_start: int = None        # or always this s
    # RL
    prompts_per_rank: int = 2     # prompts per step on each rank (one group of G each)
    group_size: int = 16          # G candidates per prompt
    micro_batch: int = 16         # candidates per rollout / training forward
    beta: float = 1.0             # Eq. 2: x0_plus = (1 - beta) x0_old + beta x0_theta
    a_max: float = 5.0            # Eq. 4: advantages clipped to [-a_max, a_max], r = 0.5 + 0.5 A / a_max
    kl_weight: float = 1e-4       # lambda_KL of the selective KL
    gamma: float = 0.0            # theta_old EMA; the tiny demo lets theta_old = theta (fast, no trust region)
    tau_kl: float = 0.15          # dynamic reference: theta_ref <- theta when the step's KL passes this
    k_max: int = 15               # ... or after this many steps
    rho: float = 0.1              # uncertainty mask: initial fraction of risky samples (adapts in [0.02, 0.2])
    reward: str = DEFAULT_OFFLINE_SPEC  # name:weight,... (rewards.py: hpsv3, videoalign_mq/_ta/_vq, offline, module:function)
    hpsv3: str = None             # HPSv3.safetensors
    hpsv3_tokenizer: str = None   # Qwen2-VL-7B-Instruct tokenizer folder (default: the Hub name)
    videoalign: str = None        # VideoReward checkpoint folder
    videoalign_base: str = None   # Qwen2-VL-2B-Instruct folder (VideoReward's LoRA form only)
    # optimisation
    lora_rank: int = 8            # 0: full fine-tuning (three copies; FSDP2 under torchrun)
    fsdp_per_block: bool = True   # FSDP2 unit: each transformer block (False: the whole generator; policy.shard)
    lora_alpha: int = 8           # LoRA scale alpha / r
    lr: float = 2e-2              # AdamW learning rate (paper: 1e-5)
    weight_decay: float = 1e-4    # AdamW
    grad_clip: float = 1.0        # gradient norm clip
    gradient_checkpointing: bool = False  # recompute each block in the backward (the paper sizes need it)
    # the training step's fast paths (fast_train.py), each switchable so python -m bench train can measure its gain. Off
    # here, the CPU tests' eager reference (where the GPU-only ones, compiling and cuDNN, do nothing anyway); the 1.3B
    # presets switch on those measured together at G = 24 (_FAST_STEP, below)
    merged_rollouts: bool = False  # theta_old's no-grad work on a copy with its LoRA folded in (compiled on CUDA)
    fast_decode: bool = False      # the compiled decoder (CUDA)
    train_attention: bool = False  # cuDNN-first attention under autograd too (CUDA)
    compile_train: bool = False    # each training block compiled whole, forward and backward (CUDA)
    checkpoint_attention: bool = False  # with gradient_checkpointing: keep self-attention outputs, recompute the rest
    compile_rewards: bool = False  # the Qwen2-VL reward models: batched ViT attention, layers compiled (CUDA)
    steps: int = 100              # optimizer steps of the run (with resume: in all)
    seed: int = 0                 # every draw is a function of (seed, step, prompt place): reproducible
    # output
    out_dir: str = "out"          # log.jsonl, checkpoints ckpt-NNNNNN, samples/
    log: str = "jsonl"            # where the log goes: jsonl, plus tensorboard and/or wandb (logs.py)
    log_every: int = 1            # a log row every this many steps (>= 1); evaluation rows are always logged
    eval_every: int = 25          # evaluate every this many steps and at the end; 0: never
    eval_frames: int = 3          # latent frames of each held-out video
    eval_seeds: int = 16          # fixed noises per held-out prompt: the same samples at every evaluation (paired)
    save_every: int = 100         # a checkpoint every this many steps (>= 1) and at the end
    keep_checkpoints: int = 1     # how many of the newest ckpt-* folders to keep
    resume: bool = False          # continue the run in out_dir from its latest checkpoint
    overwrite: bool = False       # a fresh run into a folder holding a run: move that run aside (run_dir.claim)


_PAPER = dict(height=None, width=None, gamma=0.9, window_frames=21, clip_frames=12, prompts_per_rank=1, group_size=24,
              micro_batch=3, lora_rank=256,
              lora_alpha=256, lr=1e-5, gradient_checkpointing=True, steps=400, eval_every=50, eval_frames=21,
              eval_seeds=4,
              save_every=50, reward="hpsv3:1,videoalign_mq:1,videoalign_ta:1", hpsv3="checkpoints/HPSv3.safetensors",
              videoalign="checkpoints/VideoReward", model="checkpoints/Wan2.1-T2V-1.3B-Diffusers",
              prompts="prompts/vidprom.txt")
# The fast paths of the 1.3B presets (bench/README.md, "One RL step at the paper's scale"): with all six a G = 24
# step took 130.7 s on an H200 (peak 45.2 GB; 2026-12-07), with the first five 134.9 s (2026-12-06), the eager step
# 201.6 s (2026-12-04). On an H100 (2026-12-06): five 151.3 s, without compile_train 162.0 s, the first three 178.6 s.
# Alone at G = 3 merged_rollouts saved 5.5 s of 32.0, checkpoint_attention 1.0 s, train_attention nothing measurable
# (kept as the G = 24 rows were measured with it; the all-but rows are not measured). fast_decode took train.py's
# warm G = 24 decode from 27.0 to 11.3 s, once its state stopped holding the compiled convs' buffers
# (vae.own_storage). compile_train (each training block compiled whole, checkpoint_attention's policy inside) took
# the G = 24 training phase from 65.8 to 54.2 s, train.py's warm step from 125.2 to 114.6 s (offline reward), for
# ~57 s more compiling in a process's first step. compile_rewards took the G = 24 step's HPSv3 phase from 29.0 to
# 24.0 s on an H200; train.py with it (real-size HPSv3, H100, 2026-12-07): warm step 126.4 s against the bench's
# 130.1 s, each phase within 5%, its first step 278.6 s on empty compile caches. Not in the krea preset: theta_old's
# merged copy of a 14B base is 28 GB more, and nothing was measured at 14B.
STEP_LEVERS = ("merged_rollouts", "fast_decode", "train_attention", "compile_train", "checkpoint_attention",
               "compile_rewards")
_FAST_STEP = dict(merged_rollouts=True, fast_decode=True, train_attention=True, compile_train=True,
                  checkpoint_attention=True, compile_rewards=True)
PRESETS = {
    "tiny": {},
    "self_forcing": dict(_PAPER, **_FAST_STEP, checkpoint="checkpoints/self_forcing_dmd.pt", checkpoint_key="generator_ema",
                         max_history_frames=9),
    "causal_forcing": dict(_PAPER, **_FAST_STEP, checkpoint="checkpoints/causal_forcing.pt", max_history_frames=9),
    "longlive": dict(_PAPER, **_FAST_STEP, checkpoint="checkpoints/longlive_base.pt", checkpoint_key="generator",
                     base_lora="checkpoints/lora.pt", window_frames=15, max_history_frames=228),
    # Krea realtime 14B (krea/krea-realtime-video): Self-Forcing on Wan2.1-T2V-14B, one .safetensors of `model.`-
    # prefixed original-Wan keys (krea-ai/realtime-video release_server.py). It attends to every earlier frame
    # (the Astrolabe release's configs/nft_krea14b.py: local_attn_size -1, sink_size 0): sink 0 and a 21-frame
    # window hold the whole history + clip, nothing rolls out. G = 8, one candidate per micro-batch, beta 0.1 as
    # there; LoRA base whole on every GPU (policy.py), or --lora_rank=0 on 8+ GPUs (README, Training)
    "krea": dict(_PAPER, model="checkpoints/Wan2.1-T2V-14B-Diffusers",
                 checkpoint="checkpoints/krea-realtime-video-14b.safetensors", sink_frames=0, window_frames=21,
                 max_history_frames=9, group_size=8, micro_batch=1, beta=0.1),
}


BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
# fields that may differ from the checkpoint's on --resume (applied, and said so); any other difference is refused
RESUME_MAY_CHANGE = ("steps", "lr", "weight_decay", "grad_clip", "gradient_checkpointing", "log_every", "eval_every",
                     "eval_frames", "eval_prompts", "save_every", "keep_checkpoints", "log", *STEP_LEVERS)
RESUME_IGNORED = ("out_dir", "resume", "overwrite")


def _value(key, text, t, nullable):
    if text.lower() == "none":
        if not nullable:
            raise SystemExit(f"error: --{key}=None: {key} needs a value")
        return None
    if t is bool:
        if text.lower() not in BOOLS:
            raise SystemExit(f"error: --{key}={text!r} is not a boolean (true/false, 1/0, yes/no)")
        return BOOLS[text.lower()]
    try:
        return t(text)
    except ValueError:
        raise SystemExit(f"error: --{key}={text!r} is not {'an int' if t is int else 'a number'}") from None


def usage():
    """--help: every field as --key=default with its comment from Config's source, under its section comment."""
    header = f"python train.py [--preset=NAME] [--key=value ...]   presets: {', '.join(PRESETS)} (default tiny)"
    return "\n".join([header, "", *flag_help(Config)])


def flag_help(cls):
    """A dataclass's fields as `--key=default  comment` lines, read from its source (a comment-only line is a
    section header, or, indented past the code, the previous comment's continuation)."""
    import inspect
    out, names = [], {f.name for f in dataclasses.fields(cls)}
    for line in inspect.getsource(cls).splitlines()[2:]:
        code, _, note = line.strip().partition("#")
        if not code and note:
            out.append(" " * 39 + note.strip() if note.startswith("   ") else "# " + note.strip())
        elif code.split(":")[0] in names:
            name = code.split(":")[0]
            out.append(f"  {f'--{name}={getattr(cls, name)}':<36} {note.strip()}")
    return out


def parse_config(argv):
    """--preset=NAME first, then --key=value for any Config field; unknown names are errors; --help lists them."""
    if {"--help", "-h"} & set(argv):
        print(usage())
        raise SystemExit(0)
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
        nullable = Config.__dataclass_fields__[k].default is None or any(p.get(k, 0) is None for p in PRESETS.values())
        setattr(cfg, k, v if types[k] is str and v.lower() != "none" else _value(k, v, types[k], nullable))
    return cfg


def read_prompts(path):
    """One prompt per non-blank line, UTF-8 (a byte-order mark is dropped: it would reach the text encoder),
    LF or CRLF line ends."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: prompt file {path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise SystemExit(f"error: prompt file {path} line {line} is not UTF-8 text (byte {data[e.start]:#04x})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"error: prompt file {path} has no prompts")
    return prompts


def check_config(cfg):
    """Every value the run depends on, before any weight is loaded; each error names the key and the value."""
    def need(ok, key, why):
        if not ok:
            raise SystemExit(f"error: {key}={getattr(cfg, key)!r} {why}")
    for k in ("frames_per_block", "window_frames", "clip_frames", "eval_frames", "eval_seeds", "prompts_per_rank", "steps",
              "log_every", "save_every", "keep_checkpoints", "k_max"):
        need(getattr(cfg, k) >= 1, k, "must be at least 1")
    for k in ("sink_frames", "max_history_frames", "eval_every", "lora_rank"):
        need(getattr(cfg, k) >= 0, k, "must be at least 0" + (" (0: never)" if k == "eval_every" else ""))
    need(cfg.clip_start is None or cfg.clip_start >= 0, "clip_start", "must be at least 0")
    for k in ("height", "width"):  # the VAE downsamples by 8 and the patch embedding by 2 more
        need(getattr(cfg, k) is None or getattr(cfg, k) >= 16 and getattr(cfg, k) % 16 == 0, k,
             "must be a positive multiple of 16 (VAE stride 8 x patch 2), or None for the generator's default")
    for f in dataclasses.fields(Config):
        if f.type is float and getattr(cfg, f.name) is not None:
            need(math.isfinite(getattr(cfg, f.name)), f.name, "must be a finite number")
    for k in ("lr", "beta", "a_max", "tau_kl", "grad_clip"):
        need(getattr(cfg, k) > 0, k, "must be positive")
    # AdamW moves each weight by about lr a step and scales it by 1 - lr * weight_decay: past these the weights
    # overflow or flip sign every step
    need(cfg.lr <= 1, "lr", "must be at most 1 (AdamW moves every weight by about lr per step)")
    need(cfg.lr * cfg.weight_decay < 1, "weight_decay", f"times lr={cfg.lr} must be below 1 (AdamW scales the weights "
                                                        f"by 1 - lr * weight_decay each step)")
    need(0 <= cfg.seed < 2 ** 63, "seed", "must lie in [0, 2^63) (torch.manual_seed)")
    need(not (cfg.resume and cfg.overwrite), "overwrite", "and --resume=true exclude each other: continue the run "
                                                          "in out_dir, or move it aside and start anew")
    for k in ("kl_weight", "weight_decay"):
        need(getattr(cfg, k) >= 0, k, "must be at least 0")
    for k in ("gamma", "rho"):
        need(0 <= getattr(cfg, k) <= 1, k, "must lie in [0, 1]")
    need(cfg.lora_rank == 0 or cfg.lora_alpha > 0, "lora_alpha", "must be positive (LoRA scale alpha / r)")
    need(cfg.base_lora_alpha is None or cfg.base_lora_alpha > 0, "base_lora_alpha",
         "must be positive (base_lora's scale alpha / r), or None for alpha = r")
    n = cfg.frames_per_block
    need(cfg.window_frames >= n, "window_frames", f"is smaller than one block (frames_per_block={n})")
    need(cfg.sink_frames <= cfg.window_frames, "sink_frames", f"must be at most window_frames={cfg.window_frames}")
    for k in ("clip_frames", "max_history_frames", "eval_frames", "clip_start"):
        if (getattr(cfg, k) or 0) % n:
            raise SystemExit(f"error: {k}={getattr(cfg, k)} is not a multiple of frames_per_block={n}")
    if cfg.clip_frames > cfg.window_frames:
        raise SystemExit(f"error: clip_frames={cfg.clip_frames} is longer than window_frames={cfg.window_frames} allows")
    if cfg.group_size < 2:
        raise SystemExit(f"error: group_size={cfg.group_size}: advantages need at least 2 candidates per prompt")
    if cfg.micro_batch < 1:
        raise SystemExit(f"error: micro_batch={cfg.micro_batch} must be at least 1")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise SystemExit(f"error: out_dir={cfg.out_dir!r} is a file, not a folder")


def check_frames(cfg, max_frames):
    """The generator's RoPE table bounds every absolute frame index a run reaches (model.CausalWan.rope)."""
    last = max(cfg.max_history_frames, cfg.clip_start or 0) + cfg.clip_frames
    if last > max_frames or (cfg.eval_every and cfg.eval_frames > max_frames):
        raise SystemExit(f"error: clip_start/max_history_frames + clip_frames = {last} or eval_frames = "
                         f"{cfg.eval_frames} is past the generator's {max_frames}-frame RoPE table")


def resume_changes(saved, cfg):
    """Compare a checkpoint's config with this run's: returns the changes that are applied ({key: (old, new)});
    any other difference stops the run, listing every differing key (resume must equal an unbroken run)."""
    now = dataclasses.asdict(cfg)
    diff = {k: (saved[k], now[k]) for k in saved.keys() & now.keys() if saved[k] != now[k] and k not in RESUME_IGNORED}
    refused = {k: v for k, v in diff.items() if k not in RESUME_MAY_CHANGE}
    if refused:
        listing = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(refused.items()))
        raise SystemExit(f"error: --resume with a config that differs from the checkpoint's in {listing} "
                         f"(only {', '.join(RESUME_MAY_CHANGE)} may change)")
    return {k: v for k, v in diff.items() if k in RESUME_MAY_CHANGE}
