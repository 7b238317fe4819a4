"""Every YAML run file under configs/ parses into its recipe's Config (defaults < YAML, strictly).

Convention: configs/<command>/<name>.yaml, where <command> is the command's words joined by '_'
(configs/pretrain/fsdp2.yaml -> `ember pretrain`, configs/model_info/x.yaml -> `ember model info`),
mapped to the recipe module through ember.cli.COMMANDS. A YAML directly under configs/ names its
command in a first-line comment instead: `# ember pretrain`.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from ember.cli import COMMANDS
from ember.config import load_yaml, parse

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
BY_DIR = {"_".join(words): module for words, (module, _) in COMMANDS.items()}
BY_WORDS = {" ".join(words): module for words, (module, _) in COMMANDS.items()}


def yaml_files() -> list[Path]:
    return sorted(p for ext in ("*.yaml", "*.yml") for p in CONFIGS.rglob(ext)) if CONFIGS.is_dir() else []


def recipe_module(path: Path) -> str:
    """The recipe module a shipped YAML belongs to (by its folder, or a `# ember <command>` first line)."""
    rel = path.relative_to(CONFIGS)
    if len(rel.parts) > 1:
        if rel.parts[0] not in BY_DIR:
            pytest.fail(f"{path}: configs/{rel.parts[0]}/ is not a command; expected one of {sorted(BY_DIR)} "
                        "(configs/<command words joined by _>/<name>.yaml)")
        return BY_DIR[rel.parts[0]]
    first = path.read_text().splitlines()[:1]
    m = re.match(r"#\s*ember\s+([a-z_ -]+?)\s*$", first[0]) if first else None
    if not m or m.group(1) not in BY_WORDS:
        pytest.fail(f"{path}: cannot tell its command; move it to configs/<command>/ or start it with "
                    f"'# ember <command>' (commands: {sorted(BY_WORDS)})")
    return BY_WORDS[m.group(1)]


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_yaml_parses(path):
    module = importlib.import_module(recipe_module(path))  # must exist: a YAML for a missing recipe fails
    cfg = load_yaml(path, module.Config)
    assert dataclasses.is_dataclass(cfg)
    assert parse(module.Config, ["--config", str(path)]) == cfg  # through the real command-line path


def test_command_folders_map_to_commands():
    assert BY_DIR["pretrain"] == "ember.recipes.pretrain"
    assert BY_DIR["model_info"] == "ember.recipes.model_info"
    if CONFIGS.is_dir():
        for d in (p for p in CONFIGS.iterdir() if p.is_dir()):
            assert d.name in BY_DIR, f"configs/{d.name}/ is not a command folder; expected one of {sorted(BY_DIR)}"


def test_configs_are_collected():
    assert yaml_files(), "configs/ holds no YAML run file: the test above checked nothing"
