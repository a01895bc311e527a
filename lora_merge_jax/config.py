"""Typed, frozen configs read from YAML, with every bad key or value named in the error.

A config is a tree of frozen dataclasses. ``load_config(TrainConfig, "configs/x.yaml", ["optim.learning_rate=1e-4"])``
reads the YAML (following ``include:`` lists of other YAML files, relative to the including file, merged
underneath), applies ``--set key=value`` overrides (values parsed as YAML), and converts the result
field by field, checking types against the annotations. Unknown keys are refused with their full dotted
name and the closest known name, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A config value or key that cannot be accepted; the message names the file and key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not a valid {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, where): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            value = float(value)  # PyYAML (YAML 1.1) reads 1e-4 without a dot as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Builds dataclass ``cls`` from a mapping, refusing unknown keys and wrongly typed values.

    After conversion the dataclass's ``validate()`` method, if any, runs; its ValueErrors are reported
    with the key path.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}; known keys: {', '.join(fields)}")
    kwargs = {name: _convert(hints[name], data[name], prefix + name) for name in fields if name in data}
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a dataclass that checks itself on construction
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as e:
            raise ConfigError(f"{prefix}{e}" if not isinstance(e, ConfigError) else str(e)) from None
    return obj


def to_dict(cfg: Any) -> Any:
    """The plain (YAML-writable) form of a config: dataclasses to dicts, tuples to lists."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _deep_merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Reads a YAML mapping, resolving ``include:`` relative to the file.

    ``include`` is a path or a list of paths (merged at the top level, under this file's own keys), or a
    mapping ``{section: path}`` that puts a file's keys under ``section`` (``include: {data: data/x.yaml}``).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: include cycle")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if isinstance(includes, Mapping):  # {section: file}: the file's keys go under that section
        pairs = [(str(k), v) for k, v in includes.items()]
    else:
        pairs = [(None, v) for v in includes]
    merged: dict = {}
    for section, inc in pairs:
        content = read_yaml(path.parent / inc, _seen + (path.resolve(),))
        merged = _deep_merge(merged, {section: content} if section else content)
    return _deep_merge(merged, data)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Applies ``a.b.c=value`` overrides; the value is parsed as YAML (``1e-4``, ``[q_proj, v_proj]``, ``null``)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse {raw!r} ({e})") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, Mapping) else {}
            node = node[part]
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Reads ``cls`` from a YAML file (or its defaults when ``path`` is None) plus overrides.

    Example:
        >>> cfg = load_config(TrainConfig, "configs/lora_scitldr.yaml", ["train.steps=100"])
    """
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None
