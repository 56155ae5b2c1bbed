"""The `shd` command line: a thin Typer layer over train / heads / evaluate / export / demo."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

from shdcli import offline

offline()  # before transformers is imported (by the modules below): nothing may reach a model hub

import click  # noqa: E402
import torch  # noqa: E402
import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402

from shdcli import compare as comparing  # noqa: E402
from shdcli import demo, distributed, evaluate, export, heads  # noqa: E402
from shdcli.checkpoint import Interrupted, left_after_interrupt  # noqa: E402
from shdcli.errors import ShdError  # noqa: E402
from shdcli.recipe import load_recipe  # noqa: E402
from shdcli.report import destination, probe_writable, write_failure, write_json_atomic  # noqa: E402
from shdcli.train import run_distillation  # noqa: E402

app = typer.Typer(
    name="shd",
    help="Squeezing-Heads Distillation: distil a Hugging Face transformer into a smaller one.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=False)
err_console = Console(stderr=True)

def _offline() -> None:
    from transformers.utils import logging as hf_logging  # third-party, lazy: `shd --help` needs none of it

    hf_logging.disable_progress_bar()


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    del debug  # main() reads --debug from sys.argv: it must know before typer parses (errors while parsing)
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
    spec = load_recipe(recipe, set_ or [])  # before any model is loaded: recipe mistakes are reported at once
    if allow_pickle:
        spec.teacher.allow_pickle = spec.student.allow_pickle = True
    console.quiet = not distributed.env_info().is_main  # under torchrun only rank 0 talks
    command = ["shd", "distill", shlex.quote(str(recipe)), *(f"--set {shlex.quote(s)}" for s in set_ or []),
               *(["--allow-pickle"] if allow_pickle else [])]
    try:
        metrics = run_distillation(spec, console, resume=resume, overwrite=overwrite)
    except Interrupted as stop:
        distributed.shutdown(clean=False)
        err_console.print(escape(f"{stop}; continue with: {' '.join([*command, '--resume'])}"), highlight=False,
                          soft_wrap=True)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        # Ctrl-C outside the loop's handler (setup, step-0 or final evaluation) or a second one inside it.
        distributed.shutdown(clean=False)
        left, resumable = left_after_interrupt(spec)
        again = [*command, "--resume"] if resumable else [*command, *(["--overwrite"] if overwrite else [])]
        if distributed.env_info().is_main:
            err_console.print(escape(f"stopped by SIGINT; {left}; {'continue' if resumable else 'start again'} "
                                     f"with: {' '.join(again)}"), highlight=False, soft_wrap=True)
        sys.exit(130)
    except BaseException:
        distributed.shutdown(clean=False)  # no final barrier: the other ranks may never reach it
        raise
    distributed.shutdown()
    console.print(f"[green]student written to[/green] {metrics['student_dir']}")
    console.print(f"report: {Path(spec.output_dir) / 'report.md'}   metrics: {Path(spec.output_dir) / 'metrics.json'}")


@app.command("inspect-heads")
def inspect_heads(
    model: Annotated[str, typer.Argument(help="HF model folder, .gguf file or pkg://package/path.")],
    data: Annotated[str | None, typer.Option(help="Text: .txt / .jsonl file, builtin:sentences (default) or "
                                             "builtin:pydoc; image classifiers: image folder, .npz or "
                                             "builtin:digits (default).")] = None,
    samples: Annotated[int, typer.Option(help="Samples (text sequences or images) to run the model on.")] = 32,
    heads_to: Annotated[
        int | None, typer.Option("--heads-to", help="Target head count K (default: half the heads, rounded up).")
    ] = None,
    tolerance: Annotated[
        float, typer.Option(help="Relative reconstruction error allowed when suggesting a layer's minimum heads.")
    ] = 0.3,
    grouping: Annotated[str, typer.Option(help="Head grouping: balanced, pairs or calibrated (groups chosen on "
                                          "half the samples, measured on the rest against contiguous ones).")] = (
        "balanced"
    ),
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sample (causal LMs: packed blocks).")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per forward pass.")] = 8,
    sample: Annotated[int, typer.Option(help="Which sample attention_layerL.png shows.")] = 0,
    plot_layers: Annotated[
        str | None, typer.Option("--plot-layers", help="Layers for attention_layerL.png, e.g. 0,5 (default: the "
                                 "most and least redundant).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for heads.json, heads.png, alphas.png, "
                                             "attention_layerL.png.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print heads.json to stdout, not tables.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    threads: Annotated[int, typer.Option(help="torch CPU threads; 0 = torch's default.")] = 0,
) -> None:
    """Show how alike each layer's attention heads are and what squeezing them to K heads loses."""
    options = heads.InspectOptions(data=data, samples=samples, seq_len=seq_len, batch_size=batch_size,
                                   target_heads=heads_to, tolerance=tolerance, grouping=grouping,
                                   sample_index=sample, device=_device(device))
    options.check()
    layers = _int_list(plot_layers, "--plot-layers")
    _check_out(out)
    _threads(threads)
    report = heads.run_inspect(model, options)
    note = None
    files: list[Path] = []
    if out is not None:
        with destination("--out", out):
            files, note = heads.write_outputs(report, out, layers)
    if json_:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")  # plain: rich could wrap it
    else:
        console.print(heads.heads_table(report))
        console.print(heads.heat_strip(report))
        if files:
            console.print("wrote " + ", ".join(str(f) for f in files))
        elif out is None:
            console.print("[dim]pass --out DIR to write heads.json and the plots[/dim]")
    if note:
        err_console.print(f"[yellow]note:[/yellow] {note}")


