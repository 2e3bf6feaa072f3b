"""The offline rewards (rewards.py) the CPU runs and the demo train on: colorfulness, smoothness and prompt_color
move the right way and equal their formulas; the default spec gives a learnable, deterministic signal."""
import numpy as np
import pytest
import torch

from helpers import video
from config import DEFAULT_OFFLINE_SPEC
from rewards import build_reward, colorfulness, prompt_color, smoothness


def test_offline_rewards_move_the_right_way():
    v = video(1, 13, 64, 64, seed=31)
    red = 0.5 * v + 0.5 * torch.tensor([1., 0, 0])[:, None, None]
    assert prompt_color(red, ["a red car"]) > prompt_color(v, ["a red car"])
    assert prompt_color(red, ["a blue car"]) < prompt_color(v, ["a blue car"])
    assert prompt_color(red, ["a car"]).item() == 0
    pixel = torch.tensor([1., 0, 0]).view(1, 1, 3, 1, 1)  # one pure red pixel
    assert prompt_color(pixel, ["Red!"]).item() == pytest.approx(1.0)
    gray = v.mean(2, keepdim=True).expand(-1, -1, 3, -1, -1)
    assert colorfulness(gray, ["x"]).item() == pytest.approx(0, abs=1e-6) and colorfulness(v, ["x"]) > 0.1
    mixed = gray.clone()
    mixed[:, [2, 5, 8, 11]] = v[:, [2, 5, 8, 11]]  # 4 colourful frames of 13: top-30% keeps k = 3 of them
    rg = v[0, :, 0] - v[0, :, 1]
    yb = (v[0, :, 0] + v[0, :, 1]) / 2 - v[0, :, 2]
    per = (rg.flatten(1).var(1, unbiased=False) + yb.flatten(1).var(1, unbiased=False)).sqrt() \
        + 0.3 * (rg.flatten(1).mean(1) ** 2 + yb.flatten(1).mean(1) ** 2).sqrt()
    assert colorfulness(mixed, ["x"]).item() == pytest.approx(per[[2, 5, 8, 11]].sort().values[1:].mean().item(), rel=1e-5)
    still = v[:, :1].expand(-1, 13, -1, -1, -1) * torch.linspace(0.9, 1, 13)[None, :, None, None, None]
    assert smoothness(still, ["x"]) > smoothness(v, ["x"])
    lum = (v[0] * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1).numpy()
    assert smoothness(v, ["x"]).item() == pytest.approx(-np.abs(np.diff(lum, axis=0)).mean(), rel=1e-5)


@pytest.mark.parametrize("f", [9, 21])
def test_default_offline_spec_gives_a_learnable_deterministic_signal(f):
    reward_fn = build_reward(DEFAULT_OFFLINE_SPEC)
    assert reward_fn.names == ["colorfulness", "smoothness", "prompt_color"] and reward_fn.weights == [1.0, 1.0, 1.0]
    frames = video(6, f, 64, 64, seed=f) ** torch.linspace(0.5, 3, 6)[:, None, None, None, None]
    prompts = ["a red car", "a blue sky", "a green field", "a cat", "a red fox", "white snow"]
    out = reward_fn(frames, prompts)
    assert out.keys() == {"colorfulness", "smoothness", "prompt_color", "composite"}
    for name, r in out.items():
        assert r.dtype == torch.float32 and r.shape == (6,) and r.device.type == "cpu" and torch.isfinite(r).all()
        assert name == "prompt_color" or r.std() > 1e-3  # varies across samples
    torch.testing.assert_close(out["composite"], out["colorfulness"] + out["smoothness"] + out["prompt_color"])
    torch.testing.assert_close(reward_fn(frames, prompts)["composite"], out["composite"], rtol=0, atol=0)
