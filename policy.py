"""theta, theta_old and theta_ref (paper Algorithm 1) and their checkpoints.

LoRA (the default): three peft adapters `default` (theta, trainable), `old` (the rollout policy, an EMA of
theta) and `ref` (the KL anchor) on one frozen base, r = alpha on every Linear of the transformer blocks. The base
stays whole on every GPU (DDP over the adapters), as the Astrolabe release trains Krea 14B too: sharding it would
add a gather of every block to each of the rollout's many forwards (README, Training).
Full fine-tuning (lora_rank=0): three copies, sharded with FSDP2 under torchrun, one unit per transformer block
(see shard). loss.ema_ / loss.copy_ update `old` and `ref` through the parameter lists this module hands out.
"""
import contextlib
import dataclasses
import json
import os
import re
import shutil
import warnings

import torch

import loss
from config import resume_changes
from files import read_safetensors, read_torch, replace_durably, write_text_durably
from checkpoints import ADAPTER_CONFIG, STATE, check_finite, trained_files
from model import CausalWan, to_x0
from rollout import clip_velocity

CKPT = re.compile(r"ckpt-\d{6}")  # the folders save_checkpoint writes; `latest` must name one of them


class Policy:
    """The three policies of one generator; net(name) returns the CausalWan computing `name`."""

    NAMES = ("default", "old", "ref")

    def __init__(self, cfg, wan, world):
        self.model, self.lora = wan.model, cfg.lora_rank > 0
        self.active, self.lora_named = None, {}  # the active adapter (LoRA), each adapter's (key, tensor) list
        tr = self.model.transformer
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        if self.lora:
            self.lora_config = add_adapters(tr, cfg.lora_rank, cfg.lora_alpha, self.NAMES)
            self.nets = dict.fromkeys(self.NAMES, self.model)
        else:
            import copy
            self.nets = {}
            for name in ("ref", "old", "default"):  # each copy sharded as soon as made: never three whole on a GPU
                net = self.nets[name] = self.model if name == "default" else copy.deepcopy(self.model)
                net.requires_grad_(name == "default")
                if world > 1:
                    shard(net, cfg.fsdp_per_block, master_fp32=name != "ref")
        for name in ("old", "ref"):
            loss.copy_(self.params(name), self.params("default"))
        self.net("default")
        self.merged, self.use_merged = None, False  # theta_old folded into a plain copy (merge_old)
        self.n = cfg.frames_per_block
        # theta's training forward as one module call: under torchrun DDP then sees one forward per backward
        self.train_net = ClipForward(self.model, self.n)
        if world > 1 and self.lora:
            self.train_net = torch.nn.parallel.DistributedDataParallel(self.train_net, broadcast_buffers=False)

    def x0(self, name, x_t, sigma, text, cache, start, text_kv=None):
        """Eq. 1-2's x0 = x_t - sigma v of policy `name` for a clip's noisy blocks x_t [m, C, F, h, w] at noise
        levels sigma [m], in the rollout's attention layout (rollout.clip_velocity over `cache`): theta ("default")
        with gradients, through train_net; theta_old ("old": rollout_net) and theta_ref ("ref") without. text: the
        prompt's umT5 embedding; text_kv: the policy's text K/V where already at hand (theta_old's, from the
        rollout). theta is the active adapter again on return, whichever policy ran."""
        if name == "default":
            return to_x0(x_t, self.train_net(text, x_t, sigma, cache, start), sigma)
        with torch.no_grad(), self.using(name) as net:
            v = clip_velocity(net, x_t, sigma, net.text_kv(text) if text_kv is None else text_kv, cache, start, self.n)
        return to_x0(x_t, v, sigma)

    @contextlib.contextmanager
    def using(self, name):
        """The CausalWan computing policy `name` ("old": rollout_net) for the enclosed work; theta after it."""
        try:
            yield self.rollout_net() if name == "old" else self.net(name)
        finally:
            self.net("default")

    def rollout_net(self):
        """The CausalWan for theta_old's no-grad work (history, clip rollouts, clip-cache recompute, x0_old;
        Algorithm 1's rollout policy): the merged copy when in use, else the `old` adapter."""
        return self.merged if self.use_merged and self.merged is not None else self.net("old")

    @torch.no_grad()
    def merge_old(self):
        """Fold theta_old's LoRA into a plain copy of the base (made on first use): W + (alpha / r) B A per adapted
        Linear, summed in fp32 and rounded once to the base's dtype. The rollouts then run a plain transformer,
        no peft in the loop, compiled like sampling's (fast_train.py). Called whenever theta_old changes: after its
        EMA (train.train_step), after loading a checkpoint and when switched on; a no-op unless use_merged."""
        if not (self.lora and self.use_merged):
            return None
        tr = self.model.transformer
        if self.merged is None:
            self.merged = CausalWan(plain_copy(tr)).to(tr.device).eval().requires_grad_(False)
        plain = self.merged.transformer
        for name, mod in tr.named_modules():
            if hasattr(mod, "lora_A") and "old" in mod.lora_A:
                if getattr(mod, "fan_in_fan_out", False) or getattr(mod, "use_dora", {}).get("old", False):
                    raise ValueError(f"{name}: only plain LoRA on nn.Linear can be merged")
                delta = mod.lora_B["old"].weight.float() @ mod.lora_A["old"].weight.float() * mod.scaling["old"]
                plain.get_submodule(name).weight.copy_(mod.base_layer.weight.float() + delta)
        return self.merged

    def named(self, name):
        """(checkpoint key, tensor) of one policy, in a fixed order shared by the three."""
        if not self.lora:
            net = self.nets[name]
            if hasattr(net, "reshard"):  # FSDP2 leaves a root's parameters gathered after a forward
                net.reshard()
            return list(net.transformer.named_parameters())
        if name not in self.lora_named:  # the adapters' tensors stay the same objects (updated in place): listed once
            tag = f".{name}.weight"
            self.lora_named[name] = [(k.replace(tag, ".weight"), p)
                                     for k, p in self.model.transformer.named_parameters() if k.endswith(tag)]
        return self.lora_named[name]

    def params(self, name):
        return [p for _, p in self.named(name)]

    def net(self, name):
        """The CausalWan computing policy `name` (switching the active LoRA adapter, where another one is active:
        the loss loop asks for theta_old, theta_ref and theta per micro-batch)."""
        if self.lora and self.active != name:
            self.active = name
            self.model.transformer.set_adapter(name)
            for n in self.NAMES:  # peft makes the active adapter trainable; only theta ever is
                for p in self.params(n):
                    p.requires_grad_(n == "default")
        return self.nets[name]


