"""The ``mind`` command line: one command per pipeline stage.

    mind --help
    mind prepare --help
"""

from __future__ import annotations

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
from stages.cli import command

CONFIGS: dict[str, type] = {
    "models": models.ModelsConfig, "prepare": prepare.PrepareConfig, "generate": generate.GenerateConfig,
    "filter": filter_stage.FilterConfig, "distill": distill.DistillConfig, "evaluate": evaluate.EvaluateConfig,
    "report": report.ReportConfig, "analyze": analyze.AnalyzeConfig,
}


def validate_params(params: dict[str, Any], source: str) -> dict[str, Any]:
    """Every stage's config built from a whole params mapping: section -> config object.

    Raises ConfigError for a section no stage reads (a typo such as ``evalute:`` would
    otherwise be kept and silently ignored) as well as for a bad key or value in a known one.
    """
    unknown = sorted(set(params) - set(CONFIGS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; the stages are {sorted(CONFIGS)}")
    return {section: from_dict(cls, params.get(section) or {}, section) for section, cls in CONFIGS.items()}


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


app.command("models", help=models.__doc__)(command(models.ModelsConfig, "models", models.run))
app.command("prepare", help=prepare.__doc__)(command(prepare.PrepareConfig, "prepare", prepare.run))
app.command("generate", help=generate.__doc__)(command(generate.GenerateConfig, "generate", generate.run))
app.command("filter", help=filter_stage.__doc__)(command(filter_stage.FilterConfig, "filter", filter_stage.run))
app.command("distill", help=distill.__doc__)(command(distill.DistillConfig, "distill", distill.run))
app.command("evaluate", help=evaluate.__doc__)(command(evaluate.EvaluateConfig, "evaluate", evaluate.run))
app.command("report", help=report.__doc__)(command(report.ReportConfig, "report", report.run))
app.command("analyze", help=analyze.__doc__)(command(analyze.AnalyzeConfig, "analyze", analyze.run))


@app.command("params")
def params_override(
    override: Path = typer.Argument(..., help="YAML params override, e.g. configs/paper.yaml"),
    params: Path = typer.Option(Path("params.yaml"), help="params file to update in place"),
) -> None:
    """Merge a params override (e.g. configs/paper.yaml) into params.yaml: mappings merge key by
    key, lists and scalars replace. The result is validated against every stage's config first.

        mind params configs/paper.yaml
    """
    merged = deep_merge(yaml.safe_load(params.read_text()) or {}, yaml.safe_load(override.read_text()) or {})
    try:
        validate_params(merged, str(override))
    except ConfigError as e:
        logging.getLogger("mind").error("%s: %s", override, e)
        raise SystemExit(2) from None
    atomic_write_text(params, yaml.safe_dump(merged, sort_keys=False, allow_unicode=True))
    logging.getLogger("mind").info("merged %s into %s", override, params)


if __name__ == "__main__":
    app()
