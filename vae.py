"""Streaming Wan VAE decoding: latents to pixels chunk by chunk, exactly as one whole-video decode.

The Wan VAE decoder is causal in time. Every causal conv of diffusers' `WanDecoder3d` keeps the last two
frames of its input in a feature cache, and `AutoencoderKLWan.decode` fills that cache latent frame by
latent frame after clearing it, so the first latent frame of a call becomes one (image-like) pixel frame
and every later one four. Decoding a clip on its own therefore gives an image-like first frame with no
temporal context. `Decoder` keeps the cache between calls instead (diffusers' decoder and cache layout,
reused as they are), so decoding [0, a) then [a, b) gives the pixels of decoding [0, b) at once:

    frames of latent frame 0:      pixel frame 0
    frames of latent frame f > 0:  pixel frames [1 + 4 (f - 1), 1 + 4 f)

A clip of F latent frames that starts at s > 0 thus owns 4F pixel frames, those a viewer of the whole
video sees, provided the decoder state before it is that of the history. `Decoder.fork` shares one such
state among the G candidates of a group (the pixel-space twin of the shared KV prefix, paper Eq. 3).
The state depends on the last 38 latent frames only (the decoder's temporal receptive field), so
`history_decoder` warms up on at most that many history frames: exact, at a cost bounded in the history
length (README, "How clips are decoded", has the measured error and cost of shorter warm-ups).
"""
import weakref

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d


# How far back in latent frames the decoder's state reaches (Wan2.1 decoder, 2 resblocks per stage + 1): every
# causal conv sees 2 earlier frames of its input; conv_in, the middle block and up block 0 (7 + 7 convs and the
# temporal upsampler) run at the latent rate: 2 + 8 + 14; up block 1 at twice the rate: 14 frames = 7 latent;
# up blocks 2, 3 and conv_out at 4x: 26 frames = 6.5 latent. A warm-up this long gives the exact state.
RECEPTIVE_FIELD = 38


FAST = weakref.WeakKeyDictionary()  # vae -> the decoder module its streams run, where fast.speed_up set one (the
#                                     compiled decoder, or diffusers' own in the channels-last layout it set)


class Decoder:
    """A stream of latent frames -> pixel frames [B, T, 3, H, W] in [0, 1] (the reward format)."""

    def __init__(self, vae, chunk=3, state=None, frames=0):
        self.vae, self.chunk = vae, chunk
        n = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self.state = [None] * n if state is None else state  # diffusers' feat_cache: one entry per causal conv
        self.frames = frames  # latent frames decoded so far
        cfg = vae.config
        self.mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def __call__(self, latents, keep=True):
        """Decode the next latent frames [B, C, F, h, w] of the stream (normalised latents, as generated).
        keep=False only advances the state (a warm-up): no pixels are kept or returned."""
        vae, B = self.vae, latents.shape[0]
        if latents.ndim != 5 or latents.shape[1] != vae.config.z_dim:
            raise ValueError(f"latents must be [B, {vae.config.z_dim}, F, h, w], got {tuple(latents.shape)}")
        for s in self.state:
            if torch.is_tensor(s) and s.shape[0] not in (1, B):
                raise ValueError(f"decoder state has batch {s.shape[0]}, latents have batch {B}")
        z = latents.float() * self.std.to(latents.device) + self.mean.to(latents.device)
        run = FAST.get(vae, vae.decoder)
        layout = torch.channels_last_3d if vae in FAST else torch.contiguous_format
        z = z.to(vae.dtype, memory_format=layout)
        x = vae.post_quant_conv(z)  # a 1x1x1 conv: no temporal state
        out, i = [], 0
        while i < x.shape[2]:
            # the first latent frame of a stream goes alone (the decoder makes it a single pixel frame); later
            # chunks end on multiples of `chunk`, so whole-video and block-by-block decoding run the same shapes
            n = 1 if self.frames == 0 else min(self.chunk - self.frames % self.chunk, x.shape[2] - i)
            part = x[:, :, i:i + n].contiguous(memory_format=layout)  # one stride pattern per shape: compiled once
            y = run(part, feat_cache=self.state, feat_idx=[0], first_chunk=self.frames == 0)
            if run is not vae.decoder:  # compiled: its state entries are views into whole conv inputs
                self.state[:] = [own_storage(s) for s in self.state]
            out += [y] if keep else []
            i, self.frames = i + n, self.frames + n
        if not keep:
            return None
        video = torch.cat(out, 2).float().clamp(-1, 1)  # [B, 3, T, H, W] in [-1, 1], as diffusers clamps
        return ((video + 1) / 2).permute(0, 2, 1, 3, 4)

    def fork(self, batch):
        """A new stream for `batch` candidates that continues from this (batch-1) state. Eager: no copy (an expand).
        Fast (fast.speed_up): copied into the layout the decoder's own state has after a chunk (own_storage), as
        dynamo guards on strides: an expand (stride 0) would compile every stage once more for a fork's first chunk.
        The copy adds little to the peak: the first chunk replaces each entry with a batch state of that size anyway."""
        if any(torch.is_tensor(s) and s.shape[0] != 1 for s in self.state):
            raise ValueError("only a batch-1 decoder state can be shared")
        state = [s.expand(batch, *s.shape[1:]) if torch.is_tensor(s) else s for s in self.state]
        if self.vae in FAST:
            state = [own_storage(s) for s in state]
        return Decoder(self.vae, self.chunk, state, self.frames)


