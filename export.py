"""Export a train.py checkpoint to the formats other inference code reads:

    python export.py out/ckpt-000400 --to longlive --out exported/longlive       # LongLive inference.py
    python export.py out/ckpt-000400 --to self_forcing --out exported/sf         # Self-Forcing inference.py
    python export.py out/ckpt-000400 --to diffusers --out exported/transformer   # WanTransformer3DModel folder

longlive: for a LoRA trained on LongLive's base (base .pt + its lora.pt), one lora.pt under `generator_lora` in
LongLive's key layout that carries LongLive's adapter and the trained one side by side (rank r_LongLive + r, scale
1: the base + lora.pt LongLive loads is exactly the trained policy), and longlive.yaml with the rank and alpha
LongLive's config reads. On any other base, the merged generator as model.pt (LongLive loads it with no adapter).
self_forcing: the merged generator as `model.`-prefixed original-Wan keys, model.pt (under generator and
generator_ema) and model.safetensors. diffusers: the merged transformer, save_pretrained.
Each writes MODEL_CARD.md beside the weights. --which old|ref exports theta_old or theta_ref instead of theta.
"""
import argparse
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import sys

import torch

import checkpoints
from config import PRESETS, Config
from files import read_json, read_torch

FORMATS = ("longlive", "self_forcing", "diffusers")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("checkpoint", help="a ckpt-NNNNNN folder written by train.py")
p.add_argument("--to", required=True, help="longlive, self_forcing or diffusers")
p.add_argument("--out", required=True, help="folder to create (must not exist)")
p.add_argument("--which", default="theta", help="theta (the trained policy, default), old or ref")
p.add_argument("--dtype", default="bfloat16", help="bfloat16 (as the upstream checkpoints, default) or float32")


