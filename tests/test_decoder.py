"""Streaming VAE decoding (vae.py) against diffusers' own one-shot decode: any chunking of the latents, the fast
decoder's layout and padding, a clip's pixels as the window of the whole video from a bounded warm-up, one decoder
state shared by a group of candidates, frames decoded block by block during generation."""
import copy

import pytest
import torch

import fast
import vae as V
from helpers import N, text_kv
from rollout import draw_noise, generate, new_cache


def diffusers_decode(vae, z):
    """The independent reference: diffusers' own one-shot decode (cache cleared, latent frame by frame)."""
    cfg = vae.config
    z = z * torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1) + torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    return ((vae.decode(z).sample.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize("cuts,chunk", [((), 1), ((), 5), ((1, 2, 3, 7), 2), ((4, 5, 11), 3)])
def test_streaming_decode_equals_one_shot(wan, cuts, chunk):
    torch.manual_seed(11)
    z = torch.randn(2, 16, 13, 4, 4)
    ref = diffusers_decode(wan.vae, z)
    dec, edges = V.Decoder(wan.vae, chunk), (0, *cuts, 13)
    parts = [dec(z[:, :, a:b]) for a, b in zip(edges, edges[1:])]
    assert [p.shape[1] for p in parts] == [4 * (b - a) - (a == 0) * 3 for a, b in zip(edges, edges[1:])]
    torch.testing.assert_close(torch.cat(parts, 1), ref, atol=1e-5, rtol=0)


def test_fast_decoder_layout_and_padding_give_the_same_pixels(wan):
    """fast.speed_up without compile (the CPU can run it): channels-last weights, spatial padding moved into the
    convolutions, chunks made contiguous. The same pixels as diffusers' decode of the untouched VAE."""
    torch.manual_seed(15)
    z = torch.randn(1, 16, 10, 4, 4)
    ref = diffusers_decode(wan.vae, z)
    quick = fast.speed_up(copy.deepcopy(wan.vae), compile=False)
    moved = [m for m in quick.decoder.modules() if isinstance(m, V.WanCausalConv3d) and m.padding[1:] == (1, 1)]
    assert len(moved) > 10 and all(m._padding[:4] == (0, 0, 0, 0) for m in moved)
    fast.speed_up(quick, compile=False)  # twice is harmless: the padding is not moved again
    assert all(m.padding[1:] == (1, 1) for m in moved)
    torch.testing.assert_close(V.Decoder(quick)(z), ref, atol=1e-5, rtol=0)


def test_clip_pixels_are_the_window_of_the_whole_video(wan):
    """A clip at s > 0 decodes to the 4 F frames [1 + 4 (s - 1), 1 + 4 (s + F - 1)) of the whole video, from a
    warm-up bounded by the decoder's receptive field; a short warm-up is measurably off; s = 0 keeps 1 + 4 (F - 1)."""
    torch.manual_seed(12)
    s, F = V.RECEPTIVE_FIELD + 4, 3
    z = torch.randn(1, 16, s + F, 4, 4)
    whole = diffusers_decode(wan.vae, z)
    window = whole[:, 1 + 4 * (s - 1):1 + 4 * (s + F - 1)]
    clip = V.history_decoder(wan.vae, z[:, :, :s]).fork(1)(z[:, :, s:])
    assert clip.shape[1] == 4 * F
    torch.testing.assert_close(clip, window, atol=1e-5, rtol=0)
    for start in (0, 3, 21, 36, 39, 42):  # any block-multiple start: the warm-up ends on the chunk grid, bounded
        assert V.history_decoder(wan.vae, z[:, :, :start]).frames == min(start, 39)
    short = V.history_decoder(wan.vae, z[:, :, :s], warmup=3).fork(1)(z[:, :, s:])
    assert (short - window).abs().max() > 1e-2  # the state really reaches back: the test above can fail
    first = V.history_decoder(wan.vae, z[:, :, :0]).fork(1)(z[:, :, :F])
    assert first.shape[1] == 1 + 4 * (F - 1)
    torch.testing.assert_close(first, whole[:, :1 + 4 * (F - 1)], atol=1e-5, rtol=0)


def test_group_shares_one_decoder_state(wan):
    torch.manual_seed(13)
    G, s, F = 3, 6, 3
    history, clips = torch.randn(1, 16, s, 4, 4), torch.randn(G, 16, F, 4, 4)
    shared = V.history_decoder(wan.vae, history).fork(G)(clips)
    for i in range(G):
        whole = diffusers_decode(wan.vae, torch.cat([history, clips[i:i + 1]], 2))
        torch.testing.assert_close(shared[i], whole[0, 1 + 4 * (s - 1):], atol=1e-5, rtol=0)


def test_progressive_decode_during_generation_equals_decoding_after(wan):
    m, shape = wan.model, (16, 9, 8, 8)
    noise = draw_noise(14, 1, shape)
    dec, frames = V.Decoder(wan.vae), []
    latents = generate(m, text_kv(wan), noise, new_cache(m, 1, shape, 3, 9, N), 0, N,
                       on_block=lambda x0: frames.append(dec(x0)), cache_last_block=False)
    full = generate(m, text_kv(wan), noise, new_cache(m, 1, shape, 3, 9, N), 0, N)
    assert torch.equal(latents, full)  # the skipped last context pass changes nothing generated
    torch.testing.assert_close(torch.cat(frames, 1), diffusers_decode(wan.vae, full), atol=1e-5, rtol=0)


def test_compiled_decoder_state_owns_its_storage(wan):
    """The compiled decoder (inductor, as on the GPU; C++ on the CPU) returns each conv's cached last frames as a
    view into the conv's whole input buffer; Decoder keeps a copy of its own instead, so the state holds only its
    frames (at 480x832 the views held ~10 GB more in one candidate's decode). The pixels stay those of diffusers'
    decode."""
    torch.manual_seed(16)
    z = torch.randn(1, 16, 3, 16, 16)  # chunk layouts: the first frame alone, then two (two compilations)
    quick = fast.speed_up(copy.deepcopy(wan.vae), compile=True)
    dec = V.Decoder(quick)
    out = dec(z)
    sizes = [(s.untyped_storage().nbytes(), s.numel() * s.element_size()) for s in dec.state if torch.is_tensor(s)]
    assert len(sizes) > 10 and all(held == own for held, own in sizes), sizes
    torch.testing.assert_close(out, diffusers_decode(wan.vae, z), atol=1e-4, rtol=0)
