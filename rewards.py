"""Composite clip reward (paper Sec. 3.3 / 4.1): VQ = HPSv3 mu over the top 30% of frames, MQ = VideoAlign
on grayscale frames, TA = VideoAlign on RGB frames, composite = their weighted sum. Both reward models run
Qwen2-VL as they were trained (MizzenAI/HPSv3 hpsv3/model/qwen2vl_trainer.py, KwaiVGI/VideoAlign
trainer.py): embed tokens, run the vision tower, scatter its features into the embeddings, call the
language model on inputs_embeds with sequential positions (the stock M-RoPE forward scores differently).
DEFAULT_OFFLINE_SPEC: cheap pixel-space stand-ins for the three axes, for runs without weights."""
import importlib, json, math, re, time
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from offload import resident
from files import read_safetensors, read_torch

DEFAULT_OFFLINE_SPEC = "colorfulness:1,smoothness:1,prompt_color:1"
SOURCE_FPS = 16  # decoded Wan clips


def top30_mean(scores):
    """[B, F] per-frame scores -> [B]: mean of the best 30% of frames, at least one (Astrolabe release
    astrolabe/rewards.py: k = max(1, int(F * 0.3)), here in exact integer arithmetic)."""
    return scores.topk(max(1, 3 * scores.shape[1] // 10), dim=1).values.mean(1)


def luma(frames):
    """[..., 3, H, W] -> [..., H, W], ITU-R BT.601 weights (PIL convert("L"), torchvision rgb_to_grayscale)."""
    return (frames * frames.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(-3)


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


# ------------------------------------------------------------------------------------ Qwen2-VL plumbing
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN / _STD: normalisation of the
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # Qwen2-VL image and video processors (transformers)
# Qwen2-VL-Instruct chat template, one user turn [vision, text], default system turn, generation prompt.
CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|>{vision}<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")


def smart_resize(h, w, min_pixels, max_pixels, factor=28):
    """Multiples of 28, min_pixels <= h*w <= max_pixels, aspect kept (qwen-vl-utils, VideoAlign vision_process.py)."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def to_patches(clips, min_pixels, max_pixels, patch=14, merge=2):
    """[N, T, 3, H, W] in [0, 1], T even -> flat patches [N*t*h*w, 3*2*14*14] and grid_thw [N, 3]. 8-bit
    rounding around the antialiased bicubic resize mimics the decoded uint8 frames both models saw
    (VideoAlign resizes uint8 video); patch order as transformers' Qwen2VLVideoProcessor.patchify."""
    n, t, c, h, w = clips.shape
    rh, rw = smart_resize(h, w, min_pixels, max_pixels, patch * merge)
    q8 = lambda x: x.clamp(0, 1).mul(255).round().div(255)
    x = F.interpolate(q8(clips.float()).flatten(0, 1), size=(rh, rw), mode="bicubic", antialias=True)
    x = (q8(x) - x.new_tensor(CLIP_MEAN)[:, None, None]) / x.new_tensor(CLIP_STD)[:, None, None]
    gt, gh, gw = t // 2, rh // patch, rw // patch
    x = x.view(n, gt, 2, c, gh // merge, merge, patch, gw // merge, merge, patch).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(n * gt * gh * gw, -1), torch.tensor([[gt, gh, gw]] * n, device=clips.device)


class QwenReward(nn.Module):
    """Qwen2-VL (transformers-v5 layout: model.visual, model.language_model) + rm_head read at TOKENS.
    forward(clips, user texts, video) -> head outputs at each reward token, [N, len(TOKENS), out] fp32."""
    TOKENS = ()

    def __init__(self, config, head, tokenizer, pixels, dtype=torch.float32):
        super().__init__()
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel
        self.model, self.rm_head, self.pixels = Qwen2VLModel._from_config(config, dtype=dtype), head, pixels
        self.tokenizer, vocab = tokenizer, tokenizer.get_vocab()
        tokenizer.padding_side = "right"  # as both trainers
        missing = [t for t in ("<|image_pad|>", "<|video_pad|>", *self.TOKENS) if t not in vocab]
        if missing or len(tokenizer) != config.text_config.vocab_size:
            raise ValueError(f"tokenizer ({len(tokenizer)} tokens, lacking {missing}) does not fit the "
                             f"checkpoint ({config.text_config.vocab_size} embedding rows)")
        self.reward_ids = [vocab[t] for t in self.TOKENS]
        self.pad_ids = {False: vocab["<|image_pad|>"], True: vocab["<|video_pad|>"]}

    def forward(self, clips, texts, video):
        lm = self.model.language_model
        dev = lm.embed_tokens.weight.device
        pixels, grid = to_patches(clips.to(dev), *self.pixels)
        pad = ("<|video_pad|>" if video else "<|image_pad|>") * (int(grid[0].prod()) // 4)  # 2x2 merger
        enc = self.tokenizer([CHAT.format(vision=pad, text=t) for t in texts], padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
        embeds = lm.embed_tokens(ids)
        feats = self.model.visual(pixels.to(embeds.dtype), grid_thw=grid).pooler_output
        embeds = embeds.masked_scatter((ids == self.pad_ids[video])[..., None], feats.to(embeds.dtype))
        positions = torch.arange(ids.shape[1], device=dev).expand_as(ids)  # sequential, not M-RoPE
        hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
        hits = [ids == t for t in self.reward_ids]
        if not all((hit.sum(1) == 1).all() for hit in hits):
            raise ValueError(f"each of {self.TOKENS} must occur exactly once per sequence")
        picked = torch.stack([hidden[hit] for hit in hits], 1)  # [N, tokens, D] in batch order
        return self.rm_head(picked.to(next(self.rm_head.parameters()).dtype)).float()


# MizzenAI/HPSv3 hpsv3/dataset/data_collator_qwen.py INSTRUCTION + prompt_with_special_token, verbatim in
# a text file (trailing spaces too: the model was trained on this exact text).
HPSV3_TEXT = (Path(__file__).parent / "prompts" / "hpsv3_template.txt").read_text()


class HPSv3(QwenReward):
    """HPSv3: Qwen2-VL-7B + "ranknet" head -> (mu, sigma) at <|Reward|>, one image per frame at 256*28*28
    pixels (hpsv3/inference.py min_pixels = max_pixels). score() -> top-30% frame mean of mu, [B]."""
    TOKENS = ("<|Reward|>",)

    @torch.no_grad()
    def score(self, frames, prompts, chunk=16):
        b, f = frames.shape[:2]
        images = frames.flatten(0, 1)[:, None].expand(-1, 2, -1, -1, -1)  # image = 2 equal frames (1 patch)
        texts = [HPSV3_TEXT.format(text_prompt=p) for p in prompts for _ in range(f)]
        mu = [self(images[i:i + chunk], texts[i:i + chunk], video=False)[:, 0, 0] for i in range(0, b * f, chunk)]
        return top30_mean(torch.cat(mu).view(b, f))


# KwaiVGI/VideoAlign prompt_template.py DETAILED_PROMPT_WITH_SPECIAL_TOKEN, verbatim (trailing spaces too).
VIDEOALIGN_TEXT = (Path(__file__).parent / "prompts" / "videoalign_template.txt").read_text()


def sample_indices(total, source_fps=SOURCE_FPS, fps=2.0):
    """VideoAlign vision_process.py smart_nframes + "uniform" sampling: total / source_fps * fps frames, at
    least 4, at most total, rounded to an even count, taken at linspace(0, total - 1).round()."""
    n = min(round(min(max(total / source_fps * fps, 4), min(768, total) // 2 * 2) / 2) * 2, total)
    if n < 2:
        raise ValueError(f"VideoAlign needs at least 2 frames, got {total}")
    return torch.linspace(0, total - 1, n).round().long().tolist()


class VideoAlign(QwenReward):
    """VideoReward: Qwen2-VL-2B + LoRA (merged at load) + bias-free head at the three reward tokens, z-scored
    with `norm` = model_config.json's inference_config (inference.py _norm). score(axis, gray) -> [B]."""
    TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")

    def __init__(self, config, head, tokenizer, pixels, norm, fps=2.0, dtype=torch.float32):
        super().__init__(config, head, tokenizer, pixels, dtype)
        self.norm, self.fps = norm, fps

    @torch.no_grad()
    def score(self, frames, prompts, axis, gray, chunk=4):
        clips = frames[:, sample_indices(frames.shape[1], SOURCE_FPS, self.fps)]
        if gray:  # the paper's MQ: gray repeated to 3 channels, so colour cannot move the motion score
            clips = luma(clips.float())[:, :, None].expand(-1, -1, 3, -1, -1)
        texts = [VIDEOALIGN_TEXT.format(text_prompt=p) for p in prompts]
        out = torch.cat([self(clips[i:i + chunk], texts[i:i + chunk], video=True) for i in range(0, len(texts), chunk)])
        raw = out.diagonal(dim1=1, dim2=2) if out.shape[2] == 3 else out[..., 0]  # trainer.py: output_dim 3 or 1
        k = ("VQ", "MQ", "TA").index(axis)
        return (raw[:, k] - self.norm[f"{axis}_mean"]) / self.norm[f"{axis}_std"]


# Special tokens of Qwen2-VL's chat format and of both reward heads (a tokenizer must know all of them).
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>", "<|Reward|>", "<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]


# ------------------------------------------------------------------------------------ checkpoints
def qwen2vl_config(hidden, intermediate, heads, kv_heads, vocab):
    """Qwen2-VL-{2B,7B}-Instruct config.json: 28 layers, rope theta 1e6, 32-block 1280-wide ViT."""
    from transformers import Qwen2VLConfig
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=28,
                num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24]))
    return Qwen2VLConfig(text_config=text, vision_config=dict(depth=32, embed_dim=1280, hidden_size=hidden,
                         num_heads=16, mlp_ratio=4), image_token_id=151655, video_token_id=151656)


def need(path):
    if not Path(path).exists():
        raise FileNotFoundError(f"reward checkpoint file not found: {path}")
    return Path(path)


def to_v5_layout(sd):
    """transformers-4.45 keys -> today's: visual.* -> model.visual.*, model.* -> model.language_model.* (cf.
    KwaiVGI/VideoAlign issue #15); lm_head.weight is dropped, a reward head never uses it."""
    return {("model." + k if k.startswith("visual.") else re.sub(r"^model\.", "model.language_model.", k)): v
            for k, v in sd.items() if k != "lm_head.weight"}


def merge_lora(sd, scale):
    """Fold PEFT LoRA pairs into their base Linear: W + scale * B @ A (peft LoraLayer, scale = alpha / r).
    A pair without its partner or base weight raises KeyError naming it; other LoRA keys fail strict load."""
    out = {k.replace(".base_layer.", "."): v for k, v in sd.items() if ".lora_A." not in k and ".lora_B." not in k}
    for k in [k for k in sd if ".lora_A." in k]:
        stem, rest = k.split(".lora_A.")
        w = out[f"{stem}.weight"]
        out[f"{stem}.weight"] = (w.float() + scale * sd[f"{stem}.lora_B.{rest}"].float() @ sd[k].float()).to(w.dtype)
    return out


def build_strict(cls, config, head_fn, tokenizer, sd, source, device, **kw):
    """Build on `device` (bf16 on GPU), load `sd` strictly; a key or shape mismatch names the file."""
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    with torch.device(device):
        model = cls(config, head_fn(config.text_config.hidden_size, dtype), tokenizer, dtype=dtype, **kw)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{source} does not fit {cls.__name__}: {e}") from None
    return model.eval().requires_grad_(False)


def hpsv3_head(d, dtype=None):
    """hpsv3/train.py's head on the hidden size d, kept in fp32 whatever the backbone's dtype."""
    return nn.Sequential(nn.Linear(d, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2))


def load_hpsv3(path, device="cpu", tokenizer="Qwen/Qwen2-VL-7B-Instruct", config=None, pixels=(200704, 200704)):
    """HPSv3.safetensors (MizzenAI/HPSv3; 4.45 keys visual.*, model.*, lm_head, rm_head.{0,3,5}); tokenizer:
    Qwen2-VL's (a name, folder or object) plus <|Reward|> (hpsv3/train.py)."""
    from transformers import AutoTokenizer
    sd = to_v5_layout(read_safetensors(str(need(path))))
    config = config or qwen2vl_config(3584, 18944, 28, 4, sd["model.language_model.embed_tokens.weight"].shape[0])
    if isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        tokenizer.add_tokens(["<|Reward|>"], special_tokens=True)
    return build_strict(HPSv3, config, hpsv3_head, tokenizer, sd, path, device, pixels=pixels)


def load_videoalign(folder, device="cpu", tokenizer=None, base=None, config=None):
    """VideoReward folder: model_config.json + checkpoint-<step>/ (the latest, as VideoAlign utils.py
    load_model_from_checkpoint) with tokenizer/ and either model.pth (full PEFT state dict, 4.45 keys under
    base_model.model.) or adapter_model.safetensors + non_lora_state_dict.pth over Qwen2-VL-2B-Instruct."""
    from transformers import AutoTokenizer
    meta = json.loads(need(Path(folder) / "model_config.json").read_text())
    data, lora = meta["data_config"], meta["peft_lora_config"]
    if data["prompt_template_type"] != "detailed_special" or meta["model_config"]["reward_token"] != "special":
        raise ValueError(f"{folder}/model_config.json: expected the detailed_special prompt read at reward tokens")
    steps = sorted(Path(folder).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    ckpt = need(steps[-1] if steps else Path(folder) / "checkpoint-<step>")
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(need(ckpt / "tokenizer")))
    if (ckpt / "model.pth").exists():
        sd = read_torch(str(ckpt / "model.pth"))
    else:  # base weights + the trained non-LoRA tensors (ViT, merger, head) + the adapter
        shards = need(base or "paths['videoalign_base'] (Qwen2-VL-2B-Instruct)").glob("*.safetensors")
        sd = {"base_model.model." + k: v for s in sorted(shards) for k, v in read_safetensors(str(s)).items()}
        emb = "base_model.model.model.embed_tokens.weight"  # train_reward.py: resize_token_embeddings(len(tok))
        sd[emb] = sd[emb][:len(tokenizer)]
        sd.update(read_torch(str(need(ckpt / "non_lora_state_dict.pth"))))
        sd.update(read_safetensors(str(need(ckpt / "adapter_model.safetensors"))))
    sd = {k.removeprefix("base_model.model."): v for k, v in sd.items()}
    if lora["lora_enable"]:
        sd = merge_lora(sd, lora["lora_alpha"] / (math.sqrt(lora["lora_r"]) if lora["use_rslora"] else lora["lora_r"]))
    sd = to_v5_layout(sd)
    config = config or qwen2vl_config(1536, 8960, 12, 2, sd["model.language_model.embed_tokens.weight"].shape[0])
    head = lambda d, dtype: nn.Linear(d, meta["model_config"]["output_dim"], bias=False, dtype=dtype)  # trainer.py
    return build_strict(VideoAlign, config, head, tokenizer, sd, ckpt, device, norm=meta["inference_config"],
                        pixels=(128 * 28 * 28, data["max_frame_pixels"]), fps=data["fps"])  # VIDEO_MIN_PIXELS


# ------------------------------------------------------------------------------------ composite
def random_control(frames, prompts):
    """A content-free control: uniform noise from the global generator, whatever the clip. Training on it must
    leave every real reward within noise (README, "Does it learn?")."""
    return torch.rand(len(prompts))


OFFLINE = {"colorfulness": colorfulness, "smoothness": smoothness, "prompt_color": prompt_color,
           "random_control": random_control}
VIDEOALIGN_AXES = {"videoalign_vq": dict(axis="VQ", gray=False), "videoalign_mq": dict(axis="MQ", gray=True),
                   "videoalign_ta": dict(axis="TA", gray=False)}  # the paper: MQ on grayscale, TA on RGB


class CompositeReward:
    """(frames [B, F, 3, H, W] in [0, 1], B prompts) -> {name: [B] float32 CPU, ..., "composite"}.

    models[i]: the nn.Module reward i runs on (None: none). The rewards of one model run together, inside
    offload.resident: a parked model is on the GPU only while it scores. seconds: each reward's wall time
    in the last call (scoring only: a parked model's copy to the GPU is offload.MOVED's)."""

    def __init__(self, names, weights, fns, models=None):
        self.names, self.weights, self.fns = names, weights, fns
        self.models = models or [None] * len(fns)
        self.seconds = {}

    def __call__(self, frames, prompts):
        if not torch.is_tensor(frames) or frames.ndim != 5 or frames.shape[2] != 3 or not frames.is_floating_point():
            raise ValueError(f"frames must be a float [B, F, 3, H, W] tensor, got "
                             f"{getattr(frames, 'shape', type(frames))} {getattr(frames, 'dtype', '')}")
        lo, hi = (frames.min().item(), frames.max().item()) if frames.numel() else (0, 0)
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"frames must lie in [0, 1], got min {lo:.4g} max {hi:.4g}")
        if not isinstance(prompts, (list, tuple)) or len(prompts) != len(frames) or \
                not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"need a list of {len(frames)} prompt strings (one per clip), got {prompts!r:.200}")
        out = {}
        for model in dict.fromkeys(self.models):  # each model once, in order of first use
            with resident(model):
                for name, fn, m in zip(self.names, self.fns, self.models):
                    if m is not model:
                        continue
                    t0 = time.perf_counter()
                    try:
                        r = torch.as_tensor(fn(frames, prompts)).detach().to("cpu", torch.float32)  # waits for the GPU
                    except Exception as e:  # a failing reward stops the step; it never turns into a constant
                        raise RuntimeError(f"reward {name!r} failed: {type(e).__name__}: {e}") from e
                    self.seconds[name] = time.perf_counter() - t0
                    if r.shape != (len(frames),) or not torch.isfinite(r).all():
                        raise ValueError(f"reward {name!r} must return {len(frames)} finite floats, got {r.tolist()}")
                    out[name] = r
        out = {name: out[name] for name in self.names}
        out["composite"] = sum(w * out[n] for n, w in zip(self.names, self.weights))
        return out


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