def read_run(path):
    """The checkpoint's training config, step and LoRA settings; every problem is one SystemExit line, before
    any weight is read."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, checkpoints.STATE)):
        raise SystemExit(f"error: {path} is not a train.py checkpoint folder (a ckpt-NNNNNN folder with state.pt)")
    state = read_torch(os.path.join(path, checkpoints.STATE))
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or "step" not in state:
        raise SystemExit(f"error: {path}/state.pt is not a train.py checkpoint state (no config or step)")
    lora = os.path.isfile(os.path.join(path, checkpoints.ADAPTER_CONFIG))
    if not lora and not os.path.isfile(os.path.join(path, checkpoints.THETA_FILES[False])):
        raise SystemExit(f"error: {path} holds neither {checkpoints.ADAPTER_CONFIG} nor {checkpoints.THETA_FILES[False]}")
    cfg = state["config"]
    for key in ("model", "checkpoint", "base_lora"):  # the base the policy was trained on must be where it was
        if cfg.get(key) and not os.path.exists(cfg[key]):
            raise SystemExit(f"error: the base {key} {cfg[key]} this checkpoint was trained on does not exist")
    alpha = read_json(os.path.join(path, checkpoints.ADAPTER_CONFIG)).get("lora_alpha") if lora else None
    return cfg, state["step"], lora, alpha


def check_args(a):
    if a.to not in FORMATS:
        raise SystemExit(f"error: --to {a.to!r} is not a format; choose from {', '.join(FORMATS)}")
    if a.which not in ("theta", "old", "ref"):
        raise SystemExit(f"error: --which {a.which!r}: choose theta, old or ref")
    if a.dtype not in DTYPES:
        raise SystemExit(f"error: --dtype {a.dtype!r}: choose from {', '.join(DTYPES)}")
    if os.path.exists(a.out):
        raise SystemExit(f"error: --out {a.out} exists; give a new folder")
    parent = os.path.dirname(os.path.abspath(a.out))  # created with --out when missing (the README's exported/)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise SystemExit(f"error: cannot create --out {a.out} ({parent} is not a writable folder)")
    cfg, step, lora, alpha = read_run(a.checkpoint)
    if a.to == "longlive" and not lora:
        raise SystemExit(f"error: {a.checkpoint} is a full fine-tuning checkpoint (lora_rank=0), LongLive's lora.pt "
                         f"needs a LoRA; --to self_forcing writes the whole generator, which LongLive loads too")
    return cfg, step, lora, alpha


def merged(a, cfg):
    """The policy as one transformer: the base as train.py built it (fp32, so the merge is exact) with the
    checkpoint folded in."""
    tr = checkpoints.load_transformer(cfg.get("model"), cfg.get("checkpoint"), cfg.get("checkpoint_key"), cfg.get("base_lora"),
                            cfg.get("base_lora_alpha"), dtype=torch.float32)
    return checkpoints.load_trained(tr, a.checkpoint, a.which)


def original_layout(sd, dtype):
    """diffusers names -> `model.`-prefixed original-Wan keys (the generator wrapper Self-Forcing and LongLive load)."""
    return {f"model.{checkpoints.diffusers_to_wan(k)}": v.to(dtype).contiguous() for k, v in sd.items()}


def longlive_lora(a, cfg, alpha, dtype):
    """LongLive's adapter and the trained one as one PEFT LoRA: A = [A_LongLive; A], B = [s_LongLive B_LongLive, s B],
    rank r_LongLive + r at scale 1, so B A = both updates exactly. s_LongLive = base_lora_alpha / r_LongLive, the
    scale train.py merged LongLive's adapter at (1 when the run left base_lora_alpha at None: alpha = r), s = the
    trained adapter's alpha / r. Keys as LongLive's get_peft_model_state_dict writes them:
    base_model.model.<original-Wan module>.lora_A/lora_B.weight."""
    from files import read_safetensors
    name = checkpoints.THETA_FILES[True] if a.which == "theta" else checkpoints.TRAINED_FILES[a.which]
    pairs = {}
    trained = read_safetensors(os.path.join(a.checkpoint, name))
    for src, a_src in ((checkpoints.read_checkpoint(cfg["base_lora"]), cfg.get("base_lora_alpha")), (trained, alpha)):
        part = {}
        for k, v in src.items():
            m = re.match(r"(.*)\.lora_([AB])(\.[^.]+)?\.weight$", k)
            if not m:
                raise SystemExit(f"error: {k!r} is not a LoRA key")
            module = checkpoints.wan_to_diffusers(m.group(1) + ".weight")[:-len(".weight")]
            part.setdefault(module, {})[m.group(2)] = v.float()
        rank = next(iter(part.values()))["A"].shape[0]
        s = (a_src or rank) / rank  # alpha None: alpha = r, as checkpoints.merge_lora merges the base LoRA
        for module, ab in part.items():
            pairs.setdefault(module, []).append((ab["A"], s * ab["B"], rank))
    ranks = [sum(r for _, _, r in parts) for parts in pairs.values()]
    full = max(ranks)
    out = {}
    for module, parts in pairs.items():  # a module only one adapter touches: zero rows/columns for the other
        (A0, B0, _), pad = parts[0], full - sum(r for *_, r in parts)
        A = torch.cat([A for A, _, _ in parts] + [A0.new_zeros(pad, A0.shape[1])])
        B = torch.cat([B for _, B, _ in parts] + [B0.new_zeros(B0.shape[0], pad)], 1)
        key = "base_model.model." + checkpoints.diffusers_to_wan(module + ".weight")[:-len(".weight")]
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = A.to(dtype).contiguous(), B.to(dtype).contiguous()
    return out, full


def write_weights(a, cfg, lora, alpha, tmp):
    """The weights of format a.to under tmp; returns the lines the model card says about loading them."""
    dtype = DTYPES[a.dtype]
    out = os.path.abspath(a.out)
    if a.to == "longlive" and lora and cfg.get("base_lora"):
        sd, rank = longlive_lora(a, cfg, alpha, dtype)
        torch.save({"generator_lora": sd}, os.path.join(tmp, "lora.pt"))
        yaml = (f"generator_ckpt: {os.path.abspath(cfg['checkpoint'])}\nlora_ckpt: {out}/lora.pt\n"
                f"use_ema: {str(cfg.get('checkpoint_key') == 'generator_ema').lower()}\n"
                f"adapter:\n  type: lora\n  rank: {rank}\n  alpha: {rank}\n  dropout: 0.0\n")
        with open(os.path.join(tmp, "longlive.yaml"), "w") as f:
            f.write(yaml)
        return [f"`lora.pt`: PEFT LoRA under `generator_lora`, rank {rank}, alpha {rank} (LongLive's adapter and the "
                f"trained one side by side), on the base `{cfg['checkpoint']}`; `longlive.yaml` holds the entries "
                f"to put in LongLive's inference config"]
    tr = merged(a, cfg)
    if a.to == "diffusers":
        tr.to(dtype).save_pretrained(tmp)
        return ["a diffusers `WanTransformer3DModel` folder: `WanTransformer3DModel.from_pretrained` loads it"]
    wan = original_layout(tr.state_dict(), dtype)
    torch.save({"generator": wan, "generator_ema": wan}, os.path.join(tmp, "model.pt"))  # one storage, two names
    if a.to == "longlive":
        with open(os.path.join(tmp, "longlive.yaml"), "w") as f:
            f.write(f"generator_ckpt: {out}/model.pt\nlora_ckpt: null\nuse_ema: false\nadapter: null\n")
        return ["`model.pt`: the merged generator (not trained as a LoRA on LongLive's base, so no LongLive lora.pt); "
                "`longlive.yaml` loads it with no adapter"]
    from safetensors.torch import save_file
    save_file(wan, os.path.join(tmp, "model.safetensors"))
    return ["`model.pt` (under `generator` and `generator_ema`) and `model.safetensors`: the merged generator, "
            "`model.`-prefixed original-Wan keys"]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def last_eval(ckpt, step):
    """The last held-out evaluation row at or before the checkpoint's step in the run's log.jsonl (None if none)."""
    path, row = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "log.jsonl"), None
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if isinstance(r, dict) and r.get("step", step + 1) <= step and "eval/composite" in r:
                    row = r
    return row


def model_card(a, argv, cfg, step, lora, alpha, loading):
    gen = ("model", "checkpoint", "checkpoint_key", "base_lora")
    preset = next((name for name, p in PRESETS.items() if name != "tiny" and all(p.get(k) == cfg.get(k) for k in gen)),
                  "tiny" if cfg.get("model") is None else "none (custom generator)")
    defaults = dataclasses.asdict(Config())
    train_cmd = "python train.py " + " ".join(shlex.quote(f"--{k}={v}") for k, v in cfg.items() if k in defaults
                                              and v != defaults[k] and k not in ("resume", "overwrite"))
    lines = [f"# {a.to} export of {a.checkpoint}", "",
             f"- policy: {a.which} ({'LoRA r=%d alpha=%s' % (cfg.get('lora_rank'), alpha) if lora else 'full fine-tuning'}), "
             f"step {step} of {cfg.get('steps')}, exported as {a.dtype}",
             f"- generator preset: {preset}"]
    for key in ("model", "checkpoint", "base_lora"):
        path = cfg.get(key)
        if path:
            lines.append(f"- base {key}: `{path}`" + (f", sha256 {sha256(path)}" if os.path.isfile(path) else ""))
    if cfg.get("model") is None:
        lines.append("- base: the built-in tiny model (random seeded weights)")
    lines += [f"- rewards and weights: `{cfg.get('reward')}`", *(f"- weights: {x}" for x in loading), ""]
    row = last_eval(a.checkpoint, step)
    if row is None:
        lines.append("No held-out evaluation at or before this step in the run's log.jsonl.")
    else:
        lines += [f"Held-out evaluation at step {row['step']} (mean +/- s.e.; paired change since step 0 +/- s.e.):", "",
                  "| reward | mean | s.e. | change | s.e. |", "| --- | --- | --- | --- | --- |"]
        for k in sorted(x[len("eval/"):-len("_se")] for x in row if x.startswith("eval/") and x.endswith("_se")
                        and not x.endswith("_delta_se")):
            lines.append(f"| {k} | {row[f'eval/{k}']:.4f} | {row[f'eval/{k}_se']:.4f} | "
                         f"{row.get(f'eval/{k}_delta', float('nan')):+.4f} | {row.get(f'eval/{k}_delta_se', float('nan')):.4f} |")
    lines += ["", "Made by:", "", "    " + " ".join(shlex.quote(x) for x in ["python", "export.py", *argv]),
              "", "Trained by (every setting that differs from config.py's defaults):", "", "    " + train_cmd, ""]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    cfg, step, lora, alpha = check_args(a)
    tmp = os.path.abspath(a.out) + ".tmp"  # renamed when complete: a crash never leaves a half export at --out
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        loading = write_weights(a, cfg, lora, alpha, tmp)
        with open(os.path.join(tmp, "MODEL_CARD.md"), "w") as f:
            f.write(model_card(a, argv, cfg, step, lora, alpha, loading))
    except (ValueError, KeyError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"error: {e}") from None
    os.replace(tmp, a.out)
    print(f"wrote {a.out}: {', '.join(sorted(os.listdir(a.out)))}")


if __name__ == "__main__":
    main()
