"""Glue between ``params.yaml``, a stage's config dataclass and its typer command.

A stage declares its parameters once, as a dataclass whose fields carry a ``help`` text in
their metadata. ``command`` turns that dataclass into a typer command whose options are the
fields (``--help`` lists every one), reads ``params.yaml``, applies the options given on the
command line on top of the stage's section and validates every section of the file before
the stage runs. Errors (bad YAML, an unknown section or key, a bad value) are one logged
line naming the file or option, and exit code 2. Scalars are typed options; list and
mapping fields take YAML text (``--datasets '[{name: gsm8k, ...}]'``).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
import types
import typing
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

import typer
import yaml

from pipeline.config import ConfigError, deep_merge, kind_of, shown

C = TypeVar("C")
log = logging.getLogger("mind")


def _yaml_error(source: str, e: yaml.YAMLError) -> ConfigError:
    """One line naming the file (or option), line and column: PyYAML's own message spans
    several lines and, for text from the command line, names no source at all."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        context = f" ({e.context})" if e.context else ""
        return ConfigError(f"{source}: malformed YAML at line {mark.line + 1}, column {mark.column + 1}: "
                           f"{e.problem}{context}")
    return ConfigError(f"{source}: malformed YAML: {' '.join(str(e).split())}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: PyYAML
    keeps the last one silently, so a second ``seed:`` would quietly win over the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults" may be overridden by design
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # PyYAML's own construct_mapping reports an unhashable key
            if key in first:
                raise yaml.MarkedYAMLError(
                    problem=f"duplicate key {shown(key)} (first at line {first[key].start_mark.line + 1})",
                    problem_mark=key_node.start_mark)
            first[key] = key_node
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text (a file's, or a command-line option's) as data; errors name ``source``."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise _yaml_error(source, e) from None


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's data; a missing file, a non-UTF-8 byte or bad YAML is a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x})") from None
    return parse_yaml(text, str(path))


def read_params(path: Path, what: str = "params file") -> dict[str, Any]:
    """A whole params file: a mapping of stage sections (an empty file is an empty mapping)."""
    data = read_yaml(path, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of stage sections, got {kind_of(data)}")
    return data


def section_of(params: dict[str, Any], section: str, source: str) -> dict[str, Any]:
    """``params[section]`` as a mapping (absent or empty: {})."""
    value = params.get(section)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: section {section} must be a mapping, got {kind_of(value)}")
    return value


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


def command(
    cls: type[C], section: str, run: Callable[[C], Any], validate: Callable[[dict[str, Any], str], dict[str, Any]]
) -> Callable[..., None]:
    """A typer command for ``run(config)``, with one option per field of ``cls``.

    ``validate`` builds the config of every section of the params file (this stage's with
    the command-line options applied) and raises ConfigError for any bad one: a typo in
    another stage's section, or an unknown section, stops this stage too instead of being
    silently ignored."""
    hints = typing.get_type_hints(cls)
    params = [
        inspect.Parameter(
            "params",
            inspect.Parameter.KEYWORD_ONLY,
            default=Path("params.yaml"),
            annotation=typing.Annotated[Path, typer.Option(help="params file; every section is validated, this stage runs its own")],
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
                typing.Optional[str], typer.Option(help=f"{help_text} (YAML text; a mapping merges into the params file's)",
                                                    show_default=False)
            ]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann))

    def cmd(**kwargs: Any) -> None:
        params_path = kwargs.pop("params")
        try:
            overrides: dict[str, Any] = {}
            for name, value in kwargs.items():
                if value is None:
                    continue
                option = f"--{name.replace('_', '-')}"
                overrides[name] = value if _is_scalar(hints[name]) else parse_yaml(value, option)
            params = read_params(params_path)
            # An option's mapping merges into the file's key by key, as `mind params` does:
            # `--ta '{lr: 0.01}'` changes the TA's learning rate, not the whole TA.
            params = {**params, section: deep_merge(section_of(params, section, str(params_path)), overrides)}
            cfg = validate(params, str(params_path))[section]
            run(cfg)
        except (ValueError, OSError) as e:
            fail(section, e)

    cmd.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    cmd.__doc__ = inspect.getdoc(run)
    cmd.__name__ = section
    return cmd


def error_line(e: ValueError | OSError) -> str:
    """The one line a user sees for a bad input (``InputError`` and the other ValueErrors) or
    an expected operating-system failure: a folder where a file belongs, no permission, a
    read-only or full disk. An OSError is named by its path, not by its errno's repr."""
    if isinstance(e, OSError) and e.filename is not None:
        target = f" -> {e.filename2}" if e.filename2 is not None else ""
        return f"{e.filename}{target}: {e.strerror or e}"
    return " ".join(str(e).split())


def fail(section: str, e: ValueError | OSError) -> typing.NoReturn:
    """Log ``e`` as the command's one error line and exit with code 2."""
    log.error("%s: %s", section, error_line(e))
    sys.exit(2)


def field(default: Any = dataclasses.MISSING, *, help: str, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with a help text (shown by ``mind <stage> --help``)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})
