"""Checkpoint formats and loading: diffusers folders, the original-Wan layout of Self-Forcing, Causal-Forcing,
LongLive and Krea (renamed to diffusers' names, strict, every mismatch named), LongLive's LoRA folded into the
base, and the folders train.py writes."""
import os
import re

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5EncoderModel

from files import read_json, read_safetensors, read_torch
from model import CausalWan, TextEncoder, Wan, load_tiny


# Original-Wan layout -> diffusers names (the Wan 2.1 repository's wan/modules/model.py names).
_RENAMES = [
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"\.self_attn\.", ".attn1."), (r"\.cross_attn\.", ".attn2."),
    (r"\.(attn[12])\.([qkv])\.", r".\1.to_\2."), (r"\.(attn[12])\.o\.", r".\1.to_out.0."),
    (r"\.ffn\.0\.", ".ffn.net.0.proj."), (r"\.ffn\.2\.", ".ffn.net.2."),
    (r"^(blocks\.\d+)\.modulation$", r"\1.scale_shift_table"),
    (r"\.norm3\.", ".norm2."),  # original: norm3 = cross-attention norm (diffusers norm2)
    (r"^head\.head\.", "proj_out."), (r"^head\.modulation$", "scale_shift_table"),
]


# diffusers names -> original-Wan layout: the inverse of _RENAMES, for writing what Self-Forcing and LongLive read
_INVERSE = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"\.(attn[12])\.to_([qkv])\.", r".\1.\2."), (r"\.(attn[12])\.to_out\.0\.", r".\1.o."),
    (r"\.attn1\.", ".self_attn."), (r"\.attn2\.", ".cross_attn."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."), (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"\.norm2\.", ".norm3."),
    (r"^proj_out\.", "head.head."), (r"^scale_shift_table$", "head.modulation"),
]


def diffusers_to_wan(key):
    """One diffusers-layout key in the original-Wan name; a key with no original name (another model family)
    is a KeyError, found by renaming back: only a name that returns to itself is one Wan has."""
    out = key
    for pattern, repl in _INVERSE:
        out = re.sub(pattern, repl, out)
    try:
        back = wan_to_diffusers(out)
    except KeyError:
        back = None
    if back != key:
        raise KeyError(f"no original-Wan name for {key!r}")
    return out


def wan_to_diffusers(key):
    """One original-layout key (prefixes `model.`, `_fsdp_wrapped_module.`, `base_model.model.` allowed)."""
    key = key.replace("_fsdp_wrapped_module.", "")
    key = re.sub(r"^(base_model\.model\.|model\.)", "", key)
    if not key.startswith(("blocks.", "patch_embedding.", "text_embedding.", "time_embedding.",
                           "time_projection.", "head.")):
        raise KeyError(f"not an original-Wan key: {key!r}")
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def read_checkpoint(path, key=None):
    """A state dict from .safetensors or .pt (weights_only: a checkpoint cannot run code).

    Self-Forcing / Causal-Forcing / LongLive files keep the generator under `generator_ema` or
    `generator`, LongLive's LoRA under `generator_lora`; `key` picks one, else the first present."""
    sd = read_safetensors(path) if path.endswith(".safetensors") else read_torch(path, mmap=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict")
    nested = [k for k in ("generator_ema", "generator", "generator_lora", "state_dict") if k in sd]
    if key is not None:
        if key not in sd:
            raise ValueError(f"{path} has no entry {key!r}; top-level keys: {sorted(map(str, sd))[:10]}")
        sd = sd[key]
    elif nested:
        sd = sd[nested[0]]
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not torch.is_tensor(v)] if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or bad:
        raise ValueError(f"{path}: not a state dict of named tensors (e.g. {str(bad)[:100]})")
    return sd


