"""The ``mind`` command line: one command per pipeline stage.

    mind --help
    mind prepare --help
"""

from __future__ import annotations

import difflib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import io

import typer
from ruamel.yaml import YAML

from pipeline.config import ConfigError, from_dict
from pipeline.shards import atomic_write_text
from stages import analyze, distill, evaluate, generate, models, prepare, report
from stages import filter as filter_stage
from stages.cli import command, fail, parse_yaml, read_params, section_of

CONFIGS: dict[str, type] = {
    "models": models.ModelsConfig, "prepare": prepare.PrepareConfig, "generate": generate.GenerateConfig,
    "filter": filter_stage.FilterConfig, "distill": distill.DistillConfig, "evaluate": evaluate.EvaluateConfig,
    "report": report.ReportConfig, "analyze": analyze.AnalyzeConfig,
}


def validate_params(params: dict[str, Any], source: str) -> dict[str, Any]:
    """The config of every section of a whole params mapping: section -> config object.

    Raises ConfigError for a section no stage reads (a typo such as ``evalute:`` would
    otherwise be kept and silently ignored; the message suggests the closest stage), for a
    section that is not a mapping, and for a bad key or value in a known one. Every stage
    runs this on the whole file at start, and ``mind params`` on the merged result.
    """
    unknown = [name for name in params if name not in CONFIGS]
    if unknown:
        named = []
        for name in unknown:
            close = difflib.get_close_matches(str(name), list(CONFIGS), n=1)
            named.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(f"{source}: unknown section {', '.join(named)}; the stages are {sorted(CONFIGS)}")
    configs = {name: from_dict(CONFIGS[name], section_of(params, name, source), name) for name in params}
    if "distill" in configs:
        distill.check_injected_arm(configs["distill"], source)
    return configs


app = typer.Typer(
    help="MIND: capability-aware multi-perspective CoT distillation, one command per stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    # SIGTERM (timeout, a job scheduler) becomes SystemExit, so `finally` blocks shut vLLM's
    # engine processes down instead of leaving them orphaned and holding the cores.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _register(name: str, module: Any) -> None:
    app.command(name, help=module.__doc__)(command(CONFIGS[name], name, module.run, validate_params))


for _name, _module in {"models": models, "prepare": prepare, "generate": generate, "filter": filter_stage,
                       "distill": distill, "evaluate": evaluate, "report": report, "analyze": analyze}.items():
    _register(_name, _module)


@app.command("params")
def params_override(
    override: Path = typer.Argument(..., help="YAML params override, e.g. configs/paper.yaml"),
    params: Path = typer.Option(Path("params.yaml"), help="params file to update in place"),
) -> None:
    """Merge a params override (e.g. configs/paper.yaml) into params.yaml: mappings merge key by
    key, lists and scalars replace. The result is validated against every stage's config first.

        mind params configs/paper.yaml
    """
    try:
        read_params(params)  # each file on its own first: errors name the file that has them
        read_params(override, "params override")
        text = merged_text(params.read_text(encoding="utf-8"), override.read_text(encoding="utf-8"))
        # What is validated is the very text that will be written.
        validate_params(parse_yaml(text, str(override)) or {}, str(override))
        atomic_write_text(params, text)
    except (ValueError, OSError) as e:
        fail("params", e)
    logging.getLogger("mind").info("merged %s into %s", override, params)


def _round_trip() -> YAML:
    """A YAML reader/writer that keeps comments, key order, quoting and flow style, laid out
    like params.yaml (two-space mappings, list items indented under their key)."""
    rt = YAML()  # round-trip mode
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.width = 4096  # never re-wrap a long line or comment
    rt.preserve_quotes = True
    # ruamel writes a null as an empty value; params.yaml spells it out.
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return rt


def merged_text(params_text: str, override_text: str) -> str:
    """``params_text`` with ``override_text`` merged in (mappings key by key, lists and scalars
    replaced: ``pipeline.config.deep_merge``'s rule), as YAML text that
    keeps both files' comments: only the keys the override sets change. Both texts must
    already have passed ``read_params`` (valid YAML mappings without duplicate keys)."""
    rt = _round_trip()
    base = rt.load(params_text)
    extra = rt.load(override_text)
    if base is None:
        base = extra
    elif extra is not None:
        _merge_into(base, extra)
    buf = io.StringIO()
    if base is not None:
        rt.dump(base, buf)
    return buf.getvalue()


def _merge_into(base: Any, override: Any) -> None:
    """``deep_merge`` in place on round-trip mappings: the override's own nodes replace the
    base's, key by key, and a comment on an overriding line replaces the base line's (which
    explained the old value)."""
    for key, value in override.items():
        if key in base and isinstance(base[key], dict) and isinstance(value, dict):
            _merge_into(base[key], value)
            continue
        base[key] = value
        _take_line_comment(base, override, key)


def _take_line_comment(base: Any, override: Any, key: Any) -> None:
    """The override's end-of-line comment on ``key`` replaces the base's; the blank lines and
    comment lines that follow the base's line (ruamel keeps them in the same token) stay."""
    theirs = override.ca.items.get(key, [None] * 4)[2]
    if theirs is None or not theirs.value.lstrip(" ").startswith("#"):
        return
    comment = theirs.value.split("\n", 1)[0]
    ours = base.ca.items.get(key, [None] * 4)[2]
    if ours is None:
        rest = "\n"
    elif ours.value.lstrip(" ").startswith("#"):
        rest = "\n" + ours.value.split("\n", 1)[1]
    else:  # no comment of its own: the token is the line's end and the blank lines after it
        rest = ours.value.lstrip(" ")
    theirs.value = comment + rest  # the override's token keeps the override's column
    base.ca.items.setdefault(key, [None] * 4)[2] = theirs


if __name__ == "__main__":
    app()
