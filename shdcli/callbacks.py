"""The public seam of the training loop: callbacks that `train.run_distillation` calls as a run goes.

The progress display, the run log and the trackers (shdcli/trackers.py) and the benchmarks attach here
instead of patching train.py. A callback is any object with these five methods; subclass `Callback` to
implement only the ones you need. The loop calls them in this order:

    on_start(recipe, state)        the run is set up (models loaded, output_dir claimed, a resumed
                                   run's state restored): state.step is the step it continues from
    on_validation(state, record)   the step-0 validation (fresh runs only), then every train.eval_every
    on_step(state, record)         after every optimizer step (before that step's validation)
    on_end(metrics)                metrics.json's content, after the final evaluation and the outputs
    close()                        always, last, also when the run fails or is interrupted

`state` is read-only for callbacks (train.RunState; `LoopState` says what may be read). A `record` is a
dict of numbers: a step's {"step", every loss part, "grad_norm", "grad_norm_<part>" when measured, "lr",
"time_s", "tokens"} or a validation's {"step", "val_<part>", ...}, where a run with SHD adds one dict,
LAYER_KL: {student layer (as text): the KL of its maps to their squeezed targets}.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from shdcli.recipe import Recipe

LAYER_KL = "attention_kl_by_layer"  # a validation record's per-layer attention fidelity (see above)


class WeightSummary(Protocol):
    def summary(self) -> dict[str, list[dict]]:
        """Squeeze weights so far: {student layer: [{"mean": [...], "std": [...], "samples": n} per group]}."""
        ...


class LoopState(Protocol):
    """What a callback may read of the loop's state (train.RunState)."""

    step: int  # optimizer steps done
    tokens_seen: int
    train_s: float  # training seconds over every process of the run (a resumed run continues the count)
    history: list[dict]  # every step's record, as metrics.json keeps it
    validation: list[dict]
    stats: WeightSummary


class Callback:
    """No-op base: override what you need. Any object with these methods works (duck typing)."""

    def on_start(self, recipe: Recipe, state: LoopState) -> None:
        pass

    def on_step(self, state: LoopState, record: dict) -> None:
        pass

    def on_validation(self, state: LoopState, record: dict) -> None:
        pass

    def on_end(self, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


class CallbackList(Callback):
    """Several callbacks called in order; close() reaches every one even if one fails."""

    def __init__(self, callbacks: Iterable[Callback]) -> None:
        self.callbacks = list(callbacks)

    def on_start(self, recipe: Recipe, state: LoopState) -> None:
        for cb in self.callbacks:
            cb.on_start(recipe, state)

    def on_step(self, state: LoopState, record: dict) -> None:
        for cb in self.callbacks:
            cb.on_step(state, record)

    def on_validation(self, state: LoopState, record: dict) -> None:
        for cb in self.callbacks:
            cb.on_validation(state, record)

    def on_end(self, metrics: dict) -> None:
        for cb in self.callbacks:
            cb.on_end(metrics)

    def close(self) -> None:
        failure: BaseException | None = None
        for cb in self.callbacks:
            try:
                cb.close()
            except Exception as exc:  # noqa: BLE001 - the others must still flush their files
                failure = failure or exc
        if failure is not None:
            raise failure
