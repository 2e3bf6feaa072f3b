"""Weights read from disk. The generator: the original Wan2.1 layout (a Self-Forcing-style .pt) and Krea's 14B
.safetensors load back exactly, against a hand-written key table, and loader errors name the keys. LoRAs: LongLive's
and train.py's checkpoint folders merge exactly; a damaged folder is refused before anything is generated. Files:
torch files are read as data (never code), damaged ones with clear errors. The reward models: the HPSv3 checkpoint's
key remap and VideoAlign's full and LoRA checkpoint forms give the tiny Qwen2-VL models they were written from."""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import checkpoints as C
import config
import model as M
from helpers import (NORM, PIXELS, CodeInPickle, assert_same_tree, original_wan_keys, text_kv, tiny_config, to_original,
                     video)
from helpers import hps, tok, va  # noqa: F401 (pytest fixtures, shared with the other files that score)
from reward_models import VideoAlign, load_hpsv3, load_videoalign


# ------------------------------------------------------------------ the generator: original Wan2.1 and Krea 14B layouts
def test_original_layout_loads_and_reproduces(wan, tmp_path):
    torch.manual_seed(5)
    src = wan.model.transformer
    layers = src.config.num_layers
    sd = to_original(src.state_dict(), layers)  # every key name the real checkpoint has, tiny sizes
    wrapped = {"generator_ema": {f"model._fsdp_wrapped_module.{k}": v for k, v in sd.items()}}
    torch.save(wrapped, tmp_path / "self_forcing.pt")
    fresh = M.load_tiny(seed=123).model
    C.load_wan_state_dict(fresh.transformer, C.read_checkpoint(str(tmp_path / "self_forcing.pt")))
    x, kv = torch.randn(2, 16, 3, 8, 8), text_kv(wan)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, 500.0, kv), wan.model(x, 500.0, kv), atol=0, rtol=0)


def test_krea_14b_layout_loads_and_reproduces(wan, tmp_path):
    """Krea realtime 14B ships one .safetensors of original-Wan keys under `model.` (krea-ai/realtime-video loads
    it into a wrapper holding the Wan model as `.model`): the tiny model written that way loads back exactly, and
    the 40-layer hand table names exactly the Wan2.1-T2V-14B transformer's tensors, 1095 of them, at dim 5120."""
    sd = {f"model.{k}": v.contiguous() for k, v in to_original(wan.model.transformer.state_dict(), 2).items()}
    save_file(sd, tmp_path / "krea-realtime-video-14b.safetensors")
    fresh = M.load_tiny(seed=123).model
    C.load_wan_state_dict(fresh.transformer, C.read_checkpoint(str(tmp_path / "krea-realtime-video-14b.safetensors")))
    x, kv = torch.randn(2, 16, 3, 8, 8), text_kv(wan)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, 500.0, kv), wan.model(x, 500.0, kv), atol=0, rtol=0)
    with torch.device("meta"):
        big = M.WanTransformer3DModel(**M.WAN_14B).state_dict()
    keys = original_wan_keys(40)
    assert len(keys) == 1095 and {C.wan_to_diffusers(f"model.{k}") for k in keys} == set(big)
    assert big["blocks.39.attn1.to_k.weight"].shape == (5120, 5120)
    assert big["blocks.0.ffn.net.0.proj.weight"].shape == (13824, 5120)
    cfg = config.parse_config(["--preset=krea"])
    config.check_config(cfg)
    assert cfg.sink_frames == 0 and cfg.max_history_frames + cfg.clip_frames <= cfg.window_frames  # nothing rolls out


