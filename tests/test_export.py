"""export.py: each format, loaded back through this project's own loaders (what sample.py's --checkpoint,
--base_lora and --model call), generates the latents of the checkpoint it came from; the LongLive LoRA has the
keys, shapes, rank and alpha LongLive 1.0's configure_lora_for_model gives the same architecture."""
import os
import re
import shutil

import pytest
import torch
from diffusers import WanTransformer3DModel

import checkpoints as C
import config
import export
import model as M
import train
from helpers import original_wan_keys, to_original  # the hand-written original-Wan key table
from rollout import draw_noise, generate, new_cache

RUN = ["--prompts_per_rank=1", "--group_size=2", "--micro_batch=2", "--clip_frames=3", "--max_history_frames=3",
       "--steps=2", "--eval_every=2", "--eval_seeds=2", "--lr=0.05"]

# LongLive 1.0 (utils/lora_utils.py, configure_lora_for_model): every nn.Linear inside each CausalWanAttentionBlock of
# its CausalWanModel, named as that model names them; peft's get_peft_model wraps the model, so the saved state dict
# (get_peft_model_state_dict) has keys base_model.model.<name>.lora_A.weight / .lora_B.weight, no adapter name.
# (out, in) of each Linear at the tiny sizes: dim 32, ffn 64; cross-attention k/v read the text already at dim.
LONGLIVE_LINEARS = {"self_attn.q": (32, 32), "self_attn.k": (32, 32), "self_attn.v": (32, 32), "self_attn.o": (32, 32),
                    "cross_attn.q": (32, 32), "cross_attn.k": (32, 32), "cross_attn.v": (32, 32),
                    "cross_attn.o": (32, 32), "ffn.0": (64, 32), "ffn.2": (32, 64)}


