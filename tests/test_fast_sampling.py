"""The sampling fast path as sample.py runs it: its warm-up meets every call the video then makes (no compilation,
or recompilation inside the timed video), and many videos per process equal one video each;
evaluate.py and train.py's evaluation through the same compiled path (fast.py) score as the eager path does."""
import copy
import functools
import re

import imageio
import numpy as np
import pytest
import torch

import config
import evaluation
import fast
import sample
import train


def run_sample(args, capsys):
    sample.main(args)
    return capsys.readouterr().out


def during_video(out):
    """The compilations that sample.py reports during each video it wrote."""
    return [int(m) for m in re.findall(r"(\d+) compilations during the video", out)]


def test_dry_run_hand_table():
    # sink 3 + window 21 fills at frame 24; the decoder's chunk pattern (1, 2, 3, then 3 after 3) needs 10 frames
    assert sample.dry_run(21, [], 3, 21, 3) == (21, [])          # shorter than the dry run: the video itself
    assert sample.dry_run(120, [], 3, 21, 3) == (30, [])         # full at 24, two blocks more
    assert sample.dry_run(120, [6, 60, 90], 3, 6, 3) == (21, [6, 12])  # late switches repeat the first past 9
    assert sample.dry_run(120, [9, 12], 3, 6, 3) == (21, [9, 12])      # at 9 the re-cache reaches frame 0, at 12 not
    assert sample.dry_run(120, [3], 3, 3, 1) == (12, [3])        # 1-frame blocks: full at 6, decoder needs 10