def add_adapters(tr, rank, alpha, names):
    """peft LoRA adapters `names` (r = rank, alpha) on every Linear of the transformer blocks of `tr`, its base frozen;
    returns their LoraConfig. The adapters are fp32 over a bf16 base (a GPU's): AdamW's steps at lr 1e-5 and theta_old's
    EMA moves are below bf16's spacing at an adapter's scale (a LoRA A entry ~1/sqrt(1536) = 0.026: spacing 1.2e-4), so
    bf16 adapters would keep few of either. train.py's bf16 autocast still runs their matmuls in bf16, so peft's fp32
    copy of each input (cast_input_dtype), which autocast would only cast back, is switched off."""
    from peft import LoraConfig
    tr.requires_grad_(False)
    targets = sorted(n for n, mod in tr.named_modules() if n.startswith("blocks.") and isinstance(mod, torch.nn.Linear))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters by design
        for name in names:
            tr.add_adapter(config, adapter_name=name)
    for k, p in tr.named_parameters():
        if ".lora_" in k:
            p.data = p.data.float()
    for mod in tr.modules():
        if hasattr(mod, "cast_input_dtype_enabled"):
            mod.cast_input_dtype_enabled = False
    return config


def plain_copy(tr):
    """A copy of peft-adapted `tr` (a diffusers model) without peft's layers: the base weights (each LoRA layer's
    base_layer) and buffers, cloned with their dtypes and devices; made on the meta device, so nothing is
    initialised only to be overwritten."""
    with torch.device("meta"):
        plain = type(tr).from_config(tr.config)
    src = {k.replace(".base_layer.", "."): v for k, v in [*tr.named_parameters(), *tr.named_buffers()]
           if ".lora_" not in k}
    for k, _ in [*plain.named_parameters(), *plain.named_buffers()]:
        path, _, attr = k.rpartition(".")
        mod = plain.get_submodule(path)
        t = src.pop(k).detach().clone()
        if attr in mod._parameters:
            mod._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[attr] = t
    if src:
        raise ValueError(f"the adapted model holds tensors its plain copy lacks: {sorted(src)[:5]}")
    return plain


