"""Where a run's numbers go while it trains: train.report_to picks trackers behind one small interface.

    jsonl        output_dir/logs/metrics.jsonl: one flushed JSON line per train.log_every steps and one per
                 validation (and a last "final" line), readable while the run goes on
    tensorboard  output_dir/logs/tensorboard (torch's SummaryWriter): scalars, squeeze-weight histograms,
                 per-layer attention KL (a curve per student layer, their spread as a histogram)
    mlflow       output_dir/logs/mlflow.db (a local sqlite store; `mlflow ui --backend-store-uri sqlite:///...`)
    wandb        output_dir/logs/wandb, offline (`wandb sync` uploads it later)

Every tracker receives the same lines, built once by `LoggingCallback`: {"kind": "step" | "validation" |
"final", "step": n, ...numbers}. Step lines hold every loss part, the gradient norm (and per-part norms
on the steps that measure them, train.grad_norms_every), lr, tokens/s over the lines' interval, training
seconds and wall time. Only rank 0 logs under torchrun (train.run_distillation attaches them there only).
A resumed run continues its log: lines past the checkpoint it resumes from (written before a crash) are
dropped first, so no step appears twice.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from shdcli.callbacks import LAYER_KL, Callback, LoopState
from shdcli.errors import ShdError
from shdcli.recipe import Recipe, flat_keys
from shdcli.report import write_text_atomic

LOGS = "logs"
JSONL = "metrics.jsonl"
# report_to name -> (module that must be importable, pip extra)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def logs_dir(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / LOGS


class Logger:
    """One tracker. `start` gets the step the run continues from (0: a fresh run)."""

    def start(self, recipe: Recipe, step: int) -> None:
        pass

    def log(self, line: dict[str, Any]) -> None:
        pass

    def log_squeeze_weights(self, step: int, summary: dict[str, list[dict]]) -> None:
        """Per student layer: the mean squeeze weight of every teacher head in its groups so far."""

    def log_layer_kl(self, step: int, by_layer: dict[str, float]) -> None:
        """At a validation: per student layer, the KL of its maps to their squeezed targets."""

    def close(self) -> None:
        pass


def numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v == v and k != "step"}


class LoggingCallback(Callback):
    """Turns the loop's callbacks into tracker lines, every train.log_every steps (and step 1 and the last)."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers
        self.every, self.max_steps = 1, 1
        self.mark: tuple[int, float] = (0, 0.0)  # (tokens_seen, train_s) at the last step line: tokens/s since

    def on_start(self, recipe: Recipe, state: LoopState) -> None:
        self.every, self.max_steps = recipe.train.log_every, recipe.train.max_steps
        self.mark = (state.tokens_seen, state.train_s)
        for logger in self.loggers:
            logger.start(recipe, state.step)

    def _emit(self, line: dict) -> None:
        for logger in self.loggers:
            logger.log(line)

    def on_step(self, state: LoopState, record: dict) -> None:
        step = state.step
        if step % self.every and step not in (1, self.max_steps):
            return
        tokens, seconds = state.tokens_seen - self.mark[0], state.train_s - self.mark[1]
        self.mark = (state.tokens_seen, state.train_s)
        values = numbers({k: v for k, v in record.items() if k != "tokens"})
        self._emit({"kind": "step", "step": step, **values, "tokens_per_s": tokens / max(seconds, 1e-9),
                    "wall_time": time.time()})

    def on_validation(self, state: LoopState, record: dict) -> None:
        self._emit({"kind": "validation", "step": record["step"], **numbers(record), "time_s": state.train_s,
                    "wall_time": time.time()})
        summary, by_layer = state.stats.summary(), record.get(LAYER_KL)
        for logger in self.loggers:
            if summary:
                logger.log_squeeze_weights(record["step"], summary)
            if by_layer:
                logger.log_layer_kl(record["step"], by_layer)

    def on_end(self, metrics: dict) -> None:
        final = numbers(metrics.get("final_eval") or {})
        self._emit({"kind": "final", "step": metrics["steps_done"], **final, "wall_time": time.time()})

    def close(self) -> None:
        failure: BaseException | None = None
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as exc:  # noqa: BLE001 - close every tracker, then report the first failure
                failure = failure or exc
        if failure is not None:
            raise failure


