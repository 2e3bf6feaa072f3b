"""CUDA graphs for the sampling path: each distinct generator call is captured once and then replayed.

One generator call issues ~700 kernels (30 layers of norms, matmuls, attention and cache writes). Within one
video the calls repeat exactly: the 4 denoising steps and the context pass of a block have the same shapes and
write the same cache slot, and once a rolling window is full every block sits in the same slots. So a call is
captured once per *key*, everything fixed in the graph (the shapes, the cache slot, the addresses of the cache
buffers it reads and writes), and later calls copy their inputs (latents, timestep, RoPE angles, text K/V) into
the graph's static buffers and replay it: one launch for ~700. Measured on an H100 (README, Performance): the
eager generator gains 5%, the compiled one nothing (it is GPU-bound), and progressive sampling, where the CPU
also drives the decoder and waits for each block's frames, 4% end to end and 23% to the first frame.

What a graph reads besides its inputs must not move: the weights (never reassigned while sampling) and the
cache buffers, whose addresses are part of the key. A new cache at new addresses is captured anew; reuse one
cache with `KVCache.reset()` between videos to replay. Torch's own `reduce-overhead` mode cannot do this: it
treats the cache writes as graph outputs and overwrites them at the next replay (README).
"""
import torch


class Graphs:
    def __init__(self):
        self.graphs = {}   # key -> (graph, static output)
        self.inputs = {}   # input signature -> static input buffers, shared by every graph of that signature
        self.pool = None   # one memory pool for all graphs: they run one at a time, each output kept apart

    def __call__(self, fn, args, fixed, key):
        """fn(*args) for tensors `args`; `fixed`: the other tensors fn reads or writes (their addresses enter the
        key); `key`: whatever else fixes the work fn issues (Python ints such as the cache slot)."""
        signature = tuple((a.shape, a.dtype, a.stride()) for a in args)
        full = (signature, tuple(t.data_ptr() for t in fixed), key)
        if full not in self.graphs:
            # first sight: run eagerly (this call's result, and the warm-up capture needs: cuBLAS and cuDNN plans,
            # compiled code), then capture the same call on static copies of the inputs (capture runs nothing)
            out = fn(*args)
            static = self.inputs.setdefault(signature, [a.clone() for a in args])
            torch._foreach_copy_(static, list(args))
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                result = fn(*static)
            self.graphs[full] = (graph, result)
            return out
        graph, result = self.graphs[full]
        torch._foreach_copy_(self.inputs[signature], list(args))
        graph.replay()
        return result.clone()  # the next replay of this graph overwrites `result`

    def __len__(self):
        return len(self.graphs)
