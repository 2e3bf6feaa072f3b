"""model.py's own numerics beside the original Wan: the timestep sinusoid, in float64 as Wan computes it."""
import math

import torch

import model as M


def test_timestep_sinusoid_is_float64_wan_formula(wan):
    t = torch.rand(5, dtype=torch.float64) * 1000
    t[0] = 1000.0
    dim = wan.model.transformer.config.freq_dim
    ref = torch.tensor([[math.cos(float(x) * 10000 ** (-i / (dim // 2))) for i in range(dim // 2)] +
                        [math.sin(float(x) * 10000 ** (-i / (dim // 2))) for i in range(dim // 2)] for x in t])
    torch.testing.assert_close(M.sinusoid(t, dim), ref.float(), atol=1e-6, rtol=0)  # float32 angles: 4e-5 off
    diffusers_fp32 = wan.model.transformer.condition_embedder.timesteps_proj(t.float())  # same layout, fp32 angles
    torch.testing.assert_close(M.sinusoid(t, dim), diffusers_fp32, atol=1e-4, rtol=0)