def longlive_table(layers, rank):
    table = {}
    for n in range(layers):
        for name, (out, inp) in LONGLIVE_LINEARS.items():
            table[f"base_model.model.blocks.{n}.{name}.lora_A.weight"] = (rank, inp)
            table[f"base_model.model.blocks.{n}.{name}.lora_B.weight"] = (out, rank)
    return table


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A LoRA run and a full fine-tuning run of the tiny model, two steps each, with an evaluation at the end."""
    root = tmp_path_factory.mktemp("runs")
    for kind, extra in (("lora", ["--lora_alpha=4"]), ("full", ["--lora_rank=0", "--lr=1e-3"])):
        train.main(RUN + extra + [f"--out_dir={root / kind}"])
    return {kind: str(root / kind / "ckpt-000002") for kind in ("lora", "full")}


def latents(transformer, wan):
    """What a sampler draws with this transformer: 6 latent frames, fixed noise and prompt, fp32."""
    m = M.CausalWan(transformer.float()).eval()
    shape = wan.latent_shape(6)
    kv = m.text_kv(wan.text_encoder(["a red car drives through the rain"]))
    return generate(m, kv, draw_noise(11, 1, shape), new_cache(m, 1, shape, 3, 9, 3), 0, 3)


def reference(ckpt, which="theta", base=None):
    """The checkpoint as sample.py --lora applies it (on the base train.py trained on)."""
    tr = C.load_transformer(*(base or ()), dtype=torch.float32) if base else M.load_tiny().model.transformer
    return C.load_trained(tr, ckpt, which)


def export_to(ckpt, fmt, out, *extra):
    export.main([ckpt, "--to", fmt, "--out", str(out), "--dtype", "float32", *extra])
    return str(out)


@pytest.mark.parametrize("kind,which", [("lora", "theta"), ("lora", "old"), ("full", "theta")])
def test_self_forcing_export_reproduces_the_checkpoint(runs, wan, tmp_path, kind, which):
    out = export_to(runs[kind], "self_forcing", tmp_path / "sf", "--which", which)
    want = latents(reference(runs[kind], which), wan)
    assert not torch.allclose(want, latents(M.load_tiny().model.transformer, wan), atol=1e-3)  # training moved it
    for file, key in (("model.pt", "generator_ema"), ("model.pt", "generator"), ("model.safetensors", None)):
        sd = C.read_checkpoint(os.path.join(out, file), key)
        assert set(sd) == {f"model.{k}" for k in original_wan_keys(2)}
        fresh = M.load_tiny(seed=123).model.transformer  # other weights: everything must come from the file
        C.load_wan_state_dict(fresh, sd, file)
        torch.testing.assert_close(latents(fresh, wan), want, atol=1e-5, rtol=1e-5)


def test_diffusers_export_reproduces_the_checkpoint(runs, wan, tmp_path):
    out = export_to(runs["lora"], "diffusers", tmp_path / "exported" / "transformer")  # exported/ made with it
    loaded = WanTransformer3DModel.from_pretrained(out, torch_dtype=torch.float32)
    torch.testing.assert_close(latents(loaded, wan), latents(reference(runs["lora"]), wan), atol=1e-5, rtol=1e-5)


def longlive_base(root):
    """A LongLive-style base for the tiny architecture: a diffusers folder, a base .pt under `generator` (other
    weights than the folder's) and a rank-4 lora.pt in LongLive's own key layout, random B (not zero)."""
    M.load_tiny(seed=1).model.transformer.save_pretrained(os.path.join(root, "wan", "transformer"))
    sd = to_original(M.load_tiny(seed=2).model.transformer.state_dict(), 2)
    torch.save({"generator": {f"model.{k}": v for k, v in sd.items()}}, os.path.join(root, "base.pt"))
    g = torch.Generator().manual_seed(3)
    table = {k: torch.randn(shape, generator=g) * 0.1 for k, shape in longlive_table(2, 4).items()}
    torch.save({"generator_lora": table}, os.path.join(root, "lora.pt"))
    return os.path.join(root, "wan"), os.path.join(root, "base.pt"), "generator", os.path.join(root, "lora.pt")


def on_base(ckpt, base, dest):
    """The LoRA checkpoint as if trained on `base`: its config names that base."""
    shutil.copytree(ckpt, dest)
    state = torch.load(os.path.join(dest, "state.pt"), weights_only=True)
    state["config"].update(model=base[0], checkpoint=base[1], checkpoint_key=base[2], base_lora=base[3])
    torch.save(state, os.path.join(dest, "state.pt"))
    return str(dest)


def test_longlive_lora_has_longlives_layout_and_reproduces_the_checkpoint(runs, wan, tmp_path):
    base = longlive_base(str(tmp_path))
    ckpt = on_base(runs["lora"], base, tmp_path / "ckpt-000002")
    out = export_to(ckpt, "longlive", tmp_path / "ll")
    yaml = open(os.path.join(out, "longlive.yaml")).read()
    rank, alpha = (int(re.search(rf"^  {k}: (\d+)$", yaml, re.M).group(1)) for k in ("rank", "alpha"))
    assert (rank, alpha) == (4 + 8, 12)  # LongLive's rank 4 beside the trained rank 8, scale alpha / r = 1
    assert re.search(rf"^generator_ckpt: {re.escape(os.path.abspath(base[1]))}$", yaml, re.M)
    assert re.search(rf"^lora_ckpt: {re.escape(os.path.abspath(out))}/lora.pt$", yaml, re.M)
    file = torch.load(os.path.join(out, "lora.pt"), weights_only=True)
    assert list(file) == ["generator_lora"]
    assert {k: tuple(v.shape) for k, v in file["generator_lora"].items()} == longlive_table(2, rank)
    # loaded back as sample.py --model --checkpoint --base_lora loads LongLive: the trained policy exactly
    tr = C.load_transformer(base[0], base[1], base[2], os.path.join(out, "lora.pt"), alpha, dtype=torch.float32)
    want = latents(reference(ckpt, base=base), wan)
    torch.testing.assert_close(latents(tr, wan), want, atol=1e-5, rtol=1e-5)
    untrained = C.load_transformer(*base, dtype=torch.float32)
    assert not torch.allclose(latents(untrained, wan), want, atol=1e-3)


def test_longlive_on_another_base_is_the_merged_generator(runs, wan, tmp_path):
    out = export_to(runs["lora"], "longlive", tmp_path / "ll")
    assert sorted(os.listdir(out)) == ["MODEL_CARD.md", "longlive.yaml", "model.pt"]
    assert "adapter: null" in open(os.path.join(out, "longlive.yaml")).read()
    fresh = M.load_tiny(seed=123).model.transformer
    C.load_wan_state_dict(fresh, C.read_checkpoint(os.path.join(out, "model.pt"), "generator"))
    torch.testing.assert_close(latents(fresh, wan), latents(reference(runs["lora"]), wan), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alpha", [None, 10.0])
def test_base_lora_alpha_scales_longlives_lora_and_defaults_to_its_rank(tmp_path, alpha):
    """--base_lora_alpha (sample.py, evaluate.py -> checkpoints.load_transformer): W = W_base + alpha / r B A, r read
    from the tensors (4 here), alpha = r when not given. Reference: the base's own weights and lora.pt's tensors."""
    base = longlive_base(str(tmp_path))
    tr = C.load_transformer(*base, lora_alpha=alpha, dtype=torch.float32)
    want = M.load_tiny(seed=2).model.transformer  # base.pt holds these weights (longlive_base)
    lora = torch.load(base[3], weights_only=True)["generator_lora"]
    scale = (alpha or 4) / 4
    for n, ours, theirs in ((0, "attn1.to_q", "self_attn.q"), (1, "attn2.to_v", "cross_attn.v"),
                            (1, "ffn.net.0.proj", "ffn.0"), (0, "ffn.net.2", "ffn.2")):
        A, B = (lora[f"base_model.model.blocks.{n}.{theirs}.lora_{x}.weight"] for x in "AB")
        expect = want.get_submodule(f"blocks.{n}.{ours}").weight + scale * B @ A
        torch.testing.assert_close(tr.get_submodule(f"blocks.{n}.{ours}").weight, expect, atol=1e-6, rtol=1e-6)


def full_folder(folder):
    """longlive_base's diffusers folder made whole (text encoder, VAE, tokenizer of the tiny model): what train.py's
    --model needs besides the transformer."""
    tiny = M.load_tiny(seed=1)
    tiny.text_encoder.encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    tiny.text_encoder.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    tiny.vae.save_pretrained(os.path.join(folder, "vae"))
    return folder


def test_train_merges_the_base_lora_at_base_lora_alpha(tmp_path):
    """train.py --base_lora_alpha=10 merges LongLive's rank-4 lora.pt at 10 / 4 (it was merged at alpha = r, scale 1,
    whatever the flag: Config had no such field). Reference: base.pt's own weights and lora.pt's tensors."""
    base = longlive_base(str(tmp_path))
    full_folder(base[0])
    cfg = config.parse_config(RUN + ["--lora_rank=0", f"--model={base[0]}", f"--checkpoint={base[1]}",
                                     f"--checkpoint_key={base[2]}", f"--base_lora={base[3]}", "--base_lora_alpha=10"])
    config.check_config(cfg)
    tr = train.build(cfg).wan.model.transformer
    want = M.load_tiny(seed=2).model.transformer  # base.pt holds these weights (longlive_base)
    lora = torch.load(base[3], weights_only=True)["generator_lora"]
    for n, ours, theirs in ((0, "attn1.to_q", "self_attn.q"), (1, "attn2.to_v", "cross_attn.v"), (1, "ffn.net.2", "ffn.2")):
        A, B = (lora[f"base_model.model.blocks.{n}.{theirs}.lora_{x}.weight"] for x in "AB")
        expect = want.get_submodule(f"blocks.{n}.{ours}").weight + 10 / 4 * B @ A
        torch.testing.assert_close(tr.get_submodule(f"blocks.{n}.{ours}").weight, expect, atol=1e-6, rtol=1e-6)
    with pytest.raises(SystemExit, match="base_lora_alpha=0.0 must be positive"):
        config.check_config(config.parse_config(["--base_lora_alpha=0"]))
    with pytest.raises(SystemExit, match="base_lora_alpha=inf must be a finite number"):
        config.check_config(config.parse_config(["--base_lora_alpha=inf"]))


def test_exports_of_a_run_with_base_lora_alpha_reproduce_it(runs, wan, tmp_path):
    """A LoRA trained on LongLive's base merged at base_lora_alpha = 10 (r 4): the LongLive lora.pt carries LongLive's
    adapter at 10 / 4 (it assumed alpha = r: scale 1), and the merged export folds it in at 10 / 4 too. Reference: the
    base at 10 / 4 (checkpoints.load_transformer, as sample.py --base_lora_alpha 10) + the checkpoint."""
    base = longlive_base(str(tmp_path))
    ckpt = on_base(runs["lora"], base, tmp_path / "ckpt-000002")
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)
    state["config"].update(base_lora_alpha=10.0)
    torch.save(state, os.path.join(ckpt, "state.pt"))
    want = latents(C.load_trained(C.load_transformer(*base, lora_alpha=10.0, dtype=torch.float32), ckpt), wan)
    assert not torch.allclose(latents(reference(ckpt, base=base), wan), want, atol=1e-3)  # alpha = r differs
    out = export_to(ckpt, "longlive", tmp_path / "ll")
    yaml = open(os.path.join(out, "longlive.yaml")).read()
    rank, alpha = (int(re.search(rf"^  {k}: (\d+)$", yaml, re.M).group(1)) for k in ("rank", "alpha"))
    tr = C.load_transformer(base[0], base[1], base[2], os.path.join(out, "lora.pt"), alpha, dtype=torch.float32)
    torch.testing.assert_close(latents(tr, wan), want, atol=1e-5, rtol=1e-5)
    out = export_to(ckpt, "self_forcing", tmp_path / "sf")
    fresh = M.load_tiny(seed=123).model.transformer
    C.load_wan_state_dict(fresh, C.read_checkpoint(os.path.join(out, "model.pt"), "generator_ema"))
    torch.testing.assert_close(latents(fresh, wan), want, atol=1e-5, rtol=1e-5)


def test_model_card_names_base_hash_rewards_steps_and_the_last_evaluation(runs, tmp_path):
    import hashlib
    import json
    base = longlive_base(str(tmp_path))
    ckpt = on_base(runs["lora"], base, tmp_path / "run" / "ckpt-000002")
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)
    state["config"].update(overwrite=True)  # how the run was started, not a setting of the training
    torch.save(state, os.path.join(ckpt, "state.pt"))
    rows = [json.loads(line) for line in open(os.path.join(os.path.dirname(runs["lora"]), "log.jsonl"))]
    with open(tmp_path / "run" / "log.jsonl", "w") as f:  # the run's log beside the checkpoint
        f.writelines(json.dumps(r) + "\n" for r in rows)
    card = open(os.path.join(export_to(ckpt, "self_forcing", tmp_path / "sf"), "MODEL_CARD.md")).read()
    last = [r for r in rows if "eval/composite" in r][-1]
    assert last["step"] == 2
    assert hashlib.sha256(open(base[1], "rb").read()).hexdigest() in card
    assert "step 2 of 2" in card and f"`{config.Config().reward}`" in card
    assert f"| composite | {last['eval/composite']:.4f} | {last['eval/composite_se']:.4f} | " \
           f"{last['eval/composite_delta']:+.4f} | {last['eval/composite_delta_se']:.4f} |" in card
    assert "--lr=0.05" in card and "--to self_forcing" in card and "--overwrite" not in card


@pytest.mark.parametrize("args,msg", [
    (["{tmp}", "--to", "self_forcing"], "is not a train.py checkpoint folder"),
    (["{full}", "--to", "longlive"], "is a full fine-tuning checkpoint .* LongLive's lora.pt needs a LoRA"),
    (["{lora}", "--to", "onnx"], "--to 'onnx' is not a format; choose from longlive, self_forcing, diffusers"),
    (["{lora}", "--to", "diffusers", "--which", "best"], "--which 'best'"),
    (["{lora}", "--to", "diffusers", "--out", "{tmp}/file/x"], "cannot create --out {tmp}/file/x \\({tmp}/file is not"),
])
def test_bad_input_is_one_line_before_any_weight_is_read(runs, tmp_path, monkeypatch, args, msg):
    monkeypatch.setattr(C, "load_transformer", lambda *a, **k: pytest.fail("loaded weights for bad input"))
    (tmp_path / "file").write_text("")
    argv = ["--out", str(tmp_path / "x")] + [x.format(tmp=tmp_path, full=runs["full"], lora=runs["lora"]) for x in args]
    with pytest.raises(SystemExit, match=msg.format(tmp=re.escape(str(tmp_path)))):
        export.main(argv)
    assert not (tmp_path / "x").exists()
