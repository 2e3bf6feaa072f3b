"""evaluate.py: the paired statistics against a hand table, and the command end to end (base against base + a
train.py checkpoint): each CSV score equals an independent single-sample rollout from the documented noise, the
summary's paired difference is the CSV's, the grid holds the first, middle and last frames."""
import csv
import math

import imageio
import numpy as np
import pytest
import torch

import checkpoints as C
import config
import evaluate
import evaluation
import model as M
import train
import vae as V
from helpers import FAST, N
from rewards import build_reward
from rollout import draw_noise, generate, new_cache


def test_paired_statistics_hand_table():
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[2.0, 2.0], [5.0, 3.0]])
    # b - a = 1, 0, 2, -1: mean 1/2, sample variance 5/3, s.e. sqrt(5/3)/2; wins 1 + 1/2 (tie) + 1 + 0 of 4
    assert evaluation.paired(a, b) == pytest.approx((0.5, math.sqrt(5 / 3) / 2, 0.625), rel=1e-12)
    assert evaluation.mean_se(a) == pytest.approx((2.5, math.sqrt(5 / 3) / 2), rel=1e-12)
    row = evaluation.summary({"composite": b}, {"composite": a})  # b: mean 3, sample variance (1 + 1 + 4 + 0) / 3
    assert row == pytest.approx({"eval/composite": 3.0, "eval/composite_se": math.sqrt(2) / 2,
                                 "eval/composite_delta": 0.5, "eval/composite_delta_se": math.sqrt(5 / 3) / 2,
                                 "eval/composite_improved": 0.625}, rel=1e-12)
    assert evaluation.table({"A": {"composite": a}, "B": {"composite": b}}, ["A", "B"]).splitlines()[2] == \
        "| composite | 2.5000 ± 0.6455 | 3.0000 ± 0.7071 | +0.5000 ± 0.6455 | 62% |"


def test_evaluate_command_end_to_end(tmp_path):
    """Base (A) against base + a train.py checkpoint (B) on the tiny model: each CSV score equals an independent
    single-sample rollout from the documented noise, the summary's paired difference is the CSV's, the grid
    holds the first, middle and last frames."""
    train.main(FAST + ["--steps=1", "--lr=0.2", f"--out_dir={tmp_path / 'run'}"])
    ckpt = str(tmp_path / "run" / open(tmp_path / "run" / "latest").read().strip())
    spec = "colorfulness:1,smoothness:2"
    runs = evaluate.main(["--lora_b", ckpt, "--eval_seeds", "3", "--batch", "2", "--frames", "3", "--window_frames", "9",
                          "--height", "32", "--width", "32", "--reward", spec, "--out_dir", str(tmp_path / "ev")])
    rows = list(csv.DictReader(open(tmp_path / "ev" / "scores.csv")))
    prompts = config.read_prompts("prompts/eval.txt")
    assert len(rows) == 2 * len(prompts) * 3 and {r["generator"] for r in rows} == {"A", "B"}
    reward_fn = build_reward(spec)
    for label, i, s in [("A", 1, 2), ("B", 3, 0)]:  # seed 2 was the lone sample of its batch, seed 0 the first of two
        w = M.load_tiny()
        if label == "B":
            C.load_trained(w.model.transformer, ckpt)
        w.height = w.width = 32
        shape = w.latent_shape(3)
        lat = generate(w.model, w.model.text_kv(w.text_encoder([prompts[i]])),
                       draw_noise(hash((0, i, s)) & 0x7FFFFFFF, 1, shape), new_cache(w.model, 1, shape, 3, 9, N), 0, N)
        video = V.decode(w.vae, lat)
        want = reward_fn(video, [prompts[i]])["composite"].item()
        row = next(r for r in rows if (r["generator"], r["prompt_index"], r["seed"]) == (label, str(i), str(s)))
        assert float(row["composite"]) == pytest.approx(want, rel=1e-5)
    a = np.array([float(r["composite"]) for r in rows if r["generator"] == "A"])
    b = np.array([float(r["composite"]) for r in rows if r["generator"] == "B"])
    assert np.abs(b - a).min() > 0  # the checkpoint changed every sample
    line = next(x for x in open(tmp_path / "ev" / "summary.md") if x.startswith("| composite"))
    d = b - a
    assert f"{d.mean():+.4f} ± {d.std(ddof=1) / len(d) ** 0.5:.4f} | {100 * np.mean(d > 0):.0f}%" in line
    assert runs["A"]["composite"].shape == (len(prompts), 3)
    grid = imageio.v2.imread(tmp_path / "ev" / "grid.png")  # 4 prompts x (A | B), each first / middle / last frame
    k, top, left = 4, 44, 260  # 32-pixel frames scaled to 128, below the generators' names, right of the prompts
    assert grid.shape == (top + k * (4 * 32 + 3 * 4), left + k * (2 * 3 * 32 + 4), 3)
    assert (grid[:top] < 128).any() and (grid[top:, :left] < 128).any()  # labels drawn
    grid = grid[top::k, left::k]  # back to one pixel per frame pixel
    w = M.load_tiny()
    w.height = w.width = 32
    lat = generate(w.model, w.model.text_kv(w.text_encoder([prompts[1]])), draw_noise(hash((0, 1, 0)) & 0x7FFFFFFF, 1,
                   w.latent_shape(3)), new_cache(w.model, 1, w.latent_shape(3), 3, 9, N), 0, N)
    v = V.decode(w.vae, lat)[0]
    tile = grid[36:68, 64:96]  # prompt 1, generator A, last frame
    expect = (v[-1].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert v.shape[0] == 9 and np.abs(tile.astype(int) - expect.astype(int)).max() <= 1
