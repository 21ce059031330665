"""Generic checks of params.yaml's values: type conversion, range rules and their one-line error texts.

Plumbing, not a DVC dep (see dvc.yaml): nothing here decides a number. A valid value passes through unchanged (an
integer where a number is expected becomes the same float); an invalid one raises ParamsError. What the params
are, their defaults and how they combine live in moola.params, which every stage lists as a dep.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal, Mapping

from moola.errors import ParamsError

PARAMS_FILE = "params.yaml"


def did_you_mean(key: Any, known: list[str]) -> str:
    """'did you mean 'seed'? ' for a typo'd key (`seeed`), or nothing."""
    import difflib

    close = difflib.get_close_matches(str(key), known, n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    bad = ParamsError(f"{PARAMS_FILE}: {key} must be {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is list:
        if not isinstance(value, list) or not value:
            raise ParamsError(f"{PARAMS_FILE}: {key} must be a non-empty list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise bad
        return {str(k): convert(v, item_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise bad
        return value
    if tp is Any or tp is dict:
        return value
    raise TypeError(f"unsupported params type {tp}")


def apply_rules(value: Any, rules: dict, key: str) -> None:
    if rules.get("positive") and not value > 0:
        raise ParamsError(f"{PARAMS_FILE}: {key} must be greater than 0, got {value!r}")
    if "min" in rules and value < rules["min"]:
        raise ParamsError(f"{PARAMS_FILE}: {key} must be at least {rules['min']}, got {value!r}")
    if "max" in rules and value > rules["max"]:
        raise ParamsError(f"{PARAMS_FILE}: {key} must be at most {rules['max']}, got {value!r}")


def build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{PARAMS_FILE}: {where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise ParamsError(
                f"{PARAMS_FILE}: unknown key '{dotted}' ({did_you_mean(key, list(fields))}expected one of: "
                f"{', '.join(fields)})"
            )
    values = {}
    for name, f in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamsError(f"{PARAMS_FILE}: missing key '{dotted}' ({type_name(hints[name])} expected)")
            continue
        value = convert(raw[name], hints[name], dotted)
        apply_rules(value, f.metadata.get("rules", {}), dotted)
        values[name] = value
    return cls(**values)