def own_storage(s):
    """A decoder state entry (the last frames of a causal conv's input) dense in the fast path's layout, in storage of
    its own. The compiled decoder hands each entry back as a view into that conv's whole input: inductor drops the
    clone that diffusers takes of the last frames, so every state entry kept the conv's full chunk buffer alive
    between chunks and across a group's decode (1.07 GB for a full-resolution conv). The decoder's working memory
    for one candidate: 27.0 GB compiled without these copies, 17.3 GB with them, 8.4 GB eager (H100, 2026-12-06:
    bench/README.md), in the same time (0.43-0.45 s a candidate against 0.42-0.44 s). Dense in one layout, too, as
    dynamo guards on strides. Other entries ("Rep", None, owned dense tensors) pass unchanged."""
    if not torch.is_tensor(s):
        return s
    layout = torch.channels_last_3d if s.ndim == 5 else torch.contiguous_format
    if s.is_contiguous(memory_format=layout) and s.untyped_storage().nbytes() == s.numel() * s.element_size():
        return s
    return torch.empty_like(s, memory_format=layout).copy_(s)


def decode(vae, latents, chunk=3):
    """Latents [B, C, F, h, w] of a whole video -> frames [B, 1 + 4 (F - 1), 3, H, W] in [0, 1]."""
    return Decoder(vae, chunk)(latents)


def history_decoder(vae, history, warmup=None, chunk=3):
    """The decoder state after a group's history latents [1, C, s, h, w], to fork for its candidates.

    Only the last `warmup` history frames are decoded: the state reaches no further back (RECEPTIVE_FIELD),
    so the default is exact at a bounded cost however long the history. The default is the receptive field in
    whole chunks (39 frames): a history of whole blocks (the clip start s is a multiple of 3) then leaves the
    candidates' stream on the chunk grid, and their clips decode in whole chunks, the compiled decoder's graphs
    of every step; 38 left each longlive clip a 1-frame and a 2-frame chunk, new layouts that compiled in its first
    step (decode 77.4 s there, H100, 2026-12-06). With s = 0 this is a fresh stream, and the clip decodes to
    1 + 4 (F - 1) frames."""
    warmup = -(-RECEPTIVE_FIELD // chunk) * chunk if warmup is None else warmup
    if warmup < 1:
        raise ValueError(f"warmup={warmup}: at least one history frame must be decoded")
    dec = Decoder(vae, chunk)
    s = history.shape[2]
    if s:
        dec(history[:, :, s - min(s, warmup):], keep=False)
    return dec
