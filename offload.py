"""Frozen models that one phase of a training step needs, parked in pinned CPU memory in between.

umT5-XXL (11.4 GB bf16) encodes one prompt per step, HPSv3 (Qwen2-VL-7B, 16 GB) and VideoAlign (Qwen2-VL-2B,
4.5 GB) score the decoded clips: kept on the GPU all step they take about as much memory as the rollout and the
training forward together. `park` moves a frozen module's weights to pinned host memory once; `resident` copies
them to the GPU for the phase that uses them (non-blocking copies from pinned memory run at the link's speed)
and afterwards points the module back at the pinned copy, which is still exact since nothing wrote to it: the
way back costs nothing. On the CPU, or for a module never parked, both are no-ops. The code that runs a parked
module imports nothing of this file: `park` hands the module its own `resident()` context, which model.TextEncoder
and rewards.CompositeReward enter around the phase (a module without one runs where it is).
"""
import contextlib
import functools
import math
import time

import torch

MOVED = dict(bytes=0, seconds=0.0)  # host-to-device traffic of `resident` so far (train_step reports it per step)


def _tensors(module):
    return list(module.parameters()) + list(module.buffers())


def park(module, device):
    """Keep the frozen `module` in pinned CPU memory, to be brought to `device` by `resident`; no-op off CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or getattr(module, "parked_for", None) is not None:
        return module
    if any(p.requires_grad for p in module.parameters()):  # a trained copy on the host would go stale
        raise ValueError(f"{type(module).__name__} has trainable parameters: only a frozen module can be parked")
    for t in _tensors(module):
        t.data = t.data.to("cpu").pin_memory()
    module.parked_for = device
    module.resident = functools.partial(resident, module)
    torch.cuda.empty_cache()  # hand the freed blocks back: other phases may need them in other sizes
    return module


@contextlib.contextmanager
def resident(module):
    """The parked `module` on its GPU for the enclosed phase (synchronised, so MOVED times the copy alone)."""
    device = getattr(module, "parked_for", None) if module is not None else None
    if device is None:
        yield module
        return
    tensors = _tensors(module)
    pinned = [t.data for t in tensors]
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for t in tensors:
        t.data = t.data.to(device, non_blocking=True)
    torch.cuda.synchronize(device)
    MOVED["seconds"] += time.perf_counter() - t0
    MOVED["bytes"] += sum(p.numel() * p.element_size() for p in pinned)
    try:
        yield module
    finally:
        for t, p in zip(tensors, pinned):
            t.data = p


_HOST = {}  # name -> the host buffer host_buffer hands out (grown, never shrunk)


def host_buffer(name, shape, dtype, device):
    """A host tensor for results that wait between phases of a step (the decoded clips wait for the rewards): with
    a CUDA `device`, one pinned buffer per name, reused every step (pinning 5.5 GB takes seconds; copies from and
    to pinned memory run asynchronously at the link's speed); otherwise a fresh tensor. Its contents are the
    caller's to fill."""
    numel = math.prod(shape)
    if torch.device(device).type != "cuda":
        return torch.empty(shape, dtype=dtype)
    buf = _HOST.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        _HOST.pop(name, None)  # free the old one first
        buf = _HOST[name] = torch.empty(numel, dtype=dtype, pin_memory=True)
    return buf[:numel].view(shape)
