"""ember.config: precedence defaults < YAML < `--a.b=value`, flag spellings, strict YAML errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from ember.config import ConfigError, from_dict, load_yaml, parse, save_yaml, to_dict
from ember.errors import EmberError
from ember.models import ModelConfig, RopeScaling


@dataclass
class Optim:
    """Optimizer settings."""

    lr: float = 3e-4
    """Peak learning rate."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""


@dataclass
class Train:
    """Training settings."""

    steps: int = 100
    """Optimizer steps."""
    compile: bool = False
    """torch.compile the model."""
    optim: Optim = field(default_factory=Optim)
    """The optimizer."""


@dataclass
class Cfg:
    """A small recipe config for the tests."""

    name: str = "run"
    """Run name."""
    seed: Optional[int] = None
    """Random seed; None = random."""
    verbose: bool = True
    """Log more."""
    mode: Literal["fast", "slow"] = "fast"
    """A choice."""
    tags: list[str] = field(default_factory=list)
    """Free-form tags."""
    train: Train = field(default_factory=Train)
    """Training."""


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# -------------------------------------------------------------------------------------- precedence
def test_defaults():
    assert parse(Cfg, []) == Cfg()


def test_precedence_defaults_yaml_cli(tmp_path):
    path = write(tmp_path, "name: from-yaml\ntrain:\n  steps: 7\n  optim:\n    lr: 0.1\n")
    cfg = parse(Cfg, ["--config", str(path), "--train.optim.lr=0.5"])
    assert cfg.train.optim.lr == 0.5          # CLI beats YAML
    assert cfg.train.steps == 7               # YAML beats default
    assert cfg.name == "from-yaml"
    assert cfg.train.optim.warmup_steps == 10  # untouched default
    assert cfg.verbose is True


def test_config_equals_form_and_flag_order(tmp_path):
    path = write(tmp_path, "train:\n  steps: 7\n")
    a = parse(Cfg, [f"--config={path}", "--train.steps", "9"])
    b = parse(Cfg, ["--train.steps=9", "--config", str(path)])
    assert a.train.steps == b.train.steps == 9


@pytest.mark.parametrize("flag", ["--train.optim.warmup-steps=5", "--train.optim.warmup_steps=5",
                                  "--train.optim.warmup-steps", "--train.optim.warmup_steps"])
def test_hyphen_and_underscore_flags(flag):
    argv = [flag] if "=" in flag else [flag, "5"]
    assert parse(Cfg, argv).train.optim.warmup_steps == 5


def test_values_of_each_type():
    cfg = parse(Cfg, ["--seed=3", "--mode=slow", "--tags", "a", "b", "--train.optim.betas", "0.8", "0.9",
                      "--name", "x y"])
    assert (cfg.seed, cfg.mode, cfg.tags, cfg.train.optim.betas, cfg.name) == (3, "slow", ["a", "b"], (0.8, 0.9), "x y")


@pytest.mark.parametrize("argv,expected", [
    (["--train.compile"], True), (["--train.no-compile"], False), (["--train.compile=true"], True),
    (["--train.compile=false"], False), (["--train.compile=False"], False), (["--train.compile=1"], True),
    (["--train.compile=no"], False), ([], False),
])
def test_nested_bool_spellings(argv, expected):
    assert parse(Cfg, argv).train.compile is expected


@pytest.mark.parametrize("argv,expected", [
    (["--verbose"], True), (["--no-verbose"], False), (["--verbose=false"], False), (["--verbose=true"], True),
])
def test_top_level_bool_spellings(argv, expected):
    assert parse(Cfg, argv).verbose is expected


def test_cli_bool_beats_yaml_bool(tmp_path):
    path = write(tmp_path, "verbose: false\ntrain:\n  compile: true\n")
    cfg = parse(Cfg, ["--config", str(path)])
    assert (cfg.verbose, cfg.train.compile) == (False, True)
    cfg = parse(Cfg, ["--config", str(path), "--verbose", "--train.compile=false"])
    assert (cfg.verbose, cfg.train.compile) == (True, False)


# ------------------------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("argv", [["--nope=1"], ["--train.stepz=3"], ["--train.steps=ten"], ["--mode=medium"],
                                  ["positional"]])
