"""The `ember` command line, run as a user runs it (a subprocess), plus every recipe's --help."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ember import cli
from ember.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def ember_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "ember"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("ember")
    return [found] if found else [sys.executable, "-m", "ember"]


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*ember_cmd(), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_help_lists_every_command():
    for argv in (["--help"], []):
        r = run(*argv)
        assert r.returncode == 0, r.stderr
        for words, (_, summary) in COMMANDS.items():
            assert " ".join(words) in r.stdout and summary in r.stdout


def test_python_dash_m_ember():
    r = subprocess.run([sys.executable, "-m", "ember", "--version"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("ember ")


def test_unknown_command_exits_2_with_usage():
    r = run("frobnicate")
    assert r.returncode == 2
    assert "unknown command 'frobnicate'" in r.stderr and "usage: ember" in r.stderr
    assert "Traceback" not in r.stderr


def test_model_info_gpt2():
    r = run("model", "info", "gpt2")
    assert r.returncode == 0, r.stderr
    assert "124.48M" in r.stdout and "124,475,904" in r.stdout
    for word in ("non-embedding", "FLOPs per token", "seq_len 1024", "gradients", "adamw moments", "bf16",
                 "fp32 master weights", "Activations excluded"):
        assert word in r.stdout, word


def test_model_info_llama_70b_json():
    r = run("model", "info", "llama-3-70b", "--json", "--seq-len", "4096")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert abs(out["params"]["total"] / 70.55e9 - 1) < 1e-3
    assert out["flops_per_token"]["seq_len"] == 4096
    assert out["memory_bytes"]["fp32"]["total"] == 16 * out["params"]["total"]


def test_model_info_unknown_preset_is_one_line_error():
    r = run("model", "info", "gtp2")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "gtp2" in lines[0] and "did you mean 'gpt2'" in lines[0]


def test_bad_flag_exits_2(capsys):  # in-process: the subprocess path is the same cli.main
    assert cli.main(["model", "info", "tiny", "--seq-lenn", "3"]) == 2  # tyro's SystemExit becomes the exit code
    assert "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------------------------ every recipe's --help
EXISTING = [words for words, (mod, _) in COMMANDS.items() if importlib.util.find_spec(mod) is not None]


@pytest.mark.parametrize("words", EXISTING, ids=lambda w: " ".join(w))
def test_recipe_help_and_defaults(words, capsys):
    module = importlib.import_module(COMMANDS[words][0])
    assert (module.__doc__ or "").strip(), "the module docstring is the command's --help description"
    assert dataclasses.is_dataclass(module.Config) and callable(module.main)
    module.Config()  # the defaults construct (the CLI starts from them)
    assert cli.main([*words, "--help"]) == 0
    assert "usage: ember " + " ".join(words) in capsys.readouterr().out


def test_every_command_module_is_a_recipe():
    for words, (mod, summary) in COMMANDS.items():
        assert mod.startswith("ember.recipes.") and summary


def test_group_words_suggest_their_subcommands(capsys):
    assert cli.main(["model"]) == 2
    assert "expected one of: ember model info" in capsys.readouterr().err
    assert cli.main(["data", "prep"]) == 2
    assert "'prep'; expected one of: ember data prepare" in capsys.readouterr().err
    assert cli.main(["pretrian"]) == 2
    assert "did you mean 'pretrain'" in capsys.readouterr().err