@app.command("eval")
def eval_(
    student: Annotated[list[str], typer.Argument(help="Student model folder(s) (HF folder, .gguf or pkg://).")],
    teacher: Annotated[
        str | None, typer.Option(help="Teacher to compare with (default: the one in the student's run "
                                 "metrics.json, if any).")
    ] = None,
    compare: Annotated[
        list[str] | None, typer.Option(help="More students for the same table (--compare A B or repeat it).")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Held-out text (default, and when it names the run's own data: the run's "
                                 "validation split; else builtin:sentences); text classifiers: labelled rows "
                                 "(a builtin corpus: its fixed held-out split); "
                                 "image classifiers: images (default: the run's data, held-out split).")
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON instead of a table.")] = False,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per sequence (encoders, attention, "
                                                "latency); perplexity window for causal LMs (default: the "
                                                "run's data.seq_len, else 128).")] = None,
    stride: Annotated[int | None, typer.Option(help="Perplexity window stride (default: half the window).")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Held-out tokens scored: perplexity; text "
                                                  "classifiers: held-out rows until they hold this many tokens "
                                                  "(default: the run's data.eval_tokens, else 4096).")] = None,
    samples: Annotated[int | None, typer.Option(help="Held-out sequences for embedding and attention metrics "
                                                "(default: the run's batch_size x val_batches, else 64).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Sequences per forward pass; encoders "
                                                   "compare similarities within a batch (default: the run's "
                                                   "data.batch_size, else 8).")] = None,
    similarity: Annotated[
        Path | None, typer.Option(help="Sentence-similarity TSV (sentence1<TAB>sentence2<TAB>score) for Spearman.")
    ] = None,
    speed: Annotated[bool, typer.Option("--speed/--no-speed", help="Measure CPU latency and throughput.")] = True,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON to this file (image classifiers: eval.json "
                                             "and confusion PNGs go to its folder too).")] = None,
    split: Annotated[str, typer.Option(help="Image classifiers: the images to score: val (the run's held-out "
                                       "split), train or all.")] = "val",
    threads: Annotated[int, typer.Option(help="torch CPU threads; 0 = torch's default.")] = 0,
) -> None:
    """Measure students: quality, attention fidelity to the teacher, size and CPU speed (image classifiers:
    top-1/top-5 accuracy, confusion matrix PNG, size, latency)."""
    _check_out(out)
    _threads(threads)
    names = [student[0], *(compare or []), *student[1:]]
    # Image classifiers (top-1/top-5, confusion PNG, size, latency) and DiTs (denoising, samples); None for text.
    result = evaluate.eval_command(names, teacher, data, out, batch_size or 64, split)
    is_image = result is not None
    if not is_image:
        options = evaluate.EvalOptions(seq_len=seq_len, stride=stride, max_tokens=max_tokens, samples=samples,
                                       batch_size=batch_size, speed=speed,
                                       similarity=str(similarity) if similarity else None,
                                       out_dir=str(out.parent) if out is not None else None)
        result = evaluate.run_eval(names, teacher, data, options, log=err_console.print)
    if out is not None:
        with destination("--out", out):
            write_json_atomic(out, result)
    if json_:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        console.print(evaluate.format_folder_eval(result) if is_image else evaluate.eval_table(result))
        for note in result["notes"]:
            console.print(f"[dim]note: {note}[/dim]")


