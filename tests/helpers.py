"""Plain helpers shared by test_astrolabe.py (the paper's mechanisms, at the repository root) and the per-concern
tests under tests/: the tiny generator's block size and text K/V, train.py's quick flags and its checkpoints read
back, the hand-written original-Wan key table, and the tiny Qwen2-VL reward models (their fixtures too: the files
that score import tok, hps and va; tests/conftest.py holds the other fixtures of tests/)."""
import os

import pytest
import torch
import torch.nn as nn

import reward_models


# ------------------------------------------------------------------ the tiny generator
N = 3  # frames per block


def text_kv(wan, prompt="a red car drives through the rain"):
    return wan.model.text_kv(wan.text_encoder([prompt]))


# ------------------------------------------------------------------ train.py runs and their checkpoints
FAST = ["--prompts_per_rank=1", "--group_size=2", "--micro_batch=2", "--clip_frames=3", "--max_history_frames=3",
        "--eval_every=0", "--save_every=100"]


def read_ckpt(out):
    from safetensors.torch import load_file
    d = os.path.join(out, open(os.path.join(out, "latest")).read().strip())
    tensors = {f: load_file(os.path.join(d, f)) for f in ("adapter_model.safetensors", "old.safetensors", "ref.safetensors")}
    return tensors, torch.load(os.path.join(d, "state.pt"), weights_only=True)


def assert_same_tree(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    elif isinstance(a, (list, tuple)):  # torch.distributed.checkpoint turns tuples (AdamW betas) into lists
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    else:
        assert a == b


class CodeInPickle:
    def __reduce__(self):
        return (os.system, ("echo never run",))


# ------------------------------------------------------------------ the original Wan2.1 layout, written out by hand
def original_wan_keys(layers):
    """Every key of the original Wan2.1 layout (the Wan 2.1 repository's wan/modules/model.py), written out by hand."""
    keys = [f"{m}.{p}" for m in ("patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0",
                                  "time_embedding.2", "time_projection.1", "head.head") for p in ("weight", "bias")]
    keys += ["head.modulation"]
    for n in range(layers):
        b = f"blocks.{n}"
        keys += [f"{b}.{a}.{x}.{p}" for a in ("self_attn", "cross_attn") for x in "qkvo" for p in ("weight", "bias")]
        keys += [f"{b}.{a}.norm_{x}.weight" for a in ("self_attn", "cross_attn") for x in "qk"]
        keys += [f"{b}.norm3.weight", f"{b}.norm3.bias", f"{b}.modulation"]
        keys += [f"{b}.ffn.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    return keys


# diffusers name for each original name, hand-written (independent of model._RENAMES)
ORIGINAL_TO_DIFFUSERS = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out", "head.modulation": "scale_shift_table",
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v", "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0",
    "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2", "modulation": "scale_shift_table", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}


def to_original(diffusers_sd, layers):
    params = dict(diffusers_sd)
    out = {}
    for key in original_wan_keys(layers):
        name = key
        for orig, new in sorted(ORIGINAL_TO_DIFFUSERS.items(), key=lambda kv: -len(kv[0])):
            head, _, tail = key.partition(orig)
            if tail in ("", ".weight", ".bias") and (head == "" or head.endswith(".")) and orig in key:
                name = head + new + tail
                break
        out[key] = params.pop(name)
    assert not params, f"diffusers keys with no original name: {sorted(params)}"
    return out


# ------------------------------------------------------------------ tiny Qwen2-VL reward models
SPECIALS = reward_models.SPECIALS
# Qwen2-VL-Instruct chat_template (tokenizer_config.json), the reference for reward_models.CHAT
QWEN2VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
PIXELS = (28 * 28 * 4, 28 * 28 * 6)  # tiny budget: a 64x96 frame -> 56x84 -> 4x6 patches -> 2x3 tokens
NORM = {"VQ_mean": 0.3, "VQ_std": 2.0, "MQ_mean": -0.2, "MQ_std": 0.5, "TA_mean": 1.0, "TA_std": 4.0}


def make_tokenizer():
    """Byte-level BPE without merges plus the special tokens: a Qwen2-VL-compatible tokenizer, no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>")
    fast.add_tokens(SPECIALS, special_tokens=True)
    fast.chat_template = QWEN2VL_TEMPLATE
    return fast


def tiny_config(tok):
    from transformers import Qwen2VLConfig
    ids = tok.convert_tokens_to_ids
    return Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                         rope_parameters=dict(rope_type="default", rope_theta=100.0, mrope_section=[2, 1, 1])),
        vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def randomize(model, seed):
    """Large random weights so positions and every input matter (the default init is nearly flat)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def hps_head(d, dtype=torch.float32):
    return nn.Sequential(nn.Linear(d, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2))


def video(b, f, h=64, w=96, seed=0):
    return torch.rand(b, f, 3, h, w, generator=torch.Generator().manual_seed(seed))


# the tiny reward models as module-scoped fixtures (imported by the test files that score with them)
@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def hps(tok):
    return randomize(reward_models.HPSv3(tiny_config(tok), hps_head(32), tok, PIXELS), 0)


@pytest.fixture(scope="module")
def va(tok):
    return randomize(reward_models.VideoAlign(tiny_config(tok), nn.Linear(32, 1, bias=False), tok, PIXELS, norm=NORM, fps=2.0), 1)
