"""The ``mind`` command line: one command per pipeline stage.

    mind --help
    mind prepare --help
"""

from __future__ import annotations

import difflib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import typer
import yaml

from pipeline.config import ConfigError, deep_merge, from_dict
from pipeline.shards import atomic_write_text
from stages import analyze, distill, evaluate, generate, models, prepare, report
from stages import filter as filter_stage
from stages.cli import command, read_params, section_of

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
    return {name: from_dict(CONFIGS[name], section_of(params, name, source), name) for name in params}


# vLLM on a CPU host keeps one core for itself unless told otherwise; on a 2-core machine
# that halves throughput. Harmless on GPU hosts.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

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
    log = logging.getLogger("mind")
    try:
        merged = deep_merge(read_params(params), read_params(override, "params override"))
        validate_params(merged, str(override))
    except ConfigError as e:
        log.error("params: %s", e)
        raise SystemExit(2) from None
    atomic_write_text(params, yaml.safe_dump(merged, sort_keys=False, allow_unicode=True))
    log.info("merged %s into %s", override, params)


if __name__ == "__main__":
    app()
