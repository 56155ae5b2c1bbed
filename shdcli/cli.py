"""The `shd` command line: a thin Typer layer over train / heads / evaluate."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from shdcli.errors import ShdError

app = typer.Typer(
    name="shd",
    help="Squeezing-Heads Distillation: distil a Hugging Face transformer into a smaller one.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=False)
err_console = Console(stderr=True)

_DEBUG = False


def _offline() -> None:
    # Nothing may reach a model hub: every model and tokenizer comes from local folders.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    global _DEBUG
    _DEBUG = debug
    _offline()


@app.command()
def distill(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file (see recipes/).")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe value: section.key=value (repeatable).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in output_dir.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace what an earlier run wrote to output_dir.")
    ] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Allow pickled .bin/.pt weights (they can run code; trusted only).")
    ] = False,
) -> None:
    """Distil a teacher into a student with SHD + logit KD + task loss."""
    from shdcli import distributed
    from shdcli.recipe import load_recipe

    spec = load_recipe(recipe, set_ or [])  # before importing torch: recipe mistakes are reported at once
    if allow_pickle:
        spec.teacher.allow_pickle = spec.student.allow_pickle = True

    from shdcli.checkpoint import Interrupted
    from shdcli.train import run_distillation

    console.quiet = not distributed.env_info().is_main  # under torchrun only rank 0 talks
    try:
        metrics = run_distillation(spec, console, resume=resume, overwrite=overwrite)
    except Interrupted as stop:
        distributed.shutdown(clean=False)
        again = " ".join(["shd", "distill", shlex.quote(str(recipe)), *(f"--set {shlex.quote(s)}" for s in set_ or []),
                          *(["--allow-pickle"] if allow_pickle else []), "--resume"])
        err_console.print(escape(f"{stop}; continue with: {again}"), highlight=False, soft_wrap=True)
        sys.exit(stop.exit_code)
    except BaseException:
        distributed.shutdown(clean=False)  # no final barrier: the other ranks may never reach it
        raise
    distributed.shutdown()
    console.print(f"[green]student written to[/green] {metrics['student_dir']}")
    console.print(f"report: {Path(spec.output_dir) / 'report.md'}   metrics: {Path(spec.output_dir) / 'metrics.json'}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    _offline()
    debug = "--debug" in sys.argv
    try:
        app(standalone_mode=False)
    except ShdError as exc:
        if debug:
            raise
        one_line = " ".join(str(exc).split("\n"))
        err_console.print(f"[bold red]error:[/bold red] {escape(one_line)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        if debug:
            raise
        one_line = " ".join(str(exc).split("\n"))
        err_console.print(
            f"[bold red]error:[/bold red] {type(exc).__name__}: {escape(one_line)} (run with --debug for a traceback)",
            highlight=False, soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
