"""Several processes, gloo on the CPU: train.py under torchrun (LoRA under DDP) ends with identical weights on both
ranks; per-block FSDP2 on two processes equals one unsharded process and resumes; FSDP2 runs every forward path of
the plain model, gradients included; compiled block calls (compile_train) under FSDP2 and DDP give eager's
gradients; the advantages and the uncertainty mask computed on two processes equal one process's."""
import copy
import os
import re
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import config
import fast_train
import model as M
import policy as policy_mod
import train
from helpers import FAST, N
from loss import Controller, advantages
from rollout import draw_noise, group_rollout


# ------------------------------------------------------------------ train.py under torchrun
def torchrun(args):
    """train.py on 2 gloo processes; returns stdout after checking both ranks printed the same checksum.
    --standalone: torchrun binds its rendezvous store to a port the system picks (port 0), so no port is chosen
    here and released before it is bound (another process could take it in between)."""
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    # the two ranks share stdout, so their lines may interleave: match the printed format, not lines
    sums = sorted(re.findall(r"rank (\d) trainable checksum ([-+]?\d\.\d{12}e[-+]\d+)", res.stdout))
    assert [r for r, _ in sums] == ["0", "1"] and sums[0][1] == sums[1][1], res.stdout
    return res.stdout


def test_two_process_torchrun_ends_with_identical_weights(tmp_path):  # LoRA under DDP
    torchrun([*FAST, "--steps=2", "--eval_every=2", f"--out_dir={tmp_path}"])


def test_per_block_fsdp2_on_two_processes_equals_one_process_and_resumes(tmp_path):
    """Full fine-tuning, one FSDP2 unit per block: 2 processes x 1 prompt (stopped after step 1, resumed to step 2)
    end with the weights, theta_old and theta_ref of 1 unsharded process x 2 prompts run straight to step 2."""
    from safetensors.torch import load_file
    args = [*FAST, "--lora_rank=0", "--gamma=0.9", "--lr=1e-3", "--steps=2"]  # gamma 0.9: theta_old's EMA must resume
    train.main([*args, "--prompts_per_rank=2", f"--out_dir={tmp_path / 'one'}"])
    torchrun([*args, "--steps=1", "--eval_every=1", f"--out_dir={tmp_path / 'two'}"])
    out = torchrun([*args, "--eval_every=2", "--resume=true", f"--out_dir={tmp_path / 'two'}"])
    assert "2 rank(s) x 1 prompt(s)" in out
    start = M.load_tiny().model.transformer.state_dict()
    for f in ("transformer.safetensors", "old.safetensors", "ref.safetensors"):
        one, two = (load_file(tmp_path / d / "ckpt-000002" / f) for d in ("one", "two"))
        assert one.keys() == two.keys() == start.keys()
        for k in one:
            torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-5, msg=f"{f} {k}")
        moved = [not torch.equal(one[k], start[k]) for k in start if ".ffn." in k]
        assert all(moved) if f != "ref.safetensors" else not any(moved)  # theta trained, theta_old its EMA


def test_per_block_fsdp2_runs_every_forward_path_like_the_plain_model(wan):
    """Per-block FSDP2 (gloo, one process): every block is its own unit, sharded (DTensor) at rest, gathered
    only inside its own calls. CausalWan reads block weights only through CausalBlock's methods; a call FSDP2
    did not see would meet sharded weights and fail. text_kv, the cached rollout, the cache-reading clip forward
    and its gradients, with and without gradient checkpointing, must equal the unsharded model's."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one process: no port
    try:
        plain = copy.deepcopy(wan.model)
        with torch.no_grad():
            for p in plain.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        sharded = copy.deepcopy(plain)
        policy_mod.shard(sharded)
        blocks = sharded.transformer.blocks
        assert isinstance(sharded, FSDPModule) and all(isinstance(b, FSDPModule) for b in blocks)
        text, x_t = wan.text_encoder(["a fox in the snow"]), torch.randn(2, 16, 6, 8, 8)
        runs = []
        for m in (plain, sharded):
            with torch.no_grad():
                kv = m.text_kv(text)
                g = group_rollout(m, kv, draw_noise(3, 1, (16, 3, 8, 8)), draw_noise(4, 2, (16, 6, 8, 8)), 3, 9)
                cache = g.clip_cache(m, kv, 0, 2)
            out = [torch.cat([k for k, _ in kv]), g.clips]
            for ckpt in (False, True):
                m.gradient_checkpointing = ckpt
                v = policy_mod.ClipForward(m, N)(text, x_t, torch.tensor([0.9, 0.6]), cache, 3)
                v.square().mean().backward()  # (FSDP2 reduces gradients in backward's hooks, not autograd.grad)
                ps = list(m.transformer.parameters())
                out += [v.detach()] + [p.grad.full_tensor() if isinstance(p, DTensor) else p.grad for p in ps]
                m.zero_grad()
            runs.append(out)
        assert all(isinstance(p, DTensor) for p in blocks.parameters())  # resharded after every call
        assert len(runs[0]) == len(runs[1])
        for a, b in zip(*runs):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    finally:
        dist.destroy_process_group()


def clip_gradients(m, forward, params, text, x_t, runs=2):
    """The clip forward's velocity and params' gradients, `runs` times over one cache of m's rollout."""
    from torch.distributed.tensor import DTensor
    with torch.no_grad():
        kv = m.text_kv(text)
        g = group_rollout(m, kv, draw_noise(3, 1, (16, 3, 8, 8)), draw_noise(4, 2, (16, 6, 8, 8)), 3, 9)
        cache = g.clip_cache(m, kv, 0, 2)
    out = []
    for _ in range(runs):
        v = forward(text, x_t, torch.tensor([0.9, 0.6]), cache, 3)
        v.square().mean().backward()
        out += [v.detach()] + [p.grad.full_tensor() if isinstance(p, DTensor) else p.grad.clone() for p in params()]
        m.zero_grad()
    return out


