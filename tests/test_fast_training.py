"""The training step's fast paths against the eager reference path, on the CPU: rewards scored per micro-batch."""
import functools

import pytest
import torch
import torch.nn as nn

import rewards
from reward_models import HPSv3, VideoAlign
from test_astrolabe import NORM, PIXELS, hps_head, make_tokenizer, randomize, tiny_config, video


# ------------------------------------------------------------------ rewards per micro-batch
def test_rewards_per_micro_batch_equal_the_whole_group(monkeypatch):
    """The scores of clips scored `batch` at a time equal one call on all of them: HPSv3 (its 16-frame chunks straddle
    clips: 5 frames a clip), VideoAlign's two axes (4-clip chunks) and the offline rewards, each clip with its own
    prompt (a batch given another batch's prompts, or reordered, would differ). Each model is still resident once."""
    tok = make_tokenizer()
    hps = randomize(HPSv3(tiny_config(tok), hps_head(32), tok, PIXELS), 0)
    va = randomize(VideoAlign(tiny_config(tok), nn.Linear(32, 3, bias=False), tok, PIXELS, norm=NORM, fps=2.0), 1)
    names = ["hpsv3", "va_mq", "va_ta", "colorfulness", "prompt_color"]
    fns = [hps.score, functools.partial(va.score, axis="MQ", gray=True), functools.partial(va.score, axis="TA", gray=False),
           rewards.colorfulness, rewards.prompt_color]
    reward = rewards.CompositeReward(names, [1.0, 0.5, 2.0, 1.0, 3.0], fns, [hps, va, va, None, None])
    frames = video(7, 5, 64, 96, seed=3) ** torch.linspace(0.4, 2.5, 7)[:, None, None, None, None]
    prompts = ["a red fox", "a blue whale", "green hills", "a white cat", "a red car", "black night", "a fox"]
    whole = reward(frames, prompts)
    resident = []
    real = rewards.resident
    monkeypatch.setattr(rewards, "resident", lambda m: (resident.append(m), real(m))[1])
    for batch in (1, 3):
        resident.clear()
        parts = reward(frames, prompts, batch=batch, device="cpu")
        assert resident == [hps, va, None]
        for k in whole:
            torch.testing.assert_close(parts[k], whole[k], atol=1e-5, rtol=1e-5, msg=f"{k}, batch {batch}")
    assert whole["composite"].std() > 1e-2  # the clips score differently: a shuffle would show
    with pytest.raises(ValueError, match="must lie in"):
        reward(frames * 1.5, prompts, batch=3)