def shard(net, per_block=True, master_fp32=True):
    """FSDP2 over one CausalWan: parameters sharded at rest, gathered for each call. per_block: each transformer
    block is its own unit, gathered just for its own calls, so a forward holds one block whole at a time, not the
    model (False: the whole generator as one unit, for comparison in python -m bench fsdp). CausalWan calls blocks only
    through CausalBlock's two methods, registered here as forward methods, so FSDP2's hooks see every call.
    On a GPU, bf16 compute over fp32 weights (mixed precision): AdamW's steps at lr 1e-5 and theta_old's EMA
    (gamma 0.9) are below bf16's resolution; gradients are reduced in fp32. master_fp32=False (theta_ref, only
    ever a copy of theta) keeps the loaded bf16: the bf16 gather of theta is what its forward sees anyway."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    from torch.distributed.tensor import DTensor
    gpu = net.transformer.device.type == "cuda"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if gpu else MixedPrecisionPolicy()
    if gpu:
        net.param_dtype = torch.bfloat16

    def fp32(module):  # before sharding, one unit at a time: only one unit is ever whole in fp32
        for p in module.parameters() if gpu and master_fp32 else ():
            if not isinstance(p, DTensor):  # (the blocks' are sharded already)
                p.data = p.data.float()
    for blk in net.transformer.blocks if per_block else ():
        fp32(blk)
        fully_shard(blk, mp_policy=mp)
        register_fsdp_forward_method(blk, "causal_forward")
        register_fsdp_forward_method(blk, "text_kv")
    fp32(net)
    fully_shard(net, mp_policy=mp)
    register_fsdp_forward_method(net, "text_kv")


class ClipForward(torch.nn.Module):
    """theta's training forward as one module call, so DDP sees one forward per backward."""

    def __init__(self, model, frames_per_block):
        super().__init__()
        self.model, self.n = model, frames_per_block

    def forward(self, text, x_t, sigma, cache, start):
        return clip_velocity(self.model, x_t, sigma, self.model.text_kv(text), cache, start, self.n)