@app.command("compare")
def compare_(
    runs: Annotated[list[Path], typer.Argument(help="Output folders of finished `shd distill` runs (same teacher).")],
    plot: Annotated[Path, typer.Option(help="PNG of the runs' validation curves, overlaid.")] = Path("shd-compare.png"),
    json_: Annotated[bool, typer.Option("--json", help="Print the table as JSON instead.")] = False,
) -> None:
    """Put runs side by side: the recipe keys that differ, final metrics, size and speed, and their
    validation curves in one plot."""
    result = comparing.compare_runs(runs)
    note = comparing.write_overlay(result, plot)
    if json_:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    else:
        console.print(comparing.comparison_table(result))
    if note:
        err_console.print(f"[yellow]note:[/yellow] no plot: {escape(note)}")
    else:
        err_console.print(f"validation curves: {plot}")


@app.command("export")
def export_(
    student: Annotated[Path, typer.Argument(help="Student folder written by `shd distill` (its student/).")],
    format_: Annotated[str, typer.Option("--format", help="gguf (llama.cpp, Ollama, LM Studio) or safetensors "
                                         "(the HF folder: transformers, vLLM, TGI).")] = "gguf",
    dtype: Annotated[str | None, typer.Option(help="GGUF weights: f32, f16 (default) or q8_0.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output file (default: STUDENT-DTYPE.gguf beside the "
                                             "folder) or folder for safetensors.")] = None,
) -> None:
    """Write the student for another runtime: one GGUF file for llama.cpp, or the HF safetensors folder."""
    _check_out(out)
    result = export.export(student, format_, dtype, out)
    if isinstance(result, Path):
        console.print(f"safetensors HF folder: {result}")
        return
    console.print(escape(export.describe(result)), highlight=False, soft_wrap=True)
    for note in result.notes:
        console.print(f"[dim]note: {escape(note)}[/dim]")


@app.command("make-demo-teacher")
def make_demo_teacher(
    kind: Annotated[str, typer.Argument(help="Which demo teacher: " + ", ".join(
        f"{k} ({v})" for k, v in demo.DEMO_TEACHERS.items()) + ".")],
    out: Annotated[Path, typer.Argument(help="Folder to write the teacher to (an HF folder).")],
    data: Annotated[str | None, typer.Option(help="vit-digits: images (builtin:digits, an image folder, .npz or a "
                                             "datasets folder); text-classifier: labelled rows (builtin:tweets, "
                                             "builtin:bbc-news, .jsonl / .csv with text and label).")] = None,
    hidden: Annotated[int | None, typer.Option(help="vit-digits, dit-digits: width (default 192, 96).")] = None,
    heads_: Annotated[int, typer.Option("--heads", help="vit-digits: attention heads per layer.")] = 12,
    layers: Annotated[int, typer.Option(help="vit-digits: transformer blocks.")] = 4,
    intermediate: Annotated[int, typer.Option(help="vit-digits: MLP width.")] = 384,
    image_size: Annotated[int, typer.Option("--image-size", help="vit-digits: input image side.")] = 16,
    patch_size: Annotated[int | None, typer.Option("--patch-size", help="vit-digits, dit-digits: patch side "
                                                   "(default 4, 2).")] = None,
    epochs: Annotated[int, typer.Option(help="vit-digits: passes over the training images.")] = 20,
    steps: Annotated[int | None, typer.Option(help="text-classifier, dit-digits: optimizer steps (default 300, "
                                              "3000).")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="text-classifier: tokens per row (longer rows are "
                                         "cut).")] = 64,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Rows per step (default 64 images, "
                                                   "16 texts).")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate (default 2e-3 vit-digits, 1e-4 "
                                             "text-classifier).")] = None,
    val_fraction: Annotated[float | None, typer.Option("--val-fraction", help="Rows held out, fixed split (default "
                                                       "0.25 images, 0.1 texts; text builtins: always 0.1).")] = None,
    eval_rows: Annotated[int | None, typer.Option("--eval-rows", help="text-classifier: score only the first N "
                                                  "held-out rows (a quick check; default: all).")] = None,
    seed: Annotated[int, typer.Option(help="Initialisation and data-order seed.")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads; 0 = torch's default.")] = 1,
) -> None:
    """Train a small demo teacher offline (vit-digits: a ViT image classifier on scikit-learn's digits;
    dit-digits: a class-conditional DiT generating the digits (--hidden, --heads, --layers, --patch-size,
    --steps); text-classifier: all-MiniLM-L6-v2 fine-tuned on labelled text, default tweet sentiment)."""
    if kind not in demo.DEMO_TEACHERS:
        raise ShdError(f"KIND: {kind!r} is not a demo teacher; choose one of {', '.join(demo.DEMO_TEACHERS)}")
    text, dit = kind == "text-classifier", kind == "dit-digits"
    batch_size = batch_size if batch_size is not None else (16 if text else 64)
    lr = lr if lr is not None else (1e-4 if text else 1e-3 if dit else 2e-3)
    steps = steps if steps is not None else (3000 if dit else 300)
    hidden = hidden if hidden is not None else (96 if dit else 192)
    patch_size = patch_size if patch_size is not None else (2 if dit else 4)
    val_fraction = val_fraction if val_fraction is not None else (0.1 if text else 0.25)
    if min(hidden, heads_, layers, intermediate, image_size, patch_size, epochs, steps, batch_size) < 1 or lr <= 0:
        raise ShdError("--hidden, --heads, --layers, --intermediate, --image-size, --patch-size, --epochs, --steps, "
                       "--batch-size and --lr must be positive")
    if eval_rows is not None and eval_rows < 1:
        raise ShdError(f"--eval-rows: {eval_rows} must be at least 1 (leave it out to score every held-out row)")
    if seq_len < 4:
        raise ShdError(f"--seq-len: {seq_len} leaves no room for text after [CLS] and [SEP]; give at least 4")
    if hidden % heads_:
        raise ShdError(f"--hidden: {hidden} is not divisible by --heads {heads_}; give a multiple of the heads")
    if image_size % patch_size and not dit:
        raise ShdError(f"--patch-size: {patch_size} does not divide --image-size {image_size}")
    if not 0 < val_fraction < 1:
        raise ShdError(f"--val-fraction: {val_fraction} must be between 0 and 1")
    _threads(threads)
    if dit:
        demo.make_dit_teacher(out, data or "builtin:digits", hidden, heads_, layers, patch_size, steps, batch_size,
                              lr, val_fraction, seed, 0, log=console.print)
        return
    if text:
        demo.make_text_classifier(out, data or "builtin:tweets", steps=steps, batch_size=batch_size, lr=lr,
                                  seq_len=seq_len, val_fraction=val_fraction, seed=seed, eval_rows=eval_rows,
                                  log=console.print)
        return
    demo.make_teacher(out, data or "builtin:digits", hidden, heads_, layers, intermediate, image_size, patch_size,
                      epochs, batch_size, lr, val_fraction, seed, 0, log=console.print)