def test_bad_cli_flag_exits_nonzero(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(Cfg, argv)
    assert e.value.code not in (0, None)


def test_help_exits_zero_and_shows_docstrings(capsys):
    with pytest.raises(SystemExit) as e:
        parse(Cfg, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--train.optim.lr" in out and "Peak learning rate" in out


def test_config_flag_without_file():
    with pytest.raises(ConfigError, match="--config needs a file"):
        parse(Cfg, ["--config"])


# ------------------------------------------------------------------------------------ YAML errors
def test_yaml_unknown_key_names_dotted_key_with_did_you_mean(tmp_path):
    path = write(tmp_path, "train:\n  optim:\n    lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        parse(Cfg, ["--config", str(path)])
    msg = str(e.value)
    assert "train.optim.lrr" in msg and "did you mean 'train.optim.lr'" in msg and str(path) in msg


def test_yaml_unknown_top_level_key_lists_known_keys(tmp_path):
    path = write(tmp_path, "zzz: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'zzz'.*known keys: name, seed"):
        load_yaml(path, Cfg)


@pytest.mark.parametrize("text,key", [
    ("train:\n  steps: ten\n", "train.steps"),
    ("train:\n  steps: 1.5\n", "train.steps"),
    ("train:\n  compile: 1\n", "train.compile"),
    ("verbose: 'yes'\n", "verbose"),
    ("mode: medium\n", "mode"),
    ("seed: abc\n", "seed"),
    ("tags: abc\n", "tags"),
    ("train: 3\n", "train"),
    ("train:\n  optim:\n    betas: [0.9, x]\n", "train.optim.betas[1]"),
])
def test_yaml_wrong_type_names_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_yaml(path, Cfg)
    msg = str(e.value)
    assert f"'{key}'" in msg and str(path) in msg


def test_yaml_ints_widen_to_float_and_null_for_optional(tmp_path):
    cfg = load_yaml(write(tmp_path, "seed: null\ntrain:\n  optim:\n    lr: 1\n"), Cfg)
    assert cfg.train.optim.lr == 1.0 and isinstance(cfg.train.optim.lr, float) and cfg.seed is None


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        parse(Cfg, ["--config", str(path)])
    assert str(path) in str(e.value)


def test_yaml_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(write(tmp_path, "- 1\n- 2\n"), Cfg)


def test_empty_yaml_is_defaults(tmp_path):
    assert load_yaml(write(tmp_path, ""), Cfg) == Cfg()


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        parse(Cfg, ["--config", str(tmp_path / "missing.yaml")])


def test_config_error_is_an_ember_error():
    assert issubclass(ConfigError, EmberError)


# ------------------------------------------------------------------------------------- round trip
def test_save_load_round_trip(tmp_path):
    cfg = Cfg(name="r", seed=5, verbose=False, mode="slow", tags=["x"],
              train=Train(steps=3, compile=True, optim=Optim(lr=0.01, warmup_steps=0, betas=(0.8, 0.99))))
    path = tmp_path / "sub" / "saved.yaml"
    save_yaml(cfg, path)
    assert load_yaml(path, Cfg) == cfg
    assert parse(Cfg, ["--config", str(path)]) == cfg
    assert from_dict(Cfg, to_dict(cfg)) == cfg
    assert not list(path.parent.glob(".*tmp"))  # atomic write left no temp file


def test_model_config_round_trips_through_yaml(tmp_path):
    """ModelConfig (with a nested Optional[RopeScaling]) goes through the same strict YAML path."""
    @dataclass
    class WithModel:
        model: ModelConfig = field(default_factory=ModelConfig)

    cfg = WithModel(ModelConfig(pos_emb="rope", mlp="swiglu", rope_scaling=RopeScaling(factor=4.0)))
    path = tmp_path / "m.yaml"
    save_yaml(cfg, path)
    back = load_yaml(path, WithModel)
    assert back == cfg and isinstance(back.model.rope_scaling, RopeScaling)
    with pytest.raises(ConfigError, match=r"model.rope_scaling.factr.*did you mean 'model.rope_scaling.factor'"):
        from_dict(WithModel, {"model": {"rope_scaling": {"factr": 2.0}}})


def test_yaml_numeric_strings_for_floats_and_duplicate_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  optim:\n    lr: 1e-3\n    betas: [9e-1, 0.95]\n")  # YAML 1.1: '1e-3' is a string
    cfg = load_yaml(path, Cfg)
    assert cfg.train.optim.lr == 1e-3 and cfg.train.optim.betas == (0.9, 0.95)
    path.write_text("train:\n  optim:\n    lr: fast\n")
    with pytest.raises(ConfigError, match="train.optim.lr.*expected float"):
        load_yaml(path, Cfg)
    path.write_text("train:\n  steps: 5\n  compile: true\n  steps: 7\n")
    with pytest.raises(ConfigError, match=r"c.yaml: line 4: key 'steps' is given twice \(first on line 2\)"):
        load_yaml(path, Cfg)
    path.write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(path, Cfg)