def full_tensor(t):
    """A plain CPU tensor from a parameter, gathering it first if FSDP2 shards it (collective)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().contiguous()


def clean_stale(out_dir):
    """Remove what a crash during save_checkpoint leaves behind: ckpt-*.tmp folders and latest.tmp."""
    for d in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        if d == "latest.tmp" or d.startswith("ckpt-") and d.endswith(".tmp"):
            path = os.path.join(out_dir, d)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            print(f"removed {path}, left by an interrupted save")


def save_checkpoint(step, cfg, ctx):
    """Atomic: written under a temporary name, fsync'ed, renamed, then `latest` is switched (also atomically);
    then all but the newest `keep_checkpoints` folders are removed. A crash (or a power loss) at any point leaves
    the previous checkpoint whole and `latest` pointing at it."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    # a collective under FSDP2: every rank takes part
    tensors = {name: {k: full_tensor(p) for k, p in ctx.policy.named(name)} for name in Policy.NAMES}
    optim = get_optimizer_state_dict(ctx.policy.nets["default"], ctx.opt,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.rank != 0:
        return
    final = os.path.join(cfg.out_dir, f"ckpt-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, file in trained_files(ctx.policy.lora).items():
        save_file(tensors[name], os.path.join(tmp, file))
    if ctx.policy.lora:  # peft's adapter format: sample.py --lora and peft can read it
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(ctx.policy.lora_config.to_dict(), f, default=sorted, indent=1)
    torch.save({"step": step, "optimizer": optim, "controller": ctx.ctrl.state_dict(),
                "config": dataclasses.asdict(cfg), "rng": torch.get_rng_state()}, os.path.join(tmp, STATE))
    shutil.rmtree(final, ignore_errors=True)
    replace_durably(tmp, final)
    write_text_durably(os.path.join(cfg.out_dir, "latest"), os.path.basename(final))
    for d in sorted(d for d in os.listdir(cfg.out_dir) if CKPT.fullmatch(d))[:-cfg.keep_checkpoints]:
        if d != os.path.basename(final):
            shutil.rmtree(os.path.join(cfg.out_dir, d))


def load_checkpoint(cfg, ctx):
    """Resume from out_dir/latest; returns the step it was saved at and the config changes applied. Strict: names
    and shapes must match, weights must be finite, the config may differ only where config.RESUME_MAY_CHANGE says.
    A damaged file is a ValueError naming it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    pointer = os.path.join(cfg.out_dir, "latest")
    if not os.path.isfile(pointer):
        raise SystemExit(f"error: --resume but {pointer} does not exist")
    with open(pointer) as f:
        name = f.read().strip()
    if not CKPT.fullmatch(name):
        raise SystemExit(f"error: {pointer} holds {name[:80]!r}, not the name of a ckpt-NNNNNN folder in {cfg.out_dir}")
    path = os.path.join(cfg.out_dir, name)
    if not os.path.isdir(path):
        raise SystemExit(f"error: {pointer} names {path}, which does not exist")
    state_file = os.path.join(path, STATE)
    state = read_torch(state_file)
    missing = {"step", "optimizer", "controller", "config", "rng"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise ValueError(f"{state_file} lacks {sorted(missing)}: not a state.pt written by train.py")
    if cfg.steps <= state["step"]:
        raise SystemExit(f"error: --steps={cfg.steps}: {path} is already at step {state['step']}; ask for more steps")
    changes = resume_changes(state["config"], cfg)
    with torch.no_grad():
        for name, file in trained_files(ctx.policy.lora).items():
            file = os.path.join(path, file)
            saved, mine = read_safetensors(file), dict(ctx.policy.named(name))
            check_finite(saved, file)
            bad = sorted(set(saved) ^ set(mine)) + [k for k in mine
                                                    if k in saved and saved[k].shape != full_tensor(mine[k]).shape]
            if bad:
                raise SystemExit(f"error: {file} does not fit this model (another size or LoRA rank?): {bad[:5]}")
            for k, p in mine.items():
                full = saved[k].to(p.dtype)
                p.copy_(torch.distributed.tensor.distribute_tensor(full, p.device_mesh, p.placements)
                        if hasattr(p, "device_mesh") else full.to(p.device))
    set_optimizer_state_dict(ctx.policy.nets["default"], ctx.opt, state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    for group in ctx.opt.param_groups:  # the saved param_groups carry the old values: this run's apply
        group["lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
    ctx.ctrl.load_state_dict(state["controller"])
    torch.set_rng_state(state["rng"])
    ctx.policy.merge_old()  # the copy follows the loaded theta_old: a resumed run equals an unbroken one
    return state["step"], changes
