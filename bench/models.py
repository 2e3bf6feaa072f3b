"""The models the bench times, at their real sizes with random weights (timing needs no trained weights), on the
bench's device: Wan2.1-T2V-1.3B with umT5-XXL and the Wan VAE, HPSv3 (Qwen2-VL-7B) and VideoAlign (Qwen2-VL-2B)
with a tokenizer that gives Qwen2's token counts; tiny: the tiny model instead (bench's --tiny)."""
import statistics
from functools import partial

import torch
import torch.nn as nn

import config
import model
import reward_models
import rewards
from bench.common import DEV, DT

WAN_1_3B = dict(model.TINY_TRANSFORMER, num_attention_heads=12, attention_head_dim=128, text_dim=4096, freq_dim=256,
                ffn_dim=8960, num_layers=30)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def real_wan(tiny=False):
    """Wan2.1-T2V-1.3B transformer, umT5-XXL encoder and the Wan VAE at full size, random weights on DEV."""
    if tiny:
        return model.load_tiny().to(DEV)
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel
    torch.manual_seed(0)
    with torch.device(DEV):
        tr = WanTransformer3DModel(**WAN_1_3B).to(DT)
        for name, p in tr.named_parameters():  # as from_pretrained(torch_dtype=bf16): these stay fp32
            if set(name.split(".")) & set(tr._keep_in_fp32_modules):
                p.data = p.data.float()
        enc = UMT5EncoderModel(UMT5Config(**UMT5_XXL)).to(DT).eval()
        ae = AutoencoderKLWan().to(DT).eval()
    # byte-level tokens: the same 512-token encoder cost as umT5's own tokenizer
    return model.Wan(model.CausalWan(tr).eval(), model.TextEncoder(ByT5Tokenizer(), enc, 512), ae).to(DEV)


# Qwen2's pre-tokenizer (its tokenizer.json "Split" pattern): words with their leading space, single digits,
# punctuation runs, whitespace. The real tokenizer then runs byte-level BPE over a 151k vocabulary inside each piece.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_VOCAB = 151936  # embedding rows of Qwen2-VL-{2B,7B}-Instruct (config.json vocab_size)
# Text tokens of one reward input (chat template + reward template + a prompt of prompts/train.txt or eval.txt,
# special tokens counted once) under Qwen2's real BPE, measured offline with Qwen's published BPE ranks
# (qwen.tiktoken: the same 151,643 merges and pre-tokenizer as Qwen2), mean over those 36 prompts.
QWEN2_REAL_TOKENS = {"hpsv3": 538.1, "videoalign": 829.1}


def qwen2_sized_tokenizer():
    """A tokenizer that gives Qwen2's token counts without its vocabulary (none can be downloaded here): Qwen2's
    pre-tokenizer split, each piece cut into runs of at most 10 characters, one token per run (unknown words map
    to <unk>: only the count matters for a random-weight model). Within 2% of the real BPE count on both
    templates; the vocabulary is padded to Qwen2-VL's 151,936 rows so the embeddings have their real size."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<unk>"] + reward_models.SPECIALS)}
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), QWEN2_VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                                 pre_tokenizers.Split(Regex(r"[\s\S]{1,10}"), "isolated")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": reward_models.SPECIALS})  # never split (already in the vocabulary)
    return fast


def reward_text_tokens(tok):
    """Mean text tokens of an HPSv3 / VideoAlign input over prompts/train.txt: ours, Qwen2's and the ratio."""
    prompts = config.read_prompts("prompts/train.txt")
    rows = {}
    for name, template in (("hpsv3", reward_models.HPSV3_TEXT), ("videoalign", reward_models.VIDEOALIGN_TEXT)):
        n = statistics.mean(len(tok(reward_models.CHAT.format(vision="", text=template.format(text_prompt=p))).input_ids)
                            for p in prompts)
        rows[name] = dict(template_chars=len(template), tokens=n, qwen2_tokens=QWEN2_REAL_TOKENS[name],
                          ratio=n / QWEN2_REAL_TOKENS[name], chars_per_token=len(template) / n)
    return rows


def real_rewards(tiny=False, wrap=lambda name, fn: fn):
    """HPSv3 (Qwen2-VL-7B) and VideoAlign (Qwen2-VL-2B) at full size (--tiny: 2-layer Qwen2-VLs, same code
    path), random weights, with a tokenizer that gives Qwen2's token counts and embedding size. wrap(name, fn)
    wraps each reward function (the bench counts their FLOPs)."""
    from transformers import Qwen2VLConfig
    torch.manual_seed(0)  # the random weights are the same in every run (as real_wan's)
    tok = qwen2_sized_tokenizer()
    counts = reward_text_tokens(tok)
    for name, c in counts.items():
        print(f"{name} text tokens per input: {c['tokens']:.1f} (Qwen2 BPE: {c['qwen2_tokens']}, ratio {c['ratio']:.3f}; "
              f"template {c['template_chars']} characters, {c['chars_per_token']:.2f} per token)", flush=True)
    if tiny:  # the test suite's tiny Qwen2-VL shapes, at a few vision tokens a frame
        cfgs = [Qwen2VLConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               rope_parameters=dict(rope_type="default", rope_theta=100.0,
                                                                    mrope_section=[2, 1, 1])),
                              vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2))] * 2
        dims, pixels = (32, 32), [(4 * 784, 4 * 784), (4 * 784, 4 * 784)]
    else:
        cfgs = [reward_models.qwen2vl_config(3584, 18944, 28, 4, len(tok)), reward_models.qwen2vl_config(1536, 8960, 12, 2, len(tok))]
        dims, pixels = (3584, 1536), [(200704, 200704), (128 * 28 * 28, 200704)]
    with torch.device(DEV):
        hps = reward_models.HPSv3(cfgs[0], reward_models.hpsv3_head(dims[0]), tok, pixels[0], dtype=DT)
        va = reward_models.VideoAlign(cfgs[1], nn.Linear(dims[1], 3, bias=False, dtype=DT), tok, pixels[1],
                          {f"{a}_{s}": float(s == "std") for a in ("VQ", "MQ", "TA") for s in ("mean", "std")}, dtype=DT)
    for mdl in (hps, va):
        mdl.eval().requires_grad_(False)
    names = ["hpsv3", "videoalign_mq", "videoalign_ta"]
    fns = [hps.score, partial(va.score, axis="MQ", gray=True), partial(va.score, axis="TA", gray=False)]
    return rewards.CompositeReward(names, [1.0] * 3, [wrap(n, f) for n, f in zip(names, fns)], [hps, va, va]), counts


def paper_config(preset, tiny, *extra):
    base = [f"--preset={preset}", "--model=none", "--checkpoint=none", "--base_lora=none",
            "--prompts=prompts/train.txt", "--eval_every=0", "--group_size=3", "--micro_batch=3"]
    if tiny:  # the preset's structure, shrunk: LoRA, EMA, checkpointing, composite Qwen2-VL rewards, 32x32 frames
        base += ["--height=32", "--width=32", "--lora_rank=4", "--lora_alpha=4", "--clip_frames=6",
                 "--window_frames=9", "--group_size=2", "--micro_batch=2"]
    cfg = config.parse_config(base + list(extra))
    config.check_config(cfg)
    return cfg
