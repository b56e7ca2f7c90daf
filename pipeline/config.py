"""Typed configs: build a stage's dataclass from a plain dict, strictly.

Each stage's parameters are a small dataclass that validates itself in ``__post_init__``.
``from_dict`` builds one from a ``params.yaml`` section (nested dataclasses and lists of
them included) and names any unknown key, so a typo in params fails loudly instead of
silently using a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class InputError(ValueError):
    """Bad input (a parameter, a data row, a stage folder): the message names where, and the
    command line prints it as one line with exit code 2 instead of a traceback."""


class ConfigError(InputError):
    """A parameter is unknown, of the wrong type, or out of range."""


SHOWN_CHARS = 80


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for a message, cut to about ``limit`` characters: a 50 MB field or
    parameter must not be repeated in full in a one-line error."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value):,} chars)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} chars)"


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {shown(value)} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {kind_of(value)}")
        inner = args[0] if args else Any
        out = [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {kind_of(value)}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {described(value)}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {shown(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {shown(value)}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {shown(value)}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {shown(value)}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {shown(value)}") from None
        # .inf or .nan would pass every range check written as a comparison that nan fails
        # silently or inf satisfies (a learning rate > 0, a temperature >= 0).
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {shown(value)}")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {described(value)}")
        return str(value)
    if tp is Path:
        if not isinstance(value, (str, Path)) or not str(value):
            raise ConfigError(f"{where}: expected a path, got {described(value)}")
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    prefix = f"{where}." if where else ""
    if unknown:
        # A flat key for a nested field (``ta_heads`` for ``ta: {heads: ...}``, the shape of an
        # older params file) points at the nested key, not at the nearest spelling of this level.
        nested = {f"{n}_{sub.name}": f"{n}.{sub.name}" for n in sorted(names)
                  if dataclasses.is_dataclass(hints[n]) for sub in dataclasses.fields(hints[n]) if sub.init}
        close = {k: [nested.get(c, c) for c in difflib.get_close_matches(str(k), sorted(names) + sorted(nested), n=1)]
                 for k in unknown}
        hint = "".join(f"; did you mean '{c[0]}' for '{k}'?" for k, c in close.items() if c)
        raise ConfigError(
            f"{where or cls.__name__}: unknown parameter(s) {unknown}{hint}; known: {sorted(names)}"
        )
    kwargs = {k: _convert(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def to_dict(obj: Any) -> Any:
    """A JSON-ready dict of a (nested) dataclass; Paths become strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def described(value: Any) -> str:
    """A value for a message: "null", or its kind and (cut) text: "a string: 'abc'"."""
    return "null" if value is None else f"{kind_of(value)}: {shown(value)}"


def kind_of(value: Any) -> str:
    """A value's type in the words of YAML/JSON (for messages): 'a list', 'a number', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def check(condition: bool, message: str) -> None:
    """Validation helper for ``__post_init__``: raise ConfigError(message) unless condition."""
    if not condition:
        raise ConfigError(message)


def deep_merge(base: Any, override: Any) -> Any:
    """``override`` over ``base``: mappings merge recursively; lists and scalars replace."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = deep_merge(base[key], value) if key in base else value
        return out
    return override
