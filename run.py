"""A training run's objects, built once (train.py's setup): the prompts, the generator, the rewards, the three
policies, the optimizer and the mask's controller on this rank's device, with the files they need checked first."""
import dataclasses
import os

import torch
import torch.distributed as dist

import checkpoints
import fast
import loss
import model
import offload
from config import read_prompts
from logs import RunLog
from policy import Policy
from rewards import build_reward, check_rewards, parse_spec
from run_dir import claim_on_rank0


@dataclasses.dataclass
class Run:
    """What a training run holds: build makes it, train_step and evaluate read it."""
    rank: int
    world: int
    device: torch.device
    prompts: list            # the training prompts (cfg.prompts), one per line
    eval_prompts: list       # the held-out prompts (cfg.eval_prompts)
    wan: model.Wan               # generator, text encoder, VAE
    reward_fn: object        # rewards.CompositeReward: frames, prompts -> {name: [N]} with "composite"
    policy: Policy           # theta, theta_old, theta_ref
    opt: torch.optim.Optimizer
    ctrl: loss.Controller       # the uncertainty mask's rho and the dynamic reference's clock
    fast_eval: bool = False  # held-out evaluations through the compiled sampling path (fast.py)
    decode_batch: int = 0    # candidates per decoder call in a step's decode (0: the micro-batch; fast_train.py)
    log: RunLog = None       # rank 0's log (logs.py), None elsewhere
    spread: dict = dataclasses.field(default_factory=dict)  # the last step's rewards and advantages (histograms)
    lap_hook: object = None  # Phases' hook: called with each phase's name as it ends (the bench counts FLOPs)



def check_paths(cfg, generator=True, rewards=True):
    """The files a run will load (the generator's, the rewards' the spec uses) exist, and a model folder holds what
    diffusers reads, before loading any and before out_dir is claimed."""
    try:
        names = [name for name, _ in parse_spec(cfg.reward)] if rewards else []
    except ValueError as e:
        raise SystemExit(f"error: --reward: {e}") from None
    check_rewards(names, cfg)
    if generator and cfg.model is None and (cfg.checkpoint or cfg.base_lora):
        raise SystemExit("error: checkpoint and base_lora need model=PATH, the diffusers Wan2.1 folder they build on")
    paths = dict(model=cfg.model, checkpoint=cfg.checkpoint, base_lora=cfg.base_lora) if generator else {}
    paths.update(hpsv3=cfg.hpsv3 if "hpsv3" in names else None,
                 videoalign=cfg.videoalign if any(k.startswith("videoalign_") for k in names) else None,
                 videoalign_base=cfg.videoalign_base if any(k.startswith("videoalign_") for k in names) else None)
    for k, path in paths.items():
        if path is not None and not os.path.exists(path):
            raise SystemExit(f"error: {k}={path!r} does not exist")
    if generator and cfg.model is not None:
        from checkpoints import check_model_dir  # (imports diffusers: only when a folder is named)
        try:
            check_model_dir(cfg.model)
        except FileNotFoundError as e:
            raise SystemExit(f"error: model={cfg.model!r}: {e}") from None


def build(cfg, wan=None, reward_fn=None, claim=False):
    """Everything a run needs, on this rank's device (a Run): prompts, generator, rewards, policies, optimizer.
    claim: first make out_dir this run's (run_dir.claim), before any model is built."""
    prompts, eval_prompts = read_prompts(cfg.prompts), read_prompts(cfg.eval_prompts)
    check_paths(cfg, generator=wan is None, rewards=reward_fn is None)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")  # CPU threads: OMP_NUM_THREADS (torchrun sets 1 per process)
    if device.type == "cuda" and cfg.lora_rank == 0 and world == 1:  # FSDP2 (policy.shard) holds fp32 masters
        raise SystemExit("error: --lora_rank=0 (full fine-tuning) on one GPU would train bf16 weights, in which "
                         "AdamW's steps at --lr=1e-5 vanish; run it under torchrun on 2+ GPUs, or use LoRA")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if claim:
        claim_on_rank0(cfg.out_dir, cfg.resume, cfg.overwrite, rank, world)
    paths = {"hpsv3": cfg.hpsv3, "hpsv3_tokenizer": cfg.hpsv3_tokenizer, "videoalign": cfg.videoalign,
             "videoalign_base": cfg.videoalign_base}
    reward_fn = reward_fn or build_reward(cfg.reward, device, {k: v for k, v in paths.items() if v})
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    wan = (wan or checkpoints.load(cfg.model, cfg.checkpoint, cfg.checkpoint_key, cfg.base_lora, cfg.base_lora_alpha,
                         dtype=dtype)).to(device)
    wan.height, wan.width = cfg.height or wan.height, cfg.width or wan.width
    # umT5 and the reward models wait in pinned CPU memory outside their phase (offload.py; no-op on the CPU)
    offload.park(wan.text_encoder.encoder.requires_grad_(False), device)
    for scorer in filter(None, getattr(reward_fn, "models", [])):
        offload.park(scorer, device)
    torch.manual_seed(cfg.seed)  # after loading: load_tiny seeds its fixed weights itself; the LoRA init follows --seed
    policy = Policy(cfg, wan, world)
    opt = torch.optim.AdamW(policy.params("default"), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=cfg.weight_decay)
    # the decoded clips' host buffer (train_step), pinned now: pinning 5.5 GB would take seconds of the first step
    offload.host_buffer("frames", (cfg.group_size, 4 * cfg.clip_frames, 3, wan.height, wan.width), torch.float32, device)
    # the held-out evaluations through the compiled sampling path (fast.py) where the run's evaluations, all
    # together, generate enough to pay for compiling; not on FSDP2-sharded weights (each forward a collective)
    evals = (cfg.steps // cfg.eval_every + 1) if cfg.eval_every else 0
    fast_eval = (policy.lora or world == 1) and \
        fast.wanted(None, device, evals * len(eval_prompts) * cfg.eval_seeds * cfg.eval_frames / world)
    run = Run(rank, world, device, prompts, eval_prompts, wan, reward_fn, policy, opt,
              loss.Controller(cfg.rho, tau_kl=cfg.tau_kl, k_max=cfg.k_max), fast_eval)
    from fast_train import configure
    return configure(run, cfg)  # the fast paths: merged rollouts, compiled decoder, attention (fast_train.py)
