"""Sink + rolling-window KV cache for block-by-block video generation (paper Sec. 3; Self-Forcing, LongLive).

A block attends to the sink, `sink_frames` latent frames kept forever (the first ones, until a
prompt-switch re-cache may move it: `rewrite`), and to the `window_frames` most recent frames, itself
included. Keys are stored *after* RoPE at their absolute frame positions, so an evicted frame never shifts
the positions of the frames that stay.

Storage, per layer, is [batch, tokens, heads, head_dim] in frame order:
- `own`: the frames this batch writes (the ordered list `self.frames` says which absolute frame
  sits in which slot; sink frames first). Eviction drops the oldest non-sink frames when a NEW
  block begins and never between the denoising steps of a block: those steps and the context pass
  overwrite the block's own slot in place.
- `prefix` (optional): a frozen history shared by a group of G candidates (paper Eq. 3: the history
  is generated once). It is a batch-1 view of another cache's storage, never copied into the group's
  buffers: the training forward reads it expanded (stride 0), a rollout's attention joins it to each
  candidate's own frames per call (join_rows); each candidate appends its own clip blocks to its own `own` buffer.
"""
import torch


class KVCache:
    def __init__(self, layers, batch, capacity_frames, tokens_per_frame, heads, head_dim,
                 sink_frames, window_frames, frames_per_block, dtype=torch.float32, device="cpu",
                 prefix=None):
        sizes = dict(layers=layers, batch=batch, tokens_per_frame=tokens_per_frame, heads=heads, head_dim=head_dim,
                     frames_per_block=frames_per_block)
        if any(not isinstance(v, int) or v < 1 for v in sizes.values()):
            raise ValueError(f"cache sizes must be positive ints, got {sizes}")
        if window_frames < frames_per_block:
            raise ValueError(f"window_frames={window_frames} is smaller than one block ({frames_per_block} frames)")
        if not 0 <= sink_frames <= window_frames:
            raise ValueError(f"sink_frames={sink_frames} must be in [0, window_frames={window_frames}]")
        if capacity_frames < frames_per_block:
            raise ValueError(f"capacity_frames={capacity_frames} cannot hold one block ({frames_per_block} frames)")
        self.sink, self.window, self.tpf = sink_frames, window_frames, tokens_per_frame
        shape = (batch, capacity_frames * tokens_per_frame, heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.frames = []         # absolute frame index of each own slot, in order
        self.sinks = tuple(range(sink_frames))  # the frames held as sink: never evicted
        self.prefix = prefix     # None or (k, v, frames): per-layer [1, T, H, D] views of a frozen history
        self.pos = None  # where the current block sits: ((first, last + 1) own slot, attended prefix token ranges)

    @property
    def capacity(self):
        return self.k[0].shape[1] // self.tpf

    def end_frame(self):
        """One past the last frame held (own frames after prefix frames); None when empty."""
        last = self.frames or (self.prefix[2] if self.prefix else [])
        return last[-1] + 1 if last else None

    def _in_window(self, f, lo):
        return f in self.sinks or f >= lo

    def begin_block(self, start, n):
        """Position the cache for the block of frames [start, start + n).

        A block already held (later denoising steps, the context pass) reuses its slots; a new block must
        follow the last frame and first evicts what leaves the window. Pure bookkeeping on Python ints: no device
        work, no host sync."""
        lo = start + n - self.window  # oldest non-sink frame the block may see
        if start in self.frames:
            i = self.frames.index(start)
            if self.frames[i:i + n] != list(range(start, start + n)):
                raise ValueError(f"block [{start}, {start + n}) does not match the cached frames {self.frames}")
        else:
            if self.end_frame() not in (None, start):  # an empty cache may begin anywhere
                raise ValueError(f"a new block must start at frame {self.end_frame()}, got {start}")
            keep = [j for j, f in enumerate(self.frames) if self._in_window(f, lo)]
            if len(keep) < len(self.frames):  # drop one contiguous run of old non-sink frames
                first = next(j for j, f in enumerate(self.frames) if not self._in_window(f, lo))
                drop = len(self.frames) - len(keep)
                a, b, e = (x * self.tpf for x in (first, first + drop, len(self.frames)))
                for buf in self.k + self.v:
                    buf[:, a:e - (b - a)] = buf[:, b:e].clone()
                self.frames = [self.frames[j] for j in keep]
            if len(self.frames) + n > self.capacity:
                raise ValueError(f"cache of {self.capacity} frames cannot take block [{start}, {start + n}) "
                                 f"after frames {self.frames}")
            i = len(self.frames)
            self.frames += list(range(start, start + n))
        ranges = []  # contiguous runs of attended prefix frames, as token ranges
        for j, f in enumerate(self.prefix[2] if self.prefix is not None else []):
            if self._in_window(f, lo):
                if ranges and ranges[-1][1] == j * self.tpf:
                    ranges[-1] = (ranges[-1][0], (j + 1) * self.tpf)
                else:
                    ranges.append((j * self.tpf, (j + 1) * self.tpf))
        self.pos = ((i, i + n), tuple(ranges))
        return self.pos

    def rewrite(self, first, end, keep_sink):
        """Position the cache for LongLive's prompt-switch re-cache: one call over frames [first, end), the
        end of what is held, whose K/V overwrite the slots from the first on (frame first + j into slot j),
        so that the call attends to all of them (LongLive 1.0, wan/modules/causal_model.py: the cached path
        applies no mask). keep_sink: the sink slots keep their K/V and the call covers [first + sink, end)
        only (upstream runs the sink's frames too and discards them; nothing else reads them). Otherwise
        the call's first `sink` frames become the sink. No pointer moves: the next block follows `end`."""
        if self.prefix is not None:
            raise ValueError("a re-cache rewrites the cache's own frames; this cache holds a shared prefix")
        if end != self.end_frame():
            raise ValueError(f"a re-cache must end at the last frame held ({self.end_frame()}), got {end}")
        kept = self.frames[:self.sink] if keep_sink else []
        new = list(range(first + len(kept), end))
        if len(kept) + len(new) > self.capacity:
            raise ValueError(f"cache of {self.capacity} frames cannot re-cache frames [{first}, {end})")
        self.frames = kept + new
        if not keep_sink:  # the first `sink` slots are the sink, also those the video has not reached yet
            self.sinks = tuple(range(first, first + self.sink))
        self.pos = ((len(kept), len(self.frames)), ())
        return self.pos

    def attend(self, layer, k, v):
        """Write the current block's k, v [B, tokens, H, D] into its slot (a rollout) and return the keys/values
        the block attends to: a view of the storage, with no copy when there is no prefix. The training forward,
        which leaves the cache as it is, takes `context` instead."""
        (a, b), prefix_tokens = self._slot(k, None)
        self.k[layer][:, a:b] = k
        self.v[layer][:, a:b] = v
        if not prefix_tokens:
            return self.k[layer][:, :b], self.v[layer][:, :b]
        pk, pv, _ = self.prefix
        return join_rows(pk[layer], prefix_tokens, self.k[layer][:, :b]), \
            join_rows(pv[layer], prefix_tokens, self.v[layer][:, :b])

    def context(self, layer, x, pos=None):
        """The cached keys and values the block at `pos` (default: the current one) attends to besides its own
        tokens x [B, tokens, ...], as two lists of views (no copy): the attended prefix ranges, expanded to the
        batch, then the own frames before the block's slot; the cache is left as it is (the training forward: noisy
        queries with gradients). An explicit `pos` lets gradient checkpointing recompute a block after the cache has
        moved on. The training forward takes them as tensors (model.block_call), so that one compiled graph serves
        every layer: a graph guards on Python ints such as the layer index."""
        (a, _), prefix_tokens = self._slot(x, pos)
        ks, vs = self._prefix(layer, prefix_tokens, x.shape[0])
        if a:  # no empty piece: a compiled graph would guard on its size 0
            ks, vs = ks + [self.k[layer][:, :a]], vs + [self.v[layer][:, :a]]
        return ks, vs

    def _slot(self, k, pos):
        if (pos or self.pos) is None:
            raise ValueError("attend() before begin_block(): the cache does not know which block this is")
        (a, b), prefix_tokens = pos or self.pos
        a, b = a * self.tpf, b * self.tpf
        if k.shape[1] != b - a:
            raise ValueError(f"block has {k.shape[1]} tokens, cache slot holds {b - a}")
        return (a, b), prefix_tokens

    def _prefix(self, layer, prefix_tokens, batch):
        if not prefix_tokens:
            return [], []
        pk, pv, _ = self.prefix
        return ([pk[layer][:, s:e].expand(batch, -1, -1, -1) for s, e in prefix_tokens],
                [pv[layer][:, s:e].expand(batch, -1, -1, -1) for s, e in prefix_tokens])

    def fork(self, batch, capacity_frames, frames_per_block):
        """Freeze this (batch-1) cache as the shared prefix of a group of `batch` candidates.

        The prefix is a view of this cache's storage: zero copy, whatever the group size."""
        if self.k[0].shape[0] != 1:
            raise ValueError(f"only a batch-1 history can be shared, this cache has batch {self.k[0].shape[0]}")
        n = len(self.frames) * self.tpf
        _, _, H, D = self.k[0].shape
        forked = KVCache(len(self.k), batch, capacity_frames, self.tpf, H, D, self.sink, self.window,
                         frames_per_block, self.k[0].dtype, self.k[0].device,
                         prefix=([k[:, :n] for k in self.k], [v[:, :n] for v in self.v], list(self.frames)))
        forked.sinks = self.sinks
        return forked

    def detach_(self):
        self.k, self.v = [k.detach() for k in self.k], [v.detach() for v in self.v]
        if self.prefix is not None:
            pk, pv, frames = self.prefix
            self.prefix = ([k.detach() for k in pk], [v.detach() for v in pv], frames)
        return self

    def reset(self):
        self.frames, self.prefix, self.pos, self.sinks = [], None, None, tuple(range(self.sink))

    def bytes_in_use(self):
        """Bytes of K/V held for this batch's own frames (a shared prefix is not counted)."""
        per_frame = 2 * len(self.k) * self.k[0][:, :self.tpf].numel() * self.k[0].element_size()
        return len(self.frames) * per_frame


def join_rows(shared, tokens, own):
    """The token ranges `tokens` of a batch-1 prefix shared [1, T, H, D], then each candidate's own [B, n, H, D]:
    [B, prefix + n, H, D], the same values as torch.cat of the prefix expanded to the batch and own. Joined as one
    cat of dense pieces, candidate by candidate: PyTorch's CUDA cat copies with vector loads only when every input
    is contiguous, and one stride-0 (expanded) input sends the whole join to its per-element kernel
    (aten/src/ATen/native/cuda/Shape.cu, cat_out_cuda): 17-20% of an H200's bandwidth against 84% here, 7.6 -> 1.6 s
    of a G = 24 step's clip rollouts (bench/README.md)."""
    pieces = [shared[0, s:e] for s, e in tokens]
    rows = [p for i in range(own.shape[0]) for p in (*pieces, own[i])]
    return torch.cat(rows).view(own.shape[0], -1, *own.shape[2:])


def append(ks, vs, k, v):
    """The keys and values ks + [k], vs + [v] (lists of [B, tokens, H, D]) joined along the tokens; no copy when
    there is nothing before k."""
    return (torch.cat([*ks, k], 1), torch.cat([*vs, v], 1)) if ks else (k, v)
