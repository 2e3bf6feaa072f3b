"""GPU benchmarks at the real sizes (Wan2.1-T2V-1.3B, umT5-XXL, the Wan VAE, HPSv3, VideoAlign; 14B for fsdp),
random weights (timing needs no trained weights), bf16.

    python -m bench generate        # 81 frames at 480x832 from text: eager vs compiled generator and decoder,
                                    # kernel profiles, end to end with progressive decoding; FPS, first frame;
                                    # evaluate's path; then sample.py itself in fresh processes (bench/user.py)
    python -m bench generate --part=breakdown|e2e|user   # only the in-process rows (e2e: without profiles and
                                    # evaluate's rows), or only sample.py's
    python -m bench group           # G=8 clips of 12 frames after 18 history frames vs 8 independent rollouts
    python -m bench train [--preset=longlive] [--rows=s:G,...] [--levers=a,b,...] [--flops=0] [--compare=0]
                                    # one RL step at G = 24 (paper settings): eager vs fast (errors), counted
                                    # FLOPs, time and memory per phase; --compare=0: the fast steps only
    python -m bench scaling         # torchrun on 1, 2, 4 GPUs: candidates per second
    torchrun --nproc_per_node 2 -m bench fsdp   # FSDP2 whole-model vs per-block units; 14B LoRA / full
    python -m bench generate --tiny # any of them on the tiny model (a CPU smoke test)

Each prints a table and writes bench_<command>.json under out/bench (BENCH_OUT). Timings: CUDA synchronised,
one warm-up run, median of the timed runs; every fast variant is compared with the reference path (errors printed).
"""
import json
import os
import sys
import time

import torch

from bench.common import DEV, OUT_DIR, parse, show
from bench.distributed import bench_fsdp, bench_scale_worker, bench_scaling
from bench.generate import bench_generate, bench_group
from bench.train_step import bench_train

COMMANDS = {"generate": bench_generate, "group": bench_group, "train": bench_train, "scaling": bench_scaling,
            "scale-worker": bench_scale_worker, "fsdp": bench_fsdp}

if __name__ == "__main__":
    command, args = parse(sys.argv[1:], __doc__)
    if command not in COMMANDS:
        raise SystemExit(f"usage: python -m bench {{{','.join(COMMANDS)}}} [--key=value ...] (bench/common.py: Args)")
    if command == "train":  # the allocator train.py sets (why: there), before CUDA first allocates
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if DEV.type == "cuda":  # process-wide settings of the compiled paths, as the entry scripts (why: fast.py)
        torch.backends.cudnn.benchmark = True
        torch._dynamo.config.recompile_limit = 64
    result = COMMANDS[command](args)
    if result is not None:
        device = torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else "cpu"
        print(f"\n{command} on {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
        show(result)
        os.makedirs(OUT_DIR, exist_ok=True)
        with open(os.path.join(OUT_DIR, f"bench_{command}.json"), "w") as f:
            json.dump(dict(device=device, date=time.strftime("%Y-%m-%d"), rows=result), f, indent=1)