def test_loader_errors_name_the_keys(wan, tmp_path):
    sd = to_original(wan.model.transformer.state_dict(), 2)
    fresh = M.load_tiny(seed=1).model.transformer
    missing = {k: v for k, v in sd.items() if k != "blocks.1.ffn.2.bias"}
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.net\.2\.bias"):
        C.load_wan_state_dict(fresh, missing)
    with pytest.raises(ValueError, match=r"blocks\.7\.norm2\.weight"):
        C.load_wan_state_dict(fresh, {**sd, "blocks.7.norm3.weight": torch.ones(32)})
    with pytest.raises(ValueError, match="unknown checkpoint layout.*encoder.layer"):
        C.load_wan_state_dict(fresh, {"encoder.layer.0.weight": torch.ones(1)})
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        C.read_checkpoint(str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="has no entry 'generator_ema'; top-level keys: \\['generator'\\]"):
        torch.save({"generator": sd}, tmp_path / "g.pt")
        C.read_checkpoint(str(tmp_path / "g.pt"), "generator_ema")
    with pytest.raises(ValueError, match=r"another model size\?\): \['proj_out.weight \(3, 3\) != \(64, 32\)'\]"):
        C.load_wan_state_dict(fresh, {**sd, "head.head.weight": torch.ones(3, 3)})
    with pytest.raises(ValueError, match=r"non-finite \(NaN or inf\) values in 1 tensor\(s\), e.g. \['proj_out.bias'\]"):
        C.load_wan_state_dict(fresh, {**sd, "head.head.bias": torch.full((64,), float("nan"))}, "g.pt")


# ------------------------------------------------------------------ LoRAs: LongLive's, train.py's checkpoint folders
def test_longlive_lora_merges_into_base(wan):
    torch.manual_seed(6)
    tr = copy.deepcopy(wan.model.transformer)
    A, B = torch.randn(4, 32), torch.randn(32, 4)
    w = tr.blocks[1].attn2.to_v.weight.clone()
    C.merge_lora(tr, {"base_model.model.blocks.1.cross_attn.v.lora_A.weight": A,
                      "base_model.model.blocks.1.cross_attn.v.lora_B.weight": B}, alpha=8)
    torch.testing.assert_close(tr.blocks[1].attn2.to_v.weight, w + 2.0 * B @ A)
    with pytest.raises(ValueError, match="lora_B"):
        C.merge_lora(tr, {"base_model.model.blocks.1.cross_attn.v.lora_A.weight": A})


def lora_folder(root, alpha=8, value=None):
    """A train.py-style LoRA checkpoint folder for the tiny model (one adapted Linear)."""
    g = torch.Generator().manual_seed(43)
    sd = {"blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 32, generator=g),
          "blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 4, generator=g)}
    if value is not None:
        sd["blocks.0.attn1.to_q.lora_B.weight"][3, 1] = value
    os.makedirs(root, exist_ok=True)
    save_file(sd, os.path.join(root, "adapter_model.safetensors"))
    with open(os.path.join(root, "adapter_config.json"), "w") as f:
        f.write(alpha if isinstance(alpha, str) else json.dumps({"lora_alpha": alpha}))
    return root


def test_lora_folder_merges_exactly_and_missing_files_are_named(tmp_path):
    tr = M.load_tiny().model.transformer
    before = tr.blocks[0].attn1.to_q.weight.detach().clone()
    folder = lora_folder(str(tmp_path / "ok"), alpha=2)
    C.load_trained(tr, folder)
    g = torch.Generator().manual_seed(43)
    A, B = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)
    torch.testing.assert_close(tr.blocks[0].attn1.to_q.weight, before + 0.5 * B @ A)  # alpha / r = 2 / 4
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="ok is not a train.py checkpoint folder"):
        C.load_trained(tr, folder)
    with pytest.raises(FileNotFoundError, match="holds neither adapter_model.safetensors nor transformer.safetensors"):
        C.load_trained(tr, str(tmp_path))


