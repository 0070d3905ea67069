"""Strict construction of frozen config dataclasses from dicts, YAML and `key=value` overrides.

Shared by the ETL and the trainer: unknown keys are errors, nested dataclasses
and tuples are rebuilt from plain YAML/JSON values, and `a.b=1` overrides are
parsed as YAML scalars.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml


def from_dict(cls, data: dict[str, Any] | None, path: str = ""):
    """Builds dataclass ``cls`` from ``data``; unknown keys raise ValueError."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config keys at {path or cls.__name__}: {unknown} (known: {sorted(names)})")
    kwargs = {k: _coerce(hints[k], v, f"{path}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp, value, path):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(non_none[0], value, path)
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"config {path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path + ".")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        elem = args[0] if args else Any
        return tuple(_coerce(elem, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config {path}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(vt, v, f"{path}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ValueError(f"config {path}: expected int, got {value!r}")
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        if tp is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"config {path}: expected {tp.__name__}, got {value!r}")
    return value


def to_dict(cfg) -> dict[str, Any]:
    """Plain dict (tuples as lists) of a config dataclass, for YAML/JSON."""
    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dataclasses.asdict(cfg))


def parse_overrides(items) -> dict[str, Any]:
    """Turns ``["a.b=1", "c=x"]`` into ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merges ``update`` into a copy of ``base``."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    return data
