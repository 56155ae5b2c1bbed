"""What a run shows while it trains: a live rich bar on a terminal, whole plain lines everywhere else.

A transient bar redrawn in place reads well on a terminal and as fragments (`300/… 0:28… 0:00:…`) in a
log file, under `| tee`, nohup or CI; so when the console is not a terminal the display prints one whole
line every train.log_every steps instead: step/max, loss parts, tokens/s, elapsed and ETA.
"""

from __future__ import annotations

from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from shdcli.callbacks import Callback, LoopState
from shdcli.recipe import Recipe


def fmt_losses(parts: dict) -> str:
    """`name=value` for every float of a record (the step key and non-numbers left out)."""
    return " ".join(f"{k}={v:.4g}" for k, v in parts.items() if k != "step" and isinstance(v, float))


def fmt_duration(seconds: float) -> str:
    return str(timedelta(seconds=round(max(seconds, 0.0))))


def shown_parts(record: dict, norms: dict[str, float]) -> dict:
    """A step record as the display shows it: loss parts and lr, then the last measured per-part gradient
    norms as gn_<part> (they are measured every train.grad_norms_every steps, kept in view between)."""
    keep = {k: v for k, v in record.items() if not k.startswith("grad_norm_") and k not in ("time_s", "tokens")}
    return {**keep, **norms}


def part_norms(record: dict) -> dict[str, float]:
    return {"gn_" + k[len("grad_norm_"):]: v for k, v in record.items() if k.startswith("grad_norm_")}


class ProgressDisplay(Callback):
    """The run's console output: validation lines, plus the bar (terminal) or plain lines (not a terminal)."""

    def __init__(self, console: Console, plain: bool | None = None) -> None:
        self.console = console
        self.plain = not console.is_terminal if plain is None else plain
        self.bar: Progress | None = None
        self.task_id = None
        self.norms: dict[str, float] = {}
        self.max_steps = self.log_every = 1
        self.start_step, self.train_s0 = 0, 0.0

    def on_start(self, recipe: Recipe, state: LoopState) -> None:
        self.max_steps, self.log_every = recipe.train.max_steps, recipe.train.log_every
        # This process's own pace (a resumed run's earlier steps ran elsewhere; setup is not training).
        self.start_step, self.train_s0 = state.step, state.train_s

    def _start_bar(self, state: LoopState) -> None:
        # Started at the first step, not in on_start: the step-0 validation prints before it.
        self.bar = Progress(
            TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[losses]}"),
            TextColumn("{task.fields[speed]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.bar.start()
        self.task_id = self.bar.add_task("distill", total=self.max_steps, completed=state.step - 1, losses="",
                                         speed="")

    def on_step(self, state: LoopState, record: dict) -> None:
        self.norms = part_norms(record) or self.norms
        losses = fmt_losses(shown_parts(record, self.norms))
        speed = state.tokens_seen / max(state.train_s, 1e-9)
        if not self.plain:
            if self.bar is None:
                self._start_bar(state)
            self.bar.update(self.task_id, advance=1, losses=losses, speed=f"{speed:.0f} tok/s")
            return
        step = state.step
        if step % self.log_every and step != self.max_steps and step != self.start_step + 1:
            return
        elapsed = state.train_s - self.train_s0
        eta = elapsed / max(step - self.start_step, 1) * (self.max_steps - step)
        self._print(f"step {step}/{self.max_steps} {losses} {speed:.0f} tok/s "
                    f"elapsed {fmt_duration(elapsed)} eta {fmt_duration(eta)}")

    def on_validation(self, state: LoopState, record: dict) -> None:
        self._print(f"validation at step {record['step']}: " + fmt_losses(record))

    def _print(self, line: str) -> None:
        # soft_wrap: one line however narrow the (non-)terminal; no markup or highlighting in loss names
        target = self.bar.console if self.bar is not None else self.console
        target.print(line, soft_wrap=True, markup=False, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
