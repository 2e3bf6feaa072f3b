"""The shape of the house, read from the source: imports point down (the paper's mechanisms import no speed lever,
offloading, config or entry point; config imports nothing of the project; no module imports an entry script),
nothing reads sys.argv at import, and importing the trainer loads no Qwen2-VL code."""
import ast
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))} | {"bench"}
MECHANISMS = {"model", "kv_cache", "rollout", "loss", "rewards", "reward_models", "vae"}
ENTRIES = {"train", "sample", "evaluate", "export"}  # python FILE.py; bench (python -m bench) drives train's functions
NOT_BELOW_A_MECHANISM = {"fast", "fast_train", "offload", "config", "run", "logs", "policy", "evaluation"} | ENTRIES


def project_imports(source):
    """The project modules a source file imports, anywhere in it (a deferred import inside a function counts)."""
    names = set()
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.Import):
            names |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
            names.add(n.module.split(".")[0])
    return names & PROJECT


def wrong_arrows(sources):
    """[(importer, imported, why)] for each import against the layout, over {module name: source}."""
    bad = []
    for name, source in sources.items():
        for imported in project_imports(source) - {name}:
            if name in MECHANISMS and imported in NOT_BELOW_A_MECHANISM:
                bad.append((name, imported, "a mechanism imports machinery"))
            elif name == "config":
                bad.append((name, imported, "config is data"))
            elif imported in ENTRIES:
                bad.append((name, imported, "an entry script is imported"))
    return bad


def argv_at_import(source):
    """Lines where sys.argv is read outside any function or class (at import)."""
    lines = []
    for stmt in ast.parse(source).body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(stmt, ast.If) and "__main__" in ast.unparse(stmt.test):
            continue  # the script's own `if __name__ == "__main__":`
        lines += [n.lineno for n in ast.walk(stmt)
                  if isinstance(n, ast.Attribute) and n.attr == "argv" and ast.unparse(n.value) == "sys"]
    return lines


def sources(pattern):
    return {os.path.relpath(p, ROOT)[:-3].replace(os.sep, "."): open(p).read()
            for p in glob.glob(os.path.join(ROOT, pattern))}


def test_imports_point_down():
    root = {k: v for k, v in sources("*.py").items() if not k.startswith("test_")}
    assert set(MECHANISMS) <= set(root) and set(ENTRIES) <= set(root)
    assert wrong_arrows(root) == []
    # the checker itself catches each kind of wrong arrow (the test can fail)
    assert wrong_arrows({"model": "import fast", "config": "from rewards import parse_spec",
                         "evaluation": "import sample", "rollout": "from kv_cache import KVCache"}) == [
        ("model", "fast", "a mechanism imports machinery"), ("config", "rewards", "config is data"),
        ("evaluation", "sample", "an entry script is imported")]


def test_nothing_reads_the_command_line_at_import():
    found = {name: argv_at_import(s) for name, s in {**sources("*.py"), **sources("bench/*.py")}.items()}
    assert {k: v for k, v in found.items() if v} == {}
    assert argv_at_import("import sys\nFLAGS = sys.argv[1:]\n") == [2]
    assert argv_at_import("import sys\ndef main():\n    return sys.argv\nif __name__ == '__main__':\n    sys.argv\n") == []


def test_importing_the_trainer_loads_no_reward_model_code():
    code = ("import sys, policy, train, run; "
            "print(sorted(m for m in sys.modules if 'qwen2_vl' in m))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_every_command_lists_each_flag_with_its_meaning_and_default(capsys):
    """One dialect, documented where it is typed: train.py --help and python -m bench --help print every field of
    their dataclass as --key=default beside its comment; sample.py's and evaluate.py's flags each carry a help line
    (argparse prints the default beside it)."""
    import dataclasses

    import pytest

    import config
    import evaluate
    import sample
    from bench.common import Args, parse
    for show, cls in ((lambda: config.parse_config(["--help"]), config.Config), (lambda: parse(["--help"]), Args)):
        with pytest.raises(SystemExit) as done:
            show()
        out = capsys.readouterr().out
        assert done.value.code == 0
        for f in dataclasses.fields(cls):
            line = next((x for x in out.splitlines() if x.strip().startswith(f"--{f.name}={getattr(cls, f.name)}")), "")
            assert len(line.split(maxsplit=1)) == 2, f"--{f.name}: no default and meaning in\n{out}"
    for parser in (sample.p, evaluate.p):
        assert [a.option_strings for a in parser._actions if not a.help] == []