@pytest.mark.parametrize("args, control", [
    (["--frames", "12"], True),                                          # no eviction
    (["--frames", "36", "--sink_frames", "3", "--window_frames", "6", "--prompt", "a|b|c", "--switch", "6,27"], False),  # evicts, re-caches
    (["--frames", "36", "--sink_frames", "3", "--window_frames", "6", "--prompt", "a|b", "--switch", "20", "--global_sink", "0"], False),
    # a late switch alone: with the sink kept it re-caches the window only (6 frames), a reach no block call meets
    (["--frames", "36", "--sink_frames", "3", "--window_frames", "6", "--prompt", "a|b", "--switch", "27"], False),
])
def test_warm_up_leaves_nothing_to_compile_in_the_video(tmp_path, monkeypatch, capsys, args, control):
    """dynamo's eager backend on the CPU: the same tracing, guards and recompilations as on the GPU, no codegen.
    Fails if the dry run misses a shape, a cache slot, a re-cache reach or a decoder chunk layout. The control (a
    warm-up one block short compiles inside the video: the count can see a miss) runs with the first case only: it
    tests the count, which is the same in every case (it was half of the other cases' time)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    prompts = tmp_path / "p.txt"
    line = args[args.index("--prompt") + 1] if "--prompt" in args else "a fox"
    prompts.write_text(f"{line}\n{line.replace('a', 'the')}\n")
    args = [x for i, x in enumerate(args) if "--prompt" not in (x, args[i - 1] if i else None)]
    out = run_sample(["--prompts", str(prompts), "--out", str(tmp_path / "v"), "--fast", "2", "--device", "cpu",
                      *args], capsys)
    assert during_video(out) == [0, 0], out
    names = sorted(p.name for p in (tmp_path / "v").iterdir())  # the warm-up's throw-away mp4 is not among them
    assert len(names) == 2 and all(re.fullmatch(r"00[01]-[a-z0-9-]+\.mp4", n) for n in names), names
    if not control:
        return
    monkeypatch.setattr(sample, "dry_run", lambda f, s, *a, **k: (3, [x for x in s if x < 3]))
    torch._dynamo.reset()
    out = run_sample(["--prompts", str(prompts), "--out", str(tmp_path / "w"), "--fast", "2", "--device", "cpu",
                      *args], capsys)
    assert during_video(out)[0] > 0, out


def test_prompts_file_writes_one_video_per_line_each_as_its_own_command(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("A red fox, in snow!\n\na blue whale sings|the whale dives\n"
                       .replace("\n\n", "\na cat sleeps|a cat wakes\n"))
    with pytest.raises(SystemExit, match="as many '\\|'-separated prompts"):
        sample.main(["--prompts", str(prompts), "--out", str(tmp_path / "v"), "--device", "cpu", "--frames", "6"])
    prompts.write_text("A red fox, in snow!|the fox runs\n\na blue whale sings|the whale dives\n")
    run_sample(["--prompts", str(prompts), "--out", str(tmp_path / "v"), "--device", "cpu", "--frames", "6",
                "--switch", "3", "--seed", "5"], capsys)
    names = sorted(p.name for p in (tmp_path / "v").iterdir())
    assert names == ["000-a-red-fox-in-snow-the-fox-runs.mp4", "001-a-blue-whale-sings-the-whale-dives.mp4"]
    for i, (name, line) in enumerate(zip(names, ["A red fox, in snow!|the fox runs",
                                                  "a blue whale sings|the whale dives"])):
        one = tmp_path / f"one{i}.mp4"
        run_sample(["--prompt", line, "--switch", "3", "--frames", "6", "--seed", str(5 + i), "--out", str(one),
                    "--device", "cpu"], capsys)
        a, b = (np.stack(imageio.mimread(str(p))) for p in (tmp_path / "v" / name, one))
        assert a.shape == (21, 64, 64, 3) and np.array_equal(a, b)
    a, b = (np.stack(imageio.mimread(str(tmp_path / "v" / n))) for n in names)
    assert not np.array_equal(a, b)  # different prompts and seeds: different videos


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inductor)")
def test_gpu_videos_compile_nothing_after_the_warm_up(tmp_path, capsys):
    torch._dynamo.reset()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox|a fox runs\na cat|a cat sleeps\n")
    out = run_sample(["--prompts", str(prompts), "--out", str(tmp_path / "v"), "--frames", "36", "--sink_frames", "3",
                      "--window_frames", "6", "--switch", "27", "--device", "cuda", "--fast", "1"], capsys)
    assert during_video(out) == [0, 0], out


@pytest.mark.parametrize("args,msg", [
    ([], "give --prompt TEXT or --prompts FILE"),
    (["--prompt", "a", "--prompts", "P"], "give --prompt TEXT or --prompts FILE"),
    (["--prompts", "P", "--out", "v.mp4"], "is a folder for the videos, not a file"),
    (["--prompts", "missing.txt"], "prompt file missing.txt does not exist"),
])
def test_prompts_file_flags_rejected_before_loading(tmp_path, monkeypatch, args, msg):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "P").write_text("a fox\n")
    monkeypatch.setattr(sample.checkpoints, "load", lambda *a, **k: pytest.fail("loaded a model before rejecting the input"))
    with pytest.raises(SystemExit, match=re.escape(msg)):
        sample.main(args + ["--device", "cpu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["P"]  # nothing written


def test_fast_path_default_hand_table():
    k = fast.PAYS_FROM_FRAMES
    assert [fast.wanted(None, d, f) for d, f in [("cpu", 10 * k), ("cuda", k - 1), ("cuda", k), ("cuda:1", 10 * k)]] \
        == [False, False, True, True]
    assert [fast.wanted(x, d, 1) for x, d in [(0, "cuda"), (1, "cuda"), (1, "cpu"), (2, "cpu")]] == [False, True, False, True]


def test_training_evaluation_through_the_compiled_path_scores_as_eager(monkeypatch):
    """train.py's held-out evaluation on theta (peft's `default` adapter among three) through fast.compiled, traced by
    dynamo (eager backend on the CPU: the same graphs and guards as inductor on a GPU), against the eager path; then
    theta changes, and the compiled path must follow it (weights read live, not baked into the graphs)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    cfg = config.parse_config(["--eval_every=0", "--eval_seeds=2", "--micro_batch=2"])
    ctx = train.build(cfg)
    ctx.eval_prompts, ctx.log = ctx.eval_prompts[:2], None
    gen = torch.Generator().manual_seed(21)
    for name in ("default", "old", "ref"):  # distinct, nonzero adapters: the compiled path must run theta's
        for p in ctx.policy.params(name):
            p.data = (torch.randn(p.shape, generator=gen) * 0.3).to(p.device, p.dtype)
    monkeypatch.setattr(evaluation.os, "makedirs", lambda *a, **k: None)  # no samples/ folder: scores only
    monkeypatch.setattr(evaluation, "save_video", lambda *a, **k: None)
    monkeypatch.setattr(evaluation, "write_scores", lambda *a, **k: None)
    stages = ctx.policy.model.stages

    def scores(fast_eval):
        ctx.fast_eval = fast_eval
        before = sample.compilations()
        out = evaluation.evaluate_theta(1, cfg, ctx)
        return out, sample.compilations() - before
    eager, none = scores(False)
    compiled, traced = scores(True)
    assert none == 0 and traced > 0 and ctx.policy.model.stages is stages  # compiled inside, restored after
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-5, atol=1e-6)
    old = {k: v.clone() for k, v in eager.items()}
    for k, p in ctx.policy.named("default"):
        if "lora_B" in k:  # B alone: negating A and B together would leave B A as it was
            p.data.mul_(-1.0)
    eager, _ = scores(False)
    compiled, _ = scores(True)
    assert not torch.equal(eager["composite"], old["composite"])
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-5, atol=1e-6)