def check_finite(sd, source):
    """A NaN or inf weight would turn every frame black: stop at load time, naming the file and the tensor."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{source}: non-finite (NaN or inf) values in {len(bad)} tensor(s), e.g. {bad[:3]}")


def load_wan_state_dict(transformer, sd, source="state dict"):
    """Load an original-layout (or diffusers-layout) state dict strictly, naming any key mismatch."""
    if not any(k.startswith("condition_embedder.") for k in sd):  # not already in diffusers names
        try:
            sd = {wan_to_diffusers(k): v for k, v in sd.items()}
        except KeyError as err:
            raise ValueError(f"unknown checkpoint layout in {source}: {err.args[0]}") from None
    check_finite(sd, source)
    own = transformer.state_dict()
    wrong = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{source} does not match the Wan transformer (another model size?): {wrong[:5]}")
    missing, unexpected = transformer.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source} does not match the Wan transformer: missing keys {missing[:20]}, "
                         f"unexpected keys {unexpected[:20]}")
    return transformer


@torch.no_grad()
def merge_lora(transformer, sd, alpha=None, source="LoRA"):
    """Fold a PEFT LoRA (LongLive's `generator_lora`) into the base weights: W += alpha/r B A."""
    check_finite(sd, source)
    pairs = {}
    for k, v in sd.items():
        m = re.match(r"(.*)\.lora_([AB])(\.[^.]+)?\.weight$", k)
        if not m:
            raise ValueError(f"{source}: not a LoRA key: {k!r}")
        try:
            name = wan_to_diffusers(m.group(1) + ".weight")[:-len(".weight")]
        except KeyError as err:
            raise ValueError(f"{source}: {err.args[0]}") from None
        pairs.setdefault(name, {})[m.group(2)] = v
    modules = dict(transformer.named_modules())
    for name, ab in pairs.items():
        if name not in modules or set(ab) != {"A", "B"}:
            raise ValueError(f"{source}: {name!r} is not a Linear of the transformer or lacks lora_A/lora_B")
        A, B = ab["A"].float(), ab["B"].float()
        weight = modules[name].weight
        if (B.shape[0], A.shape[1]) != tuple(weight.shape):
            raise ValueError(f"{source}: LoRA for {name!r} is {B.shape[0]}x{A.shape[1]}, the weight is "
                             f"{tuple(weight.shape)} (a checkpoint of another model size?)")
        scale = (alpha or A.shape[0]) / A.shape[0]
        weight.copy_((weight.float() + scale * B.to(weight.device) @ A.to(weight.device)).to(weight.dtype))
    return transformer


# the files diffusers' from_pretrained reads for each part of a Wan2.1 folder
MODEL_FILES = ("transformer/config.json", "text_encoder/config.json", "vae/config.json", "tokenizer")


def check_model_dir(model, parts=MODEL_FILES):
    """A diffusers Wan2.1 folder holds what load() reads: checked before any part of it is built."""
    if not os.path.isdir(model):
        raise FileNotFoundError(f"no diffusers model folder at {model}")
    missing = [f for f in parts if not os.path.exists(os.path.join(model, f))]
    if missing:
        raise FileNotFoundError(f"{model} is not a diffusers Wan2.1 folder: it lacks {', '.join(missing)}")


# A train.py checkpoint folder (ckpt-NNNNNN; policy.save_checkpoint writes it, the readers below and export.py read
# it): each policy's weights, peft's adapter config beside LoRA weights, and the run state (step, optimizer,
# controller, config, RNG). theta is the LoRA adapter (peft's format: peft and sample.py --lora read it) or, for full
# fine-tuning, the whole transformer; theta_old and theta_ref lie beside it in the same layout.
THETA_FILES = {True: "adapter_model.safetensors", False: "transformer.safetensors"}  # by LoRA or not
TRAINED_FILES = {"old": "old.safetensors", "ref": "ref.safetensors"}  # theta_old, theta_ref beside theta
ADAPTER_CONFIG, STATE = "adapter_config.json", "state.pt"


def trained_files(lora):
    """{policy name: file} of a checkpoint folder (policy.Policy.NAMES: default = theta, old, ref)."""
    return {"default": THETA_FILES[lora], **TRAINED_FILES}


def check_trained(path):
    """That `path` is a train.py checkpoint folder (before any generator is built); returns its weights file."""
    for lora, name in THETA_FILES.items():
        if os.path.isfile(os.path.join(path, name)):
            if lora and not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
                raise FileNotFoundError(f"{path} holds {name} but no {ADAPTER_CONFIG}: not a whole checkpoint")
            return os.path.join(path, name)
    raise FileNotFoundError(f"{path} is not a train.py checkpoint folder: it holds neither {THETA_FILES[True]} "
                            f"nor {THETA_FILES[False]}")


def load_trained(transformer, path, which="theta"):
    """Fold a train.py checkpoint folder into the generator: a LoRA adapter (peft format) or full weights.
    which: theta (the trained policy), old or ref (the other two policies the folder keeps)."""
    lora = check_trained(path).endswith(THETA_FILES[True])
    file = os.path.join(path, TRAINED_FILES.get(which, THETA_FILES[lora]))
    if lora:
        config = read_json(os.path.join(path, ADAPTER_CONFIG))
        alpha = config.get("lora_alpha") if isinstance(config, dict) else None
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"{path}/{ADAPTER_CONFIG}: lora_alpha must be a positive number, got {alpha!r}")
        return merge_lora(transformer, read_safetensors(file), alpha, file)
    return load_wan_state_dict(transformer, read_safetensors(file), file)


def _needs_model(model, checkpoint, lora):
    if model is None and (checkpoint or lora):
        raise ValueError("a checkpoint or LoRA needs --model, the diffusers Wan2.1 folder it builds on")


def load_transformer(model=None, checkpoint=None, checkpoint_key=None, lora=None, lora_alpha=None, dtype=torch.bfloat16):
    """The generator's transformer alone (what a train.py checkpoint adapts), built as load() builds it."""
    _needs_model(model, checkpoint, lora)
    if model is None:
        return load_tiny().model.transformer.to(dtype)
    check_model_dir(model, ("transformer/config.json",))
    transformer = WanTransformer3DModel.from_pretrained(model, subfolder="transformer", torch_dtype=dtype)
    if checkpoint:
        load_wan_state_dict(transformer, read_checkpoint(checkpoint, checkpoint_key), checkpoint)
    if lora:
        merge_lora(transformer, read_checkpoint(lora), lora_alpha, lora)
    return transformer


def load(model=None, checkpoint=None, checkpoint_key=None, lora=None, lora_alpha=None, dtype=torch.bfloat16):
    """The generator a user asks for: tiny (model=None), a diffusers folder, optionally with an
    original-layout checkpoint (Self-Forcing, Causal-Forcing, LongLive base) and a LongLive LoRA."""
    _needs_model(model, checkpoint, lora)
    if model is None:
        return load_tiny()
    from transformers import AutoTokenizer
    check_model_dir(model)
    transformer = load_transformer(model, checkpoint, checkpoint_key, lora, lora_alpha, dtype)
    encoder = UMT5EncoderModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    vae = AutoencoderKLWan.from_pretrained(model, subfolder="vae", torch_dtype=dtype).eval()  # bf16 on GPU as in Self-Forcing
    return Wan(CausalWan(transformer).eval(), TextEncoder(tokenizer, encoder, 512), vae)
