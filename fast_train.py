"""The training step's fast paths (bench/README.md, "One RL step at the paper's scale"). Each is a Config field, so
that `python -m bench train` can switch it off and on and compare the step with the eager one in the same run. Those
that compile or choose CUDA kernels act on CUDA only: the CPU tests run the eager reference path (a test passes
compile=True with torch.compile's eager backend, which traces and guards as on the GPU).

merged_rollouts       theta_old's no-grad work (Algorithm 1's rollouts: the history, the G candidates of Eq. 3, the
                      clip-cache recompute and x0_old of Eq. 1) on a plain copy of the base with theta_old's LoRA
                      folded in (policy.Policy.merge_old), with compiled block stages as sampling runs them. LoRA
                      only: sharded full fine-tuning keeps theta_old's own FSDP2 copy
fast_decode           the compiled decoder (fast.speed_up) for the group's forks (vae.Decoder.fork), one candidate a
                      call: sampling's batch-1 graphs (a fork of 3 through the compiled decoder peaked at 67.5 GB at
                      G = 3 and ran out of memory at G = 24). train.py's warm G = 24 decode took 11.3 s instead of
                      27.0, the step's peak 45.4 GB (H100, 2026-12-06, fp32 adapters), since the decoder's
                      state keeps its own copies of the cached frames (vae.own_storage: 55.3 GB before)
train_attention       cuDNN-first attention (model.SAMPLING_ATTENTION) under autograd, forward and backward
compile_train         theta's forward/backward (and theta_ref's no-grad forward) a compiled block at a time
                      (model.block_call): the block's stages, attention, and the checkpoint with its policy
                      (checkpoint_attention's or whole-block recompute) in one graph, once per block position. With
                      checkpoint_attention the G = 24 training phase took 54.2 s against 65.8 with the other four
                      levers alone, train.py's warm step 114.6 s against 125.2 (H100, 2026-12-06): in the presets
compile_rewards       each Qwen2-VL reward model's ViT attention one SDPA call over all images (batched_vision_attention)
                      and its ViT blocks and language-model layers through one compiled function (LAYER_CALLS), which
                      fuses the norms, RoPE and SwiGLU around the matmuls. In the G = 24 step HPSv3 took 24.0 s
                      against 29.0 (H200, 2026-12-07): in the presets
checkpoint_attention  with gradient_checkpointing: keep each block's self-attention output (keep_self_attention)
"""
import functools
import types
import weakref

import torch
from torch.utils.checkpoint import CheckpointPolicy

import fast
import model
import reward_models
import vae

_aten = torch.ops.aten
SDPA_OPS = {_aten._scaled_dot_product_flash_attention.default,
            _aten._scaled_dot_product_efficient_attention.default,
            _aten._scaled_dot_product_cudnn_attention.default,
            _aten._scaled_dot_product_flash_attention_for_cpu.default}


def keep_self_attention(ctx, op, *args, **kwargs):
    """Selective activation checkpointing's policy: a checkpointed block keeps its self-attention output and
    recomputes the rest in the backward. Self-attention over the cache (24 frames of keys for a 3-frame block at the
    paper's window) is ~70% of a block's FLOPs: recomputing it cost ~4 of the ~25 forward-equivalents a candidate
    takes in training. The rest (projections, norms, RoPE, the cross-attention over 512 text tokens) is cheap to
    redo; self-attention is the call with at least as many keys as queries, so cross-attention (fewer keys) is
    recomputed, which halves what is kept: 43 MB a block call for 3 candidates at 480x832 in bf16."""
    if op in SDPA_OPS and args[1].shape[-2] >= args[0].shape[-2]:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


BLOCK_CALLS = weakref.WeakKeyDictionary()  # CausalWan -> its compiled block_call, made once (as fast.compile_blocks)


def _stages(net, compiled):
    net.stages = fast.compile_blocks(net).stages if compiled else model.BLOCK_STAGES  # compiled once per net


def _block_call(net, compiled):
    """compile_train: net's training forward a compiled block at a time (model.block_call), or eagerly. One compiled
    function serves every block and layer, its shapes static at first. A step at a new history length s (train.py
    draws one per step) gives the blocks contexts of other lengths, which dynamo then compiles with that length
    dynamic: over s = 0-30 at window 21 and clip 12 (the tiny model) 25 graphs in all; with static shapes the
    recompile limit (64) was reached at s = 15, past which dynamo runs the blocks eagerly."""
    if compiled and net not in BLOCK_CALLS:
        BLOCK_CALLS[net] = torch.compile(model.block_call)
    net.block_call = BLOCK_CALLS[net] if compiled else None