# --------------------------------------------------------------------------- jsonl
def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a run log (a line cut short by a crash is skipped)."""
    out = []
    for text in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict):
            out.append(line)
    return out


class JsonlLogger(Logger):
    def __init__(self) -> None:
        self.handle = None

    def start(self, recipe: Recipe, step: int) -> None:
        path = logs_dir(recipe) / JSONL
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            # A fresh start re-logs everything; a resumed run keeps what its checkpoint covers (the loop
            # logs a step and its validation before saving that step's checkpoint).
            text = path.read_text(encoding="utf-8")
            lines = read_jsonl(path)
            kept = [line for line in lines if step > 0 and line.get("kind") != "final" and line["step"] <= step]
            if len(kept) != len(lines) or (text and not text.endswith("\n")):  # or a line cut by a crash
                write_text_atomic(path, "".join(json.dumps(line) + "\n" for line in kept))
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run

    def log(self, line: dict[str, Any]) -> None:
        self.handle.write(json.dumps(line) + "\n")
        self.handle.flush()  # readable (tail -f) while the run goes on

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


# --------------------------------------------------------------------------- tensorboard
def _tag(line: dict, key: str) -> str:
    """train/<part>, val/<part> (a validation line's val_ prefix dropped), final/<metric>."""
    if line["kind"] == "validation":
        return "val/" + key.removeprefix("val_")
    return {"step": "train", "final": "final"}[line["kind"]] + "/" + key


def _flat_recipe(data: dict) -> dict[str, str]:
    """The recipe's dotted keys with values as text (trackers store strings; non-strings as JSON)."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in flat_keys(data).items()}


class TensorBoardLogger(Logger):
    def __init__(self) -> None:
        self.writer = None

    def start(self, recipe: Recipe, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # third-party, lazy: the tensorboard extra

        # purge_step: events a crashed run wrote past the checkpoint it resumes from are hidden
        self.writer = SummaryWriter(str(logs_dir(recipe) / "tensorboard"), purge_step=step + 1 if step else None)
        if not step:
            flat = _flat_recipe(recipe.resolved())
            self.writer.add_text("recipe", "\n".join(f"    {k}: {v}" for k, v in flat.items()))

    def log(self, line: dict[str, Any]) -> None:
        for key, value in line.items():
            if key not in ("kind", "step", "wall_time"):
                self.writer.add_scalar(_tag(line, key), value, line["step"], walltime=line["wall_time"])
        self.writer.flush()

    def log_squeeze_weights(self, step: int, summary: dict[str, list[dict]]) -> None:
        import numpy as np

        for layer, groups in summary.items():
            values = np.array([w for g in groups for w in g["mean"]], dtype=np.float64)
            self.writer.add_histogram(f"squeeze_weights/student_layer_{layer}", values, step, bins="auto")

    def log_layer_kl(self, step: int, by_layer: dict[str, float]) -> None:
        import numpy as np

        # one scalar per layer (its curve over training) and their spread over layers (one histogram a step)
        for layer, kl in by_layer.items():
            self.writer.add_scalar(f"attention_kl/student_layer_{layer}", kl, step)
        self.writer.add_histogram("attention_kl/over_layers", np.array(list(by_layer.values())), step, bins="auto")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# --------------------------------------------------------------------------- mlflow
class MlflowLogger(Logger):
    """A local sqlite store (MLflow 3 refuses new plain-file stores); the run id is kept beside it so a
    resumed shd run continues the same MLflow run."""

    def __init__(self) -> None:
        self.client = self.run_id = None

    def start(self, recipe: Recipe, step: int) -> None:
        from mlflow.entities import Param  # third-party, lazy: the mlflow extra
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its database set-up notes are not ours to print

        folder = logs_dir(recipe)
        folder.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=f"sqlite:///{(folder / 'mlflow.db').resolve()}")
        id_file = folder / "mlflow_run_id"
        if step and id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name("shd")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            "shd", artifact_location=(folder / "mlflow-artifacts").resolve().as_uri())
        run = self.client.create_run(experiment_id, run_name=Path(recipe.output_dir).name)
        self.run_id = run.info.run_id
        write_text_atomic(id_file, self.run_id + "\n")
        params = [Param(k, v[:6000]) for k, v in _flat_recipe(recipe.resolved()).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, line: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        ms = int(line["wall_time"] * 1000)
        metrics = [Metric(_tag(line, k), v, ms, line["step"]) for k, v in line.items()
                   if k not in ("kind", "step", "wall_time")]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id)
            self.client = None


# --------------------------------------------------------------------------- wandb
class WandbLogger(Logger):
    """Offline W&B (nothing leaves the machine; `wandb sync output_dir/logs/wandb/offline-run-*` uploads)."""

    def __init__(self) -> None:
        self.run = None

    def start(self, recipe: Recipe, step: int) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb  # third-party, lazy: the wandb extra

        folder = logs_dir(recipe)
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "wandb_run_id"
        run_id = id_file.read_text().strip() if step and id_file.exists() else uuid.uuid4().hex[:8]
        write_text_atomic(id_file, run_id + "\n")
        self.run = wandb.init(mode="offline", dir=str(folder), project="shd", name=Path(recipe.output_dir).name,
                              id=run_id, resume="allow", config=recipe.resolved(),
                              # no stdout capture (the console is shd's), no system-metrics sampler, no git/code
                              settings=wandb.Settings(console="off", x_disable_stats=True, save_code=False,
                                                      disable_git=True))

    def log(self, line: dict[str, Any]) -> None:
        self.run.log({_tag(line, k): v for k, v in line.items() if k not in ("kind", "step", "wall_time")},
                     step=line["step"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


LOGGERS: dict[str, type[Logger]] = {"jsonl": JsonlLogger, "tensorboard": TensorBoardLogger, "mlflow": MlflowLogger,
                                    "wandb": WandbLogger}


def require(report_to: list[str]) -> None:
    """Fail before the slow setup when a tracker's package is missing (one line naming the extra)."""
    for name in report_to:
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None:
            module, extra = PACKAGES[name]
            raise ShdError(f"train.report_to: {name} needs the {module} package; pip install 'shd[{extra}]' "
                           f"or remove {name} from train.report_to")


def tracking(recipe: Recipe) -> LoggingCallback:
    """The trackers train.report_to names, behind one callback (require() them first)."""
    return LoggingCallback([LOGGERS[name]() for name in dict.fromkeys(recipe.train.report_to)])