def _int_list(text: str | None, field: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise ShdError(f"{field}: {text!r} is not a comma-separated list of layer numbers, e.g. 0,5") from None


def _check_out(out: Path | None) -> None:
    """--out must be writable before any model is loaded (a folder, a file or one to be made in its parent)."""
    if out is None:
        return
    code = probe_writable(out if out.is_dir() else out.parent)
    if code is not None:
        raise ShdError(write_failure("--out", out, code))


def _threads(n: int) -> None:
    # Many small tensor ops: on a busy machine fewer threads can be much faster than the default.
    if n < 0:
        raise ShdError("--threads: give 0 (torch's default) or a positive count")
    if n:
        torch.set_num_threads(n)


def _device(name: str) -> str:
    if name not in ("cpu", "cuda", "auto"):
        raise ShdError(f"--device: {name!r}; use cpu, cuda or auto")
    if name == "cuda" and not torch.cuda.is_available():
        raise ShdError("--device: cuda was asked for but no CUDA GPU is visible; use cpu")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    debug = "--debug" in sys.argv
    try:
        code = app(standalone_mode=False)
    except ShdError as exc:
        if debug:
            raise
        one_line = " ".join(str(exc).split("\n"))
        err_console.print(f"[bold red]error:[/bold red] {escape(one_line)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors and the like
        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Abort):
            _interrupted()
        if debug:
            raise
        one_line = " ".join(str(exc).split("\n"))
        err_console.print(
            f"[bold red]error:[/bold red] {type(exc).__name__}: {escape(one_line)} (run with --debug for a traceback)",
            highlight=False, soft_wrap=True,
        )
        sys.exit(1)
    # Under standalone_mode=False typer turns a KeyboardInterrupt in a command into a *returned* 130 (and an
    # explicit typer.Exit into its code): dropping it would make an interrupted command exit 0.
    if code == 130:
        _interrupted()
    if isinstance(code, int) and code:
        sys.exit(code)


def _interrupted() -> None:
    """Exit 130 with one line. Every output is written atomically (a temporary name, then a rename), so an
    interrupted command leaves no half-written file; `shd distill` says what it saved in its own handler."""
    err_console.print("stopped by SIGINT; no file was left half-written; run the command again", highlight=False)
    sys.exit(130)


if __name__ == "__main__":
    main()