def _decoder(autoencoder, compiled):
    if compiled or autoencoder in vae.FAST:  # off: the layout and padding changes stay (the same arithmetic), eager
        fast.speed_up(autoencoder, compile=compiled)


def _layer_call(layer, *args, **kwargs):
    return layer.forward(*args, **kwargs)


# compile_rewards: one compiled function for every layer of a reward model, the layer an argument (its weights graph
# inputs): layers of one shape share a graph (HPSv3's 32 ViT blocks and 28 decoder layers: 2 graphs on the GPU), in a
# dynamo cache of its own, where Module.compile of each layer would count against the recompile limit of the code
# object every module shares (Module._call_impl). Shapes that change between calls become dynamic (dynamo's automatic
# dynamic shapes): the decoder layers' graph comes out dynamic in the prompt length, as the function saw the ViT
# blocks' other shapes first (or at a second prompt length), and no prompt compiles again. layer.forward skips the
# layers' hooks: transformers' output-capturing hooks, which record only when hidden states or attentions are asked
# for, never in scoring.
LAYER_CALLS = weakref.WeakKeyDictionary()  # QwenReward -> its compiled _layer_call, made once (as BLOCK_CALLS)


def batched_vision_attention(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """Qwen2-VL's vision attention (transformers' VisionAttention.forward, the same math) in one SDPA call over
    [images, heads, patches, dim]: transformers' SDPA path calls attention once per image (cu_seqlens' segments),
    16 small calls a block for a chunk of HPSv3 frames. Every image of a reward call has the same patch count
    (reward_models.to_patches gives them one grid), so the packed sequence splits evenly."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
    n, images = hidden_states.shape[0], cu_seqlens.shape[0] - 1
    if n % images:
        raise ValueError(f"batched vision attention: {n} patches do not split evenly over {images} images")
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
    per_image = lambda t: t.reshape(images, n // images, self.num_heads, -1).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(per_image(q), per_image(k), per_image(v),
                                                           scale=self.scaling)
    return self.proj(out.transpose(1, 2).reshape(n, -1))


def compile_rewards(reward_fn, on):
    """compile_rewards on or off for reward_fn's Qwen2-VL models (HPSv3, VideoAlign): the batched ViT attention and
    its LAYER_CALLS function for each ViT block and language-model layer; off, transformers' own modules run again
    (dynamo keeps the graphs for the next switch-on). The parked models (offload.py) move between host and GPU by
    their tensors' .data, which the graphs take as inputs."""
    for scorer in dict.fromkeys(getattr(reward_fn, "models", [])):
        if isinstance(scorer, reward_models.QwenReward):
            if on and scorer not in LAYER_CALLS:
                LAYER_CALLS[scorer] = torch.compile(_layer_call)
            for layer in [*scorer.model.visual.blocks, *scorer.model.language_model.layers]:
                layer._compiled_call_impl = functools.partial(LAYER_CALLS[scorer], layer) if on else None
            for block in scorer.model.visual.blocks:  # an instance attribute over the class's forward, or none
                if on:
                    block.attn.forward = types.MethodType(batched_vision_attention, block.attn)
                else:
                    block.attn.__dict__.pop("forward", None)


def configure(ctx, cfg, compile=None):
    """Switch the fast paths of a train.build context to cfg's fields (again at any time: the bench does, per step).
    compile: use torch.compile (default: on CUDA)."""
    cuda = ctx.device.type == "cuda"
    compile = cuda if compile is None else compile
    pol, net = ctx.policy, ctx.policy.model
    pol.use_merged = cfg.merged_rollouts and pol.lora
    if pol.merge_old() is not None:
        _stages(pol.merged, compile)
    _decoder(ctx.wan.vae, cfg.fast_decode and compile)
    ctx.decode_batch = 1 if cfg.fast_decode and compile else 0
    net.train_attention = model.SAMPLING_ATTENTION if cfg.train_attention and cuda else None
    _block_call(net, cfg.compile_train and compile)
    net.checkpoint_policy = keep_self_attention if cfg.checkpoint_attention else None
    compile_rewards(ctx.reward_fn, cfg.compile_rewards and compile)
    return ctx
