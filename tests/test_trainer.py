"""train.py's step on the tiny model: the clip's training forward under gradient checkpointing gives the same
gradients, the step's time split into laps, and end to end, training raises a reward while the flipped sign lowers it
(with the held-out evaluation's paired statistics equal to those of its per-sample CSVs)."""
import copy
import csv
import json

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import config
import logs
import loss
import policy as policy_mod
import train
from helpers import N
from rollout import draw_noise, group_rollout


def test_gradient_checkpointing_gives_the_same_gradients(wan):
    """The backward recompute of block b must see block b's cache view, not the last block's."""
    w = copy.deepcopy(wan)
    policy = policy_mod.Policy(config.parse_config([]), w, 1)
    with torch.no_grad():
        for p in policy.params("default"):
            p.normal_(0, 0.05)
    old = policy.net("old")
    kv = old.text_kv(w.text_encoder(["a cat"]))
    g = group_rollout(old, kv, draw_noise(1, 1, (16, 6, 8, 8)), draw_noise(2, 2, (16, 9, 8, 8)), 3, 9)
    cache = g.clip_cache(old, kv, 0, 2)
    x_t, grads = torch.randn(2, 16, 9, 8, 8), []
    for ckpt in (False, True):
        policy.net("default")
        w.model.gradient_checkpointing = ckpt
        v = policy_mod.ClipForward(w.model, N)(w.text_encoder(["a cat"]), x_t, torch.tensor([0.9, 0.6]), cache, 6)
        grads.append(torch.autograd.grad(v.square().mean(), policy.params("default")))
    w.model.gradient_checkpointing = False
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


class Outputs(TorchDispatchMode):
    """The dtypes and shapes of every tensor the ops under it make."""
    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made += [(o.dtype, tuple(o.shape)) for o in (out if isinstance(out, (tuple, list)) else [out])
                      if isinstance(o, torch.Tensor)]
        return out


def test_adapters_are_fp32_over_a_bf16_base(wan):
    """On a bf16 base (a GPU's) the adapters are fp32: one AdamW step at lr 1e-5 moves every entry of theta's
    LoRA A, which in bf16 rounds back to where it was (the control), and theta_old's EMA follows; under bf16 autocast
    an adapted Linear equals W + (alpha / r) B A in fp32 to bf16 rounding, making no fp32 copy of its input."""
    w = copy.deepcopy(wan)
    w.model.transformer.to(torch.bfloat16)
    policy = policy_mod.Policy(config.parse_config(["--lora_rank=4", "--lora_alpha=8"]), w, 1)
    dtypes = {k: p.dtype for k, p in w.model.transformer.named_parameters()}
    assert {d for k, d in dtypes.items() if ".lora_" in k} == {torch.float32}
    assert {d for k, d in dtypes.items() if ".lora_" not in k} == {torch.bfloat16}
    theta = policy.params("default")
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(p.shape, generator=g) for p in theta]
    moved = {}
    for name, params in (("fp32", theta), ("bf16", [p.detach().bfloat16().requires_grad_() for p in theta])):
        before = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
        for p, gr in zip(params, grads):
            p.grad = gr.to(p.dtype)
        opt.step()
        moved[name] = float(torch.cat([(p != b).flatten() for (k, _), p, b in zip(policy.named("default"), params, before)
                                       if "lora_A" in k]).float().mean())
    assert moved["fp32"] == 1.0 and moved["bf16"] < 0.05, moved
    old_before = [p.detach().clone() for p in policy.params("old")]
    loss.ema_(policy.params("old"), theta, 0.9)
    for (k, p), b, t in zip(policy.named("old"), old_before, theta):  # Algorithm 1's EMA, in float64
        want = (0.9 * b.double() + 0.1 * t.detach().double()).float()
        torch.testing.assert_close(p, want, atol=0, rtol=1.2e-7)
        assert "lora_B" in k or bool((p != b).all()), k  # every A entry moved (a bf16 theta_old would keep none)
    layer = w.model.transformer.get_submodule("blocks.0.attn1.to_q")
    x = torch.randn(2, 7, layer.in_features, generator=g).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), Outputs() as seen:
        y = layer(x)
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    want = x.float() @ (layer.base_layer.weight.float() + 2.0 * B @ A).T + layer.base_layer.bias.float()
    assert y.dtype == torch.bfloat16 and float((y.float() - want).norm() / want.norm()) < 1e-2
    assert (torch.float32, tuple(x.shape)) not in seen.made, "an fp32 copy of the input"


