"""The ``mind`` command line: one command per pipeline stage.

    mind --help
    mind prepare --help
"""

from __future__ import annotations

import logging
import os

import typer

from stages import models, prepare
from stages import generate
from stages import filter as filter_stage
from stages import distill
from stages import analyze, evaluate, report
from stages.cli import command

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


if __name__ == "__main__":
    app()