@pytest.mark.parametrize("wrap", ["fsdp2", "ddp"])
def test_compiled_block_calls_under_fsdp2_and_ddp_give_the_eager_gradients(wan, wrap):
    """compile_train under torchrun's two wrappings: sharded full fine-tuning (--lora_rank=0, per-block FSDP2) and
    LoRA under DDP. The block call compiled whole (AOT autograd's forward/backward partition, run without code
    generation) with the selective checkpointing policy gives the plain eager model's velocity and gradients, twice
    in a row: under FSDP2 the compiled backward recomputes from gathered weights that FSDP2 frees after each forward
    and gathers again before the backward; under DDP a gradient the reducer missed in the first backward would stop
    the second forward (one process: the reduction itself is the identity)."""
    from torch._dynamo.utils import counters
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one process: no port
    torch._dynamo.reset()
    try:
        text, x_t = wan.text_encoder(["a fox in the snow"]), torch.randn(2, 16, 6, 8, 8)
        runs = []
        for compiled in (False, True):
            torch.manual_seed(1)
            if wrap == "fsdp2":
                m = copy.deepcopy(wan.model)
                with torch.no_grad():
                    for p in m.parameters():
                        p.add_(torch.randn_like(p) * 0.05)
                if compiled:
                    policy_mod.shard(m)
                forward, params = policy_mod.ClipForward(m, N), m.transformer.parameters
            else:
                pol = policy_mod.Policy(config.parse_config(["--lora_rank=4", "--lora_alpha=8"]), copy.deepcopy(wan), 1)
                for p in pol.params("default"):  # nonzero adapters (B starts at zero)
                    torch.nn.init.normal_(p, std=0.05)
                m, params = pol.net("default"), lambda: pol.params("default")
                forward = policy_mod.ClipForward(m, N)
                if compiled:
                    forward = torch.nn.parallel.DistributedDataParallel(forward, broadcast_buffers=False)
            m.gradient_checkpointing, m.checkpoint_policy = True, fast_train.keep_self_attention
            m.block_call = torch.compile(M.block_call, backend="aot_eager") if compiled else None
            runs.append(clip_gradients(m, forward, params, text, x_t))
        assert counters["stats"]["unique_graphs"] > 0  # the wrapped model's blocks ran compiled
        for a, b in zip(*runs):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    finally:
        torch._dynamo.reset()
        dist.destroy_process_group()


# --------------------------------------------------------------- advantages and the uncertainty mask over two processes
def _worker(rank, world, init, rewards, P, X, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    n = len(rewards) // world  # each rank owns whole groups
    sl = slice(rank * n, (rank + 1) * n)
    A, r = advantages(rewards[sl], group_size=4)
    mask = Controller().uncertainty_mask(P[sl], X[sl])
    torch.save((A, r, mask), os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_match_one():
    g = torch.Generator().manual_seed(8)
    rewards = torch.randn(16, generator=g) * 3 + torch.arange(16) // 4  # 4 groups of 4
    P, X = torch.randn(16, generator=g), torch.randn(16, 2, generator=g)
    with tempfile.TemporaryDirectory() as out:  # the ranks meet in a file: no port to pick
        mp.spawn(_worker, args=(2, f"file://{out}/store", rewards, P, X, out), nprocs=2)
        parts = [torch.load(os.path.join(out, f"{i}.pt")) for i in range(2)]
    A, r = advantages(rewards, group_size=4)
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), A)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), r)
    mask = Controller().uncertainty_mask(P, X)
    assert torch.equal(torch.cat([p[2] for p in parts]), mask)
    # a local-only std would differ: the groups have different spreads
    assert not torch.allclose(advantages(rewards[:8], 4)[0], A[:8])
