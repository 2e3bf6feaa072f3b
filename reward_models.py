"""The two learned reward models, run as they were trained: HPSv3 (Qwen2-VL-7B, mu over the top 30% of frames)
and VideoAlign (Qwen2-VL-2B + LoRA; MQ, TA, VQ), with their checkpoint layouts. Both call Qwen2-VL as in their
training code (MizzenAI/HPSv3 hpsv3/model/qwen2vl_trainer.py, KwaiVGI/VideoAlign trainer.py): embed tokens,
run the vision tower, scatter its features into the embeddings, call the language model on inputs_embeds with
sequential positions (the stock M-RoPE forward scores differently)."""
import json, math, re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from files import read_safetensors, read_torch

SOURCE_FPS = 16  # decoded Wan clips


def top30_mean(scores):
    """[B, F] per-frame scores -> [B]: mean of the best 30% of frames, at least one (Astrolabe release
    astrolabe/rewards.py: k = max(1, int(F * 0.3)), here in exact integer arithmetic)."""
    return scores.topk(max(1, 3 * scores.shape[1] // 10), dim=1).values.mean(1)


def luma(frames):
    """[..., 3, H, W] -> [..., H, W], ITU-R BT.601 weights (PIL convert("L"), torchvision rgb_to_grayscale)."""
    return (frames * frames.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(-3)


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
        enc = self.tokenizer([CHAT.format(vision=pad, text=t) for t in texts], padding=True, return_tensors="pt",
                             padding_side="right")  # as both trainers pad (the caller's tokenizer left as it is)
        ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
        embeds = lm.embed_tokens(ids)
        feats = self.model.visual(pixels.to(embeds.dtype), grid_thw=grid).pooler_output
        embeds = embeds.masked_scatter((ids == self.pad_ids[video])[..., None], feats.to(embeds.dtype))
        positions = torch.arange(ids.shape[1], device=dev).expand_as(ids)  # sequential, not M-RoPE
        hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                    use_cache=False).last_hidden_state  # one forward: no KV cache to build for later tokens
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