def test_compiled_path_is_made_once_per_model_and_vae(wan):
    """fast.compiled, compile_blocks and speed_up hand back the same compiled objects every time: dynamo guards
    on the backend object, so a new torch.compile wrapper would compile everything again at each evaluation."""
    import copy
    import vae as V
    w = copy.deepcopy(wan)
    m, eager_stages = w.model, w.model.stages
    with fast.compiled(m, w.vae):
        stages, decoder = m.stages, V.FAST[w.vae]
    assert m.stages is eager_stages and stages is not eager_stages and decoder is not w.vae.decoder
    fast.speed_up(w.vae, compile=False)  # a training lever switched off (fast_train.configure), then on again
    assert V.FAST[w.vae] is w.vae.decoder
    with fast.compiled(m, w.vae):
        assert m.stages is stages and V.FAST[w.vae] is decoder
    assert fast.compile_blocks(m).stages is stages


def test_fast_decoder_never_compares_a_cached_tensor_with_the_rep_marker(wan, monkeypatch):
    """diffusers marks a stream's first chunk with the string "Rep" in the decoder cache and tests `entry == "Rep"`
    on later chunks, where the entry is a tensor: torch 2.11's dynamo cannot trace that comparison, breaks the graph
    inside the decoder's up-block loop and then drops the whole decoder, compiling its pieces again inside the first
    video (16 compilations, H100 2026-12-06; torch 2.13 traces it). speed_up's upsamplers (fast.Upsample3d) tell the
    marker apart by type: here a tensor compared with a str raises, and the stream of 1-, 2-, 3- and 1-frame chunks
    (every branch) still gives diffusers' own pixels; the control is diffusers' module, which compares."""
    import vae as V
    quick = fast.speed_up(copy.deepcopy(wan.vae), compile=False)
    assert sum(type(m) is fast.Upsample3d for m in quick.decoder.modules()) == 2  # the tiny decoder's temporal upsamplers
    torch.manual_seed(16)
    z = torch.randn(1, 16, 7, 4, 4)
    ref = V.decode(wan.vae, z)
    eq, ne = torch.Tensor.__eq__, torch.Tensor.__ne__

    def strict(op):
        def compare(self, other):
            if isinstance(other, str):
                raise AssertionError(f"a cached tensor compared with {other!r}")
            return op(self, other)
        return compare
    monkeypatch.setattr(torch.Tensor, "__eq__", strict(eq))
    monkeypatch.setattr(torch.Tensor, "__ne__", strict(ne))
    dec = V.Decoder(quick)
    out = torch.cat([dec(z[:, :, a:b]) for a, b in [(0, 1), (1, 3), (3, 6), (6, 7)]], 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with pytest.raises(AssertionError, match="compared with 'Rep'"):
        V.decode(wan.vae, z)