@pytest.mark.parametrize("damage,msg", [
    (dict(value=float("nan")), r"adapter_model.safetensors: non-finite \(NaN or inf\) values in 1 tensor"),
    (dict(value=float("inf")), r"adapter_model.safetensors: non-finite"),
    (dict(alpha="{not json"), r"adapter_config.json: not valid JSON"),
    (dict(alpha="[8]"), r"adapter_config.json: lora_alpha must be a positive number, got None"),
    (dict(alpha=0), r"adapter_config.json: lora_alpha must be a positive number, got 0"),
    (dict(alpha='{"lora_alpha": "8"}'), r"lora_alpha must be a positive number, got '8'"),
])
def test_sample_refuses_a_damaged_lora_folder_before_generating(tmp_path, monkeypatch, damage, msg):
    import sample
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("generated from a damaged checkpoint"))
    folder = lora_folder(str(tmp_path / "ckpt-000001"), **damage)
    with pytest.raises(SystemExit, match=msg):
        sample.main(["--prompt", "a", "--frames", "3", "--lora", folder, "--out", str(tmp_path / "v.mp4"), "--device", "cpu"])
    assert not (tmp_path / "v.mp4").exists()


# ------------------------------------------------------------------ torch and safetensors files, read as data
def test_torch_files_read_as_data_with_clear_errors(tmp_path):
    import files
    legacy = {"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(41))}
    torch.save(legacy, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert_same_tree(files.read_torch(str(tmp_path / "legacy.pt"), mmap=True), legacy)  # the old format still loads
    torch.save({"generator": CodeInPickle()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt holds code \(posix.system\), not only tensors: refused") as err:
        files.read_torch(str(tmp_path / "evil.pt"))
    assert "weights_only" not in str(err.value)  # never invite the user to switch the safety off
    (tmp_path / "junk.pt").write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="junk.pt: damaged or not a torch checkpoint"):
        files.read_torch(str(tmp_path / "junk.pt"))
    save_file({"a": torch.randn(4)}, tmp_path / "t.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "t.safetensors").read_bytes()[:20])
    with pytest.raises(ValueError, match="cut.safetensors: damaged or not a safetensors file"):
        files.read_safetensors(str(tmp_path / "cut.safetensors"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors: no such file"):
        files.read_safetensors(str(tmp_path / "missing.safetensors"))


# ------------------------------------------------------------------ the reward models' checkpoints
def legacy(sd):
    """Today's keys -> the transformers-4.45 layout the checkpoints were saved in (inverse of the remap)."""
    out = {}
    for k, v in sd.items():
        out[k.replace("model.visual.", "visual.", 1) if k.startswith("model.visual.")
            else k.replace("model.language_model.", "model.", 1) if k.startswith("model.language_model.") else k] = v
    return out


def test_hpsv3_checkpoint_remap(hps, tok, tmp_path):
    sd = legacy({k: v.clone() for k, v in hps.state_dict().items()})
    assert "visual.merger.mlp.2.weight" in sd and "model.layers.0.self_attn.q_proj.weight" in sd and "rm_head.5.weight" in sd
    sd["lm_head.weight"] = torch.randn(len(tok), 32)
    save_file(sd, tmp_path / "HPSv3.safetensors")
    loaded = load_hpsv3(tmp_path / "HPSv3.safetensors", tokenizer=tok, config=tiny_config(tok), pixels=PIXELS)
    frames = video(1, 3, seed=17)
    torch.testing.assert_close(loaded.score(frames, ["a cat"]), hps.score(frames, ["a cat"]))
    sd["model.layers.0.mlp.upp_proj.weight"] = sd.pop("model.layers.0.mlp.up_proj.weight")
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="upp_proj"):
        load_hpsv3(tmp_path / "bad.safetensors", tokenizer=tok, config=tiny_config(tok), pixels=PIXELS)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_hpsv3(tmp_path / "missing.safetensors", tokenizer=tok, config=tiny_config(tok))


LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def videoreward_folder(root, va, tok, form):
    """A VideoReward folder like KwaiVGI/VideoReward's (full) or a training checkpoint (LoRA form), plus
    the scores a correctly merged model must give: base weights + (alpha / r) * B @ A, alpha 8, r 4."""
    g = torch.Generator().manual_seed(23)
    base = {k: v.clone() for k, v in va.state_dict().items()}
    merged, peft = dict(base), {}
    for k, w in base.items():
        if k.startswith("model.language_model.layers.") and k.split(".")[-2] in LORA and k.endswith("weight"):
            a, b = torch.randn(4, w.shape[1], generator=g), torch.randn(w.shape[0], 4, generator=g) * 0.1
            merged[k] = w + 2.0 * b @ a
            stem = "base_model.model." + legacy({k[:-len(".weight")]: 0}).popitem()[0]
            peft[f"{stem}.lora_A.default.weight"], peft[f"{stem}.lora_B.default.weight"] = a, b
    meta = {"data_config": {"prompt_template_type": "detailed_special", "fps": 2.0, "max_frame_pixels": 200704},
            "model_config": {"reward_token": "special", "output_dim": 1},
            "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8, "use_rslora": False},
            "inference_config": NORM}
    ckpt = root / "checkpoint-20"
    (root / "checkpoint-3").mkdir(parents=True)  # an older step, to be ignored
    ckpt.mkdir()
    (root / "model_config.json").write_text(json.dumps(meta))
    plain = legacy(base)
    plain["lm_head.weight"] = plain["model.embed_tokens.weight"]
    if form == "full":  # PeftModel.state_dict(): base_layer for wrapped Linears
        full = {"base_model.model." + (k.replace(f".{k.split('.')[-2]}.", f".{k.split('.')[-2]}.base_layer.")
                                       if k.split(".")[-2] in LORA and k.startswith("model.layers.") else k): v
                for k, v in plain.items()}
        torch.save({**full, **peft}, ckpt / "model.pth")
    else:
        basedir = root / "Qwen2-VL-2B-Instruct"
        basedir.mkdir()
        hub = {k: (torch.randn_like(v) if k.startswith("visual.") else v) for k, v in plain.items()}  # untrained ViT
        hub["model.embed_tokens.weight"] = torch.cat([plain["model.embed_tokens.weight"], torch.randn(5, 32)])
        save_file({k: v.contiguous() for k, v in hub.items() if k != "lm_head.weight"}, basedir / "model.safetensors")
        torch.save({"base_model.model." + k: v for k, v in plain.items() if k.startswith(("visual.", "rm_head."))},
                   ckpt / "non_lora_state_dict.pth")
        save_file({k.replace(".default.", "."): v for k, v in peft.items()}, ckpt / "adapter_model.safetensors")
    want = VideoAlign(tiny_config(tok), nn.Linear(32, 1, bias=False), tok, (128 * 28 * 28, 200704), norm=NORM, fps=2.0)
    want.load_state_dict(merged)
    return want.eval()


@pytest.mark.parametrize("form", ["full", "lora"])
def test_videoalign_checkpoint_forms(va, tok, tmp_path, form):
    want = videoreward_folder(tmp_path, va, tok, form)
    base = tmp_path / "Qwen2-VL-2B-Instruct" if form == "lora" else None
    got = load_videoalign(tmp_path, tokenizer=tok, base=base, config=tiny_config(tok))
    frames = video(2, 5, 40, 40, seed=29)
    for axis, gray in (("MQ", True), ("TA", False)):
        torch.testing.assert_close(got.score(frames, ["a", "b"], axis, gray), want.score(frames, ["a", "b"], axis, gray))
    if form == "lora":
        with pytest.raises(FileNotFoundError, match="videoalign_base"):
            load_videoalign(tmp_path, tokenizer=tok, config=tiny_config(tok))
    else:
        sd = torch.load(tmp_path / "checkpoint-20" / "model.pth")
        sd.pop(next(k for k in sd if k.endswith("q_proj.lora_B.default.weight")))
        torch.save(sd, tmp_path / "checkpoint-20" / "model.pth")
        with pytest.raises(KeyError, match="q_proj.lora_B"):
            load_videoalign(tmp_path, tokenizer=tok, config=tiny_config(tok))