@pytest.mark.parametrize("levers", [[], ["--merged_rollouts=true", "--checkpoint_attention=true"]])
def test_a_step_on_a_bf16_base_under_autocast_moves_every_entry_of_theta(wan, tmp_path, monkeypatch, levers):
    """The GPU's dtypes on the CPU: a bf16 base, fp32 adapters, train.py's phases under bf16 autocast (the rollouts,
    the merged copy, the checkpointed recompute): the step runs, and its AdamW step at lr 1e-5 moves every entry of
    theta (bf16 adapters of the tiny model's scale would keep none of A's moves)."""
    w = copy.deepcopy(wan)
    w.model.transformer.to(torch.bfloat16)
    monkeypatch.setattr(train, "autocast", lambda dev: torch.autocast("cpu", torch.bfloat16))
    cfg = config.parse_config(["--prompts_per_rank=1", "--group_size=2", "--micro_batch=2", "--clip_frames=3",
                               "--max_history_frames=3", "--eval_every=0", "--save_every=100",
                               f"--out_dir={tmp_path}", "--gradient_checkpointing=true", *levers])
    ctx = train.build(cfg, wan=w)
    before = [p.detach().clone() for p in ctx.policy.params("default")]
    r = train.train_step(1, cfg, ctx)
    assert np.isfinite(r["policy_loss"]) and r["grad_norm"] > 0
    for (k, p), b in zip(ctx.policy.named("default"), before):
        assert p.dtype == torch.float32 and bool((p != b).all()), k


def test_phases_split_the_step_and_take_transfers_out(monkeypatch):
    """logs.Phases against a hand table: a fake clock, 0.5 s of parked-model copies during the first phase, a
    phase entered twice, and the gap between phases left out."""
    clock, ended = iter([0.0, 2.0, 5.0, 6.0, 6.5, 7.5]), []
    monkeypatch.setattr(logs.time, "perf_counter", lambda: next(clock))
    monkeypatch.setitem(logs.offload.MOVED, "seconds", 10.0)
    phases = logs.Phases(torch.device("cpu"), hook=ended.append)
    with phases("text"):
        logs.offload.MOVED["seconds"] += 0.5  # a parked model came to the GPU inside "text"
    with phases("history"):
        pass
    with phases("text"):
        pass
    assert phases.times == {"transfer": 0.5, "text": 1.5 + 1.0, "history": 1.0} and ended == ["text", "history", "text"]


# the reward is test_astrolabe.blueness (test_astrolabe.py, at the repository root, imports by name)
@pytest.mark.parametrize("sign", [1, -1])
def test_training_raises_the_reward_and_the_flipped_sign_lowers_it(tmp_path, sign):
    """End to end on the tiny model: weight +1 trains toward bluer clips; weight -1 flips every
    advantage, so the same run must make them less blue. Measured on the fixed held-out noise."""
    train.main(["--prompts_per_rank=1", "--clip_frames=3", "--max_history_frames=0", "--steps=16", "--eval_every=16",
                "--save_every=100", f"--reward=test_astrolabe:blueness:{sign}", f"--out_dir={tmp_path}"])
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    blue = [r["eval/test_astrolabe:blueness"] for r in rows if "eval/test_astrolabe:blueness" in r]
    assert len(blue) == 2 and sign * (blue[1] - blue[0]) > 3e-4, blue
    # the log's paired change is that of the per-sample CSVs: 4 held-out prompts x 16 fixed noises
    before, after = (np.array([float(r["test_astrolabe:blueness"]) for r in
                               csv.DictReader(open(tmp_path / "samples" / f"scores_step{s:05d}.csv"))]) for s in (0, 16))
    d = after - before
    assert d.shape == (64,) and rows[-1]["eval/test_astrolabe:blueness_delta"] == pytest.approx(d.mean(), abs=1e-12)
    assert rows[-1]["eval/test_astrolabe:blueness_delta_se"] == pytest.approx(d.std(ddof=1) / 8, rel=1e-9)
    assert rows[-1]["eval/test_astrolabe:blueness_improved"] == pytest.approx(np.mean(d > 0))  # the share that went up
