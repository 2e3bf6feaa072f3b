"""Every file the README's commands write is ignored by git (git's own matcher on the paths the README names, with
what each command writes inside its output folder), and the repository's own files are not."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRITES = {  # script: files it writes inside its --out / --out_dir folder
    "train": ["log.jsonl", "log.png", "latest", "run.lock", "ckpt-000100/adapter_config.json", "ckpt-000100/state.pt",
              "ckpt-000100.tmp/adapter_model.safetensors", "samples/scores_step00000.csv",
              "samples/step00000_prompt0.mp4", "tensorboard/events.out.tfevents.1.host",
              "wandb/offline-run-20261206_000000-abc/files/output.log", "wandb/astrolabe-run-id"],
    "evaluate": ["scores.csv", "summary.md", "grid.png"],
    "export": ["MODEL_CARD.md", "longlive.yaml", "lora.pt", "model.safetensors", "config.json",
               "diffusion_pytorch_model.safetensors"],
    "sample": ["000-a-red-fox.mp4", ".tmp-123-000-a-red-fox.mp4"],
}


def ignored(paths):
    """The subset of `paths` (relative to the repository root) that .gitignore ignores, by git check-ignore."""
    done = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, input="\n".join(paths),
                          capture_output=True, text=True)
    if done.returncode not in (0, 1):  # 1: none ignored; 128: not a work tree
        pytest.skip(f"git check-ignore failed: {done.stderr.strip()}")
    return set(done.stdout.split())


def readme_outputs():
    """(script, output) for the --out / --out_dir of each README command, and the defaults of those commands."""
    text = re.sub(r"\\\n\s*", " ", open(os.path.join(ROOT, "README.md")).read())  # continued command lines joined
    found = re.findall(r"python (train|sample|evaluate|export)\.py [^\n]*?--(?:out|out_dir)[ =]([^\s`]+)", text)
    return sorted(set(found) | {("train", "out"), ("evaluate", "eval"), ("sample", "video.mp4"), ("sample", "videos")})


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_every_output_the_readme_writes_is_ignored_and_the_sources_are_not():
    outputs = readme_outputs()
    assert {("export", "exported/longlive"), ("export", "exported/transformer"), ("evaluate", "eval/"),
            ("train", "out-rand"), ("sample", "fox.mp4"), ("sample", "videos/")} <= set(outputs)
    want = [out if out.endswith(".mp4") else f"{out.rstrip('/')}/{name}" for script, out in outputs
            for name in WRITES[script]]
    want += ["out.old-20261206-120000/log.jsonl",  # --overwrite's moved-aside run
             "checkpoints/Wan2.1-T2V-1.3B-Diffusers/model_index.json", "checkpoints/VideoReward/model_config.json",
             "wandb/settings"]  # the weights the presets read; `wandb offline`
    assert sorted(set(want) - ignored(want)) == []
    sources = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert "checkpoints.py" in sources and sorted(ignored(sources)) == []
