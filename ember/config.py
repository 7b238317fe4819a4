"""Configuration: dataclasses <-> YAML <-> command line.

Precedence, in one sentence: dataclass defaults < the YAML file given with `--config FILE`
< `--a.b=value` flags on the command line.

* YAML is read with a `yaml.SafeLoader` (no code, no Python objects; a key given twice is an error) and converted *strictly*: an unknown key or a value of the
  wrong type is a `ConfigError` naming the file and the dotted key (with a "did you mean").
* The command line is parsed by `tyro`, which gives dotted flags (`--train.lr=1e-3`, hyphens or
  underscores), help from the dataclasses' attribute docstrings and typo suggestions.
* `to_dict` / `save_yaml` write the resolved config; every checkpoint carries it.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from ember.errors import EmberError
from ember.fileio import atomic_write_text

T = TypeVar("T")


class ConfigError(EmberError, ValueError):
    """A config file or flag that does not fit its dataclass; the message names the key."""


# ---------------------------------------------------------------------------- dict -> dataclass
def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # Optional[X]: X's own error (e.g. an unknown nested key) is the useful one
            return _convert(value, arms[0], key)
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arm, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"key '{key}': expected one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"key '{key}': expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"key '{key}': expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a plain dict, strictly (unknown keys and wrong types raise)."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
        kwargs[key] = _convert(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        msg = str(e)
        where = prefix.rstrip(".") or cls.__name__
        raise ConfigError(msg if msg.startswith(where + ".") else f"{where}: {msg}") from None


# ---------------------------------------------------------------------------- derived override dataclasses
def attribute_docs(cls: type) -> dict[str, str]:
    """{field: the docstring written under it} of a dataclass (the convention every ember config follows)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def overrides_of(cls: type, name: str, doc: str) -> type:
    """A dataclass with every field of dataclass `cls` as Optional[...] = None ("keep the base value"),
    documented with `cls`'s own attribute docstrings; nested dataclass fields become nested overrides.
    So every field of `cls` is reachable from the command line, and documented once (in `cls`)."""
    from typing_extensions import Annotated, Doc

    hints, docs = get_type_hints(cls), attribute_docs(cls)
    fields = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in (Union, types.UnionType) else [tp]
        help_text = docs.get(f.name, "") + " (unset = the base value)"
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            sub = overrides_of(inner[0], f"{inner[0].__name__}Overrides", inner[0].__doc__ or "")
            fields.append((f.name, Annotated[sub, Doc(help_text)], dataclasses.field(default_factory=sub)))
        else:
            fields.append((f.name, Annotated[Optional[tp], Doc(help_text)], dataclasses.field(default=None)))
    out = dataclasses.make_dataclass(name, fields)
    out.__doc__ = doc
    out.__module__ = cls.__module__
    return out


def set_overrides(overrides: Any) -> dict:
    """The fields an overrides dataclass sets, as a (nested) dict; unset fields and empty nests left out."""
    out = {}
    for f in dataclasses.fields(overrides):
        v = getattr(overrides, f.name)
        if dataclasses.is_dataclass(v):
            v = set_overrides(v) or None
        if v is not None:
            out[f.name] = v
    return out


def to_dict(obj: Any) -> dict:
    """A resolved config as plain dicts/lists (YAML/JSON-safe)."""
    return dataclasses.asdict(obj)


def replace(obj: T, **changes: Any) -> T:
    return dataclasses.replace(obj, **changes)


# ---------------------------------------------------------------------------- YAML
class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no code, no Python objects) that refuses a key given twice in one mapping."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key '{key}' is given twice (first on line "
                              f"{seen[key]}); the later one would silently win. HINT: keep one")
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_yaml(path: str | Path, cls: type[T]) -> T:
    """Read a YAML run file into `cls`; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_yaml(obj: Any, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


# ---------------------------------------------------------------------------- command line
def _bool_keys(cls: type, prefix: str = "") -> set[str]:
    """Dotted names of every bool field (for `--flag=true` -> `--flag`)."""
    out = set()
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if tp is bool:
            out.add(prefix + f.name)
        elif dataclasses.is_dataclass(tp):
            out |= _bool_keys(tp, prefix + f.name + ".")
    return out


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _normalize_bools(argv: list[str], bools: set[str]) -> list[str]:
    """tyro spells booleans as `--x` / `--no-x`; also accept `--x=true|false`."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            name, value = arg[2:].split("=", 1)
            key = name.replace("-", "_")
            if key in bools and value.lower() in _TRUE | _FALSE:
                head, _, leaf = name.rpartition(".")
                arg = f"--{name}" if value.lower() in _TRUE else f"--{head + '.' if head else ''}no-{leaf}"
        out.append(arg)
    return out


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    path, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file: --config configs/NAME.yaml")
            path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return path, rest


def parse(cls: type[T], argv: list[str] | None = None, prog: str = "ember", description: str | None = None) -> T:
    """defaults < YAML (`--config FILE`) < `--a.b=value` flags -> an instance of `cls`."""
    import tyro  # imported here: it is only needed on the command line

    argv = list(sys.argv[1:] if argv is None else argv)
    path, rest = _split_config_flag(argv)
    base = load_yaml(path, cls) if path else cls()
    rest = _normalize_bools(rest, _bool_keys(cls))
    desc = (description or cls.__doc__ or "").strip()
    if desc:
        desc += "\n\nPrecedence: defaults < --config FILE (YAML) < --a.b=value flags."
    try:
        return tyro.cli(cls, args=rest, default=base, prog=prog, description=desc)
    except ValueError as e:  # a __post_init__ check of a config dataclass (the message names the field)
        raise ConfigError(str(e)) from None
