"""bench's multi-GPU commands: torchrun scaling (candidates per second on 1, 2, 4 GPUs) and FSDP2 sharding
(whole-model vs per-block units at 1.3B, LoRA and full fine-tuning at 14B, the memory arithmetic for 8 GPUs)."""
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

import model
from config import DEFAULT_OFFLINE_SPEC
import train
from bench.common import DEV, DT, OUT_DIR
from bench.models import WAN_1_3B, paper_config, real_wan


def bench_scale_worker(args, steps=3):
    """One process of `torchrun -m bench scale-worker`: real-size generator, offline rewards, G = 4 per rank."""
    cfg = paper_config(args.preset, args.tiny, "--group_size=4", "--micro_batch=4", "--clip_start=9",
                       f"--reward={DEFAULT_OFFLINE_SPEC}")
    ctx = train.build(cfg, real_wan(args.tiny))
    times = [train.train_step(s, cfg, ctx)["step_time"] for s in range(1, steps + 1)][1:]
    if ctx.rank == 0:
        with open(os.path.join(OUT_DIR, "bench_scale_worker.json"), "w") as f:
            json.dump(dict(gpus=ctx.world, step_s=statistics.median(times),
                           candidates_per_s=ctx.world * cfg.prompts_per_rank * cfg.group_size / statistics.median(times)), f)


def bench_scaling(args, gpus=(1, 2, 4)):
    rows = []
    for k in gpus:
        if DEV.type == "cuda" and k > torch.cuda.device_count():
            continue
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={k}", "-m", "bench",
                        "scale-worker", f"--tiny={args.tiny}", f"--preset={args.preset}"], check=True)
        with open(os.path.join(OUT_DIR, "bench_scale_worker.json")) as f:
            rows.append(json.load(f))
    for r in rows:
        r["efficiency"] = r["candidates_per_s"] / (rows[0]["candidates_per_s"] * r["gpus"])
    return rows


def bench_fsdp(args, gb=1e9):
    """torchrun --nproc_per_node 2 -m bench fsdp: (a) 1.3B full fine-tuning, FSDP2 with the whole model as one unit vs
    one unit per block (clip 12, G 3); (b) 14B with LoRA (r 256, base whole on each GPU) and full fine-tuning, where the arithmetic lets it
    fit (one 3-frame clip, G 2, micro-batch 1); (c) memory per GPU from the sharding arithmetic. History 0, offline
    rewards (python -m bench train has the reward models); 14B random weights all bf16 (real_wan keeps a few in fp32)."""
    import gc
    # (c) counts what policy.Policy builds: theta, grad, AdamW, theta_old, theta_ref
    world, rows = int(os.environ.get("WORLD_SIZE", 1)), []
    wan, offline = real_wan(args.tiny), f"--reward={DEFAULT_OFFLINE_SPEC}"
    runs = [("1.3B", "full, whole-model unit", ["--lora_rank=0", "--fsdp_per_block=false"]),
            ("1.3B", "full, per-block units", ["--lora_rank=0"])]
    small = ["--clip_frames=3", "--group_size=2", "--micro_batch=1"]
    runs += [("14B", "LoRA, base whole", small), ("14B", "full, per-block units", small + ["--lora_rank=0"])]
    with torch.device("meta"):
        big = {k: model.WanTransformer3DModel(**c) for k, c in (("1.3B", WAN_1_3B), ("14B", model.WAN_14B))}
    count = {k: sum(p.numel() for p in m.parameters()) for k, m in big.items()}
    block = {k: sum(p.numel() for p in m.blocks[0].parameters()) for k, m in big.items()}
    lora = {k: sum(256 * sum(mod.weight.shape) for n, mod in m.named_modules() if n.startswith("blocks.")
                   and isinstance(mod, nn.Linear)) for k, m in big.items()}
    # full: fp32 theta, gradient, AdamW (8), fp32 theta_old, bf16 theta_ref = 22 bytes a parameter, sharded; plus the
    # gathered bf16 weights and gradients: two blocks (one computing, one prefetched), or the whole model as one unit
    full_gb = lambda k, w, unit: (22 * count[k] / w + (8 * block[k] if unit == "block" else 4 * count[k])) / gb  # noqa: E731
    total_gb = torch.cuda.get_device_properties(DEV).total_memory / gb if DEV.type == "cuda" else float("inf")
    for size, variant, extra in runs:
        if "full" in variant and not args.tiny and full_gb(size, world, "block") > 0.8 * total_gb:
            rows.append(dict(model=size, variant=variant, gpus=world, note=f"skipped: {full_gb(size, world, 'block'):.0f}"
                             f" GB of weights and optimizer per GPU by (c) > 80% of {total_gb:.0f} GB"))
            continue
        torch.manual_seed(0)
        torch.set_default_dtype(DT)  # made in bf16 at once: 14B in fp32 first would need 56 GB more
        with torch.device(DEV):
            tr = model.WanTransformer3DModel(**(model.TINY_TRANSFORMER if args.tiny else WAN_1_3B if size == "1.3B" else model.WAN_14B))
        torch.set_default_dtype(torch.float32)
        wan.model = model.CausalWan(tr).eval()
        cfg = paper_config(args.preset, args.tiny, "--clip_start=0", offline, *extra)
        t0 = time.perf_counter()
        ctx = train.build(cfg, wan)
        built = time.perf_counter() - t0
        times, peak = [], 0.0
        for step in range(1, 4 if size == "1.3B" else 3):  # the first step warms up
            if DEV.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times.append(train.train_step(step, cfg, ctx)["step_time"])
            peak = max(peak, train.all_sum(torch.cuda.max_memory_allocated() / gb if DEV.type == "cuda" else 0)[0])
        rows.append(dict(model=size, variant=variant, gpus=world, build_s=built, step_s=statistics.median(times[1:]),
                         peak_gb_per_gpu=peak / world, G=cfg.group_size, clip=cfg.clip_frames, lora_r=cfg.lora_rank))  # (mean of the ranks)
        del ctx, tr
        wan.model = None
        gc.collect()
        torch.cuda.empty_cache() if DEV.type == "cuda" else None
    for k in count:  # (c) weights, gradients and optimizer per GPU; activations, caches, umT5, VAE, rewards extra
        for w in (1, 2, 8):
            rows.append(dict(model=k, variant="arithmetic (c)", gpus=w, full_block_gb=full_gb(k, w, "block"),
                             full_model_unit_gb=full_gb(k, w, "model"), lora_gb=(2 * count[k] + 24 * lora[k]) / gb))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return rows if int(os.environ.get("RANK", 0)) == 0 else None
