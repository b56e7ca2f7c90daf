"""Glue between ``params.yaml``, a stage's config dataclass and its typer command.

A stage declares its parameters once, as a dataclass whose fields carry a ``help`` text in
their metadata. ``command`` turns that dataclass into a typer command whose options are the
fields (``--help`` lists every one), reads the stage's section of ``params.yaml`` and
applies the options given on the command line on top. Scalars are typed options; list and
mapping fields take YAML text (``--datasets '[{name: gsm8k, ...}]'``).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
import yaml

from pipeline.config import ConfigError, from_dict
from pipeline.shards import ShardError

C = TypeVar("C")
log = logging.getLogger("mind")


def load_section(params_path: Path, section: str) -> dict[str, Any]:
    if not params_path.exists():
        raise ConfigError(f"{params_path}: params file not found")
    data = yaml.safe_load(params_path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{params_path}: expected a mapping of stage sections")
    value = data.get(section) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{params_path}: section '{section}' must be a mapping")
    return value


def load_config(cls: type[C], section: str, params_path: Path, overrides: dict[str, Any] | None = None) -> C:
    """The stage config: ``params.yaml[section]`` with ``overrides`` applied on top."""
    data = dict(load_section(params_path, section))
    data.update(overrides or {})
    return from_dict(cls, data, section)


def _is_scalar(tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return len(args) == 1 and _is_scalar(args[0])
    if typing.get_origin(tp) is typing.Literal:
        return True
    return tp in (str, int, float, bool, Path)


def _option_type(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is typing.Literal:
        return str
    return tp


def command(cls: type[C], section: str, run: Callable[[C], Any]) -> Callable[..., None]:
    """A typer command for ``run(config)``, with one option per field of ``cls``."""
    hints = typing.get_type_hints(cls)
    params = [
        inspect.Parameter(
            "params",
            inspect.Parameter.KEYWORD_ONLY,
            default=Path("params.yaml"),
            annotation=typing.Annotated[Path, typer.Option(help="params file; this stage reads its own section")],
        )
    ]
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        help_text = f.metadata.get("help", "")
        if typing.get_origin(tp) is typing.Literal:
            help_text = help_text.rstrip(".") + f". One of: {', '.join(map(str, typing.get_args(tp)))}."
        if _is_scalar(tp):
            ann = typing.Annotated[typing.Optional[_option_type(tp)], typer.Option(help=help_text, show_default=False)]
        else:
            ann = typing.Annotated[
                typing.Optional[str], typer.Option(help=f"{help_text} (YAML text)", show_default=False)
            ]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann))

    def cmd(**kwargs: Any) -> None:
        params_path = kwargs.pop("params")
        overrides: dict[str, Any] = {}
        for name, value in kwargs.items():
            if value is None:
                continue
            overrides[name] = value if _is_scalar(hints[name]) else yaml.safe_load(value)
        try:
            cfg = load_config(cls, section, params_path, overrides)
            run(cfg)
        except (ConfigError, ShardError, FileNotFoundError, ValueError) as e:
            log.error("%s: %s", section, e)
            sys.exit(2)

    cmd.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    cmd.__doc__ = inspect.getdoc(run)
    cmd.__name__ = section
    return cmd


def field(default: Any = dataclasses.MISSING, *, help: str, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with a help text (shown by ``mind <stage> --help``)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})
