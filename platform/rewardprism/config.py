"""One way to describe a job: a YAML file of dataclass fields, plus dotted `key.sub=value` overrides.

Every recipe, sweep and the demo reads its config through `load_config`: unknown fields, wrong types and bad
values fail at once with the dotted name of the field (`ConfigError`), before any work or cluster starts. The
dataclasses check their own values in `__post_init__`, naming their own fields; `from_dict` adds the section.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration value, with the dotted name of its field so the user can find it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """A YAML file (or none: the defaults) plus `key.sub=value` overrides (values parsed as YAML) → a validated
    dataclass `cls`."""
    data = read_config_file(path) if path is not None else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--override", f"expected key.sub=value, got {item!r}")
        set_field(data, key, yaml.safe_load(value))
    return from_dict(cls, data, "")


def set_field(data: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted `key` in a nested mapping, creating the sections on the way."""
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(key, f"{part} is not a section")
    node[leaf] = value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds; a missing, unreadable or malformed file is an error on --config."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of fields, got {type(data).__name__}")
    return data


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass `cls` from a mapping, checking names and types against its annotations."""
    if not isinstance(data, dict):
        raise ConfigError(where or "config", f"must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(name, f"unknown field; {cls.__name__} has {', '.join(names)}")
        kwargs[key] = _check_type(hints[key], value, name)
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # the dataclass names its own field; add the section
        raise ConfigError(f"{where}.{exc.field}" if where else exc.field, exc.message) from None


def _check_type(hint: Any, value: Any, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, name)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _check_type(next(a for a in args if a is not type(None)), value, name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(name, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(name, f"must be a list, got {value!r}")
        return [_check_type(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(name, f"must be a mapping, got {value!r}")
        return {_check_type(args[0], k, name): _check_type(args[1], v, f"{name}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(name, f"must be {getattr(hint, '__name__', hint)}, got {value!r}")


def output_path(value: str, name: str) -> Path:
    """An output folder as an absolute path. Under `ray job submit --working-dir .` a job runs in Ray's temporary
    copy of that folder, which is deleted with the job: a relative output path there is refused, naming the field,
    instead of writing results that vanish."""
    path = Path(value).expanduser()
    if not path.is_absolute() and "runtime_resources" in Path.cwd().parts:
        raise ConfigError(name, f"{value} is relative, and this job runs in Ray's temporary copy of its working "
                                f"directory ({Path.cwd()}), deleted with the job: give an absolute path (e.g. "
                                "~/rewardprism-runs/... or a volume every node mounts)")
    return path.resolve()
