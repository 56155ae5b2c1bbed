"""Watching a run (issue 28): the callbacks of train.run_distillation, the live run log
(logs/metrics.jsonl) and its resume, the trackers read back with their own readers, plain console
lines off a terminal, the report's plots and `shd compare`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from shdcli import checkpoint, plots, trackers
from shdcli.callbacks import Callback
from shdcli.errors import ShdError
from shdcli.recipe import validate_recipe
from shdcli.report import render_report
from tests.conftest import run_cli, run_main


def recipe_data(teacher: Path, text: Path, out: Path, **train) -> dict:
    return {
        "teacher": str(teacher),
        "student": {"from_teacher": {"layers": 2, "heads": 3}},
        "data": {"path": str(text), "seq_len": 32, "batch_size": 4, "val_batches": 2, "max_documents": 40},
        "train": {"max_steps": 4, "eval_every": 2, "warmup_steps": 1, "device": "cpu", "threads": 1,
                  "grad_norms_every": 2, **train},
        "output_dir": str(out),
    }


def run(data: dict, **kwargs) -> dict:
    from shdcli.train import run_distillation

    threads = torch.get_num_threads()  # the recipe's threads=1 must not leak into pytest
    try:
        return run_distillation(validate_recipe(data), Console(file=open(os.devnull, "w")), **kwargs)
    finally:
        torch.set_num_threads(threads)


def lines(out: Path) -> list[dict]:
    return trackers.read_jsonl(out / "logs" / "metrics.jsonl")


class Recorder(Callback):
    """Every call in order; at each step, the last line of the run log as a reader sees it then."""

    def __init__(self, out: Path) -> None:
        self.out, self.calls = out, []

    def on_start(self, recipe, state):
        self.calls.append(("start", state.step))

    def on_step(self, state, record):
        assert record["step"] == state.step and "total" in record and record["tokens"] > 0
        self.calls.append(("step", state.step, lines(self.out)[-1]["step"]))

    def on_validation(self, state, record):
        self.calls.append(("validation", record["step"]))

    def on_end(self, metrics):
        self.calls.append(("end", metrics["steps_done"]))


def test_callbacks_and_the_live_run_log(tiny_models, tiny_text, tmp_path):
    out = tmp_path / "run"
    recorder = Recorder(out)
    run(recipe_data(tiny_models["gpt2"], tiny_text, out, log_every=3), callbacks=[recorder])
    # Built-in callbacks run first: by a step's on_step its line (if due) is already flushed to the file.
    assert recorder.calls == [("start", 0), ("validation", 0), ("step", 1, 1), ("step", 2, 1), ("validation", 2),
                              ("step", 3, 3), ("step", 4, 4), ("validation", 4), ("end", 4)]
    log = lines(out)
    assert [(line["kind"], line["step"]) for line in log] == [
        ("validation", 0), ("step", 1), ("validation", 2), ("step", 3), ("step", 4), ("validation", 4), ("final", 4)]
    step = {line["step"]: line for line in log if line["kind"] == "step"}
    for line in step.values():
        assert {"task", "logit", "shd", "total", "lr", "grad_norm", "tokens_per_s", "time_s", "wall_time"} <= set(line)
        assert line["tokens_per_s"] > 0
    # per-part gradient norms where the step measured them (grad_norms_every=2)
    assert not any(k.startswith("grad_norm_") for k in step[3])
    assert any(k.startswith("grad_norm_") for k in step[4])
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert step[4]["total"] == history[3]["total"]  # the same numbers as metrics.json
    assert {"val_total", "val_perplexity"} <= set(log[2])
    assert "perplexity" in log[-1]


def test_resume_continues_the_log_without_repeating_steps(tiny_models, tiny_text, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    data = recipe_data(tiny_models["gpt2"], tiny_text, out, log_every=1, save_every=2,
                       report_to=["jsonl", "tensorboard"])
    run(data)
    # A crash after step 4 was logged but before its checkpoint, in the middle of writing a line:
    shutil.rmtree(checkpoint.latest(out / "checkpoints"))
    with open(out / "logs" / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "step", "st')
    data["train"]["max_steps"] = 6
    run(data, resume=True)  # from step 2
    log = lines(out)
    assert [line["step"] for line in log if line["kind"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert [line["step"] for line in log if line["kind"] == "validation"] == [0, 2, 4, 6]
    assert [line["step"] for line in log if line["kind"] == "final"] == [6]
    events = EventAccumulator(str(out / "logs" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/total")] == [1, 2, 3, 4, 5, 6]  # purge_step dropped 3, 4


# --------------------------------------------------------------------------- trackers
@pytest.fixture(scope="module")
def tracked(tiny_models, tiny_text, tmp_path_factory) -> Path:
    """One run logged to every tracker installed here."""
    names = ["jsonl"] + [n for n, (module, _) in trackers.PACKAGES.items()
                         if __import__("importlib").util.find_spec(module) is not None]
    out = tmp_path_factory.mktemp("tracked") / "run"
    run(recipe_data(tiny_models["gpt2"], tiny_text, out, max_steps=3, log_every=1, report_to=names))
    return out


def test_tensorboard_reads_back(tracked):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked / "logs" / "tensorboard"), size_guidance={"histograms": 0}).Reload()
    assert [e.step for e in events.Scalars("train/total")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("val/total")] == [0, 2, 3]
    assert [e.step for e in events.Scalars("final/perplexity")] == [3]
    history = json.loads((tracked / "metrics.json").read_text())["history"]
    assert events.Scalars("train/task")[-1].value == pytest.approx(history[-1]["task"], rel=1e-6)
    hist = events.Histograms("squeeze_weights/student_layer_0")
    assert [h.step for h in hist] == [2, 3] and hist[-1].histogram_value.num == 6  # 6 teacher heads, 3 groups
    # attention fidelity per student layer: a curve per layer and their spread, at every validation
    validation = json.loads((tracked / "metrics.json").read_text())["validation"]
    layer_kl = events.Scalars("attention_kl/student_layer_1")
    assert [e.step for e in layer_kl] == [0, 2, 3]
    assert layer_kl[-1].value == pytest.approx(validation[-1]["attention_kl_by_layer"]["1"], rel=1e-6)
    spread = events.Histograms("attention_kl/over_layers")
    assert [h.step for h in spread] == [0, 2, 3] and spread[-1].histogram_value.num == 2  # 2 student layers


def test_mlflow_reads_back(tracked):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked / 'logs' / 'mlflow.db'}")
    run_id = (tracked / "logs" / "mlflow_run_id").read_text().strip()
    mlrun = client.get_run(run_id)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["train.max_steps"] == "3"
    assert [m.step for m in client.get_metric_history(run_id, "train/total")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run_id, "val/perplexity")] == [0, 2, 3]


def wandb_records(path: Path) -> list:
    """The records of a W&B offline run file: a ':W&B' header, then a LevelDB-style log of protobuf
    Records in 32 KiB blocks (types: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buffer, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buffer += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buffer)
            records.append(record)
            buffer = b""
    return records


def test_wandb_offline_folder_reads_back(tracked):
    pytest.importorskip("wandb")
    [run_file] = (tracked / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    history = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
    assert sorted(history) == [0, 1, 2, 3]
    assert all("train/total" in history[s] for s in (1, 2, 3)) and "val/total" in history[0]
    assert "final/perplexity" in history[3]


def test_missing_tracker_package_is_one_line_error(tiny_models, tiny_text, tmp_path, monkeypatch, capfd):
    import yaml

    monkeypatch.setitem(trackers.PACKAGES, "wandb", ("no_such_module_for_shd_tests", "wandb"))
    out = tmp_path / "run"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_data(tiny_models["gpt2"], tiny_text, out)))
    code, stdout, err = run_main(monkeypatch, capfd, "distill", str(path), "--set", "train.report_to=[jsonl,wandb]")
    assert code == 2, (stdout, err)
    [line] = [x for x in err.splitlines() if x.strip()]
    assert line.startswith("error: train.report_to: wandb") and "pip install 'shd[wandb]'" in line
    assert not out.exists()


# --------------------------------------------------------------------------- console, report, compare
def test_plain_lines_and_plots_when_stdout_is_a_pipe(tiny_models, tiny_text, tmp_path):
    import yaml

    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    path = tmp_path / "recipe.yaml"
    data = recipe_data(tiny_models["bert"], tiny_text, out, max_steps=5, log_every=2)
    data["distill"] = {"balance": "none"}  # SHD in training (auto turns it off for an encoder): its weight plot
    path.write_text(yaml.safe_dump(data))
    proc = run_cli("distill", str(path), timeout=300)  # stdout is a pipe, as under `| tee`, nohup or CI
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/5", "2/5", "4/5", "5/5"]
    for line in steps:
        assert "total=" in line and " tok/s " in line and " eta " in line, line
    assert "\r" not in proc.stdout and "…" not in proc.stdout and "━" not in "".join(steps)
    assert "validation at step 5: val_" in proc.stdout
    report = (out / "report.md").read_text()
    for name in ("losses.png", "grad_norms.png", "squeeze_weights.png", "attention_fidelity.png", "quality.png"):
        assert f"](plots/{name})" in report and (out / "plots" / name).stat().st_size > 1000


def test_report_without_matplotlib_says_how_to_get_plots(tracked, monkeypatch):
    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    metrics = json.loads((tracked / "metrics.json").read_text())
    figures = plots.write_run_plots(metrics, tracked / "elsewhere")
    assert figures.files == [] and not (tracked / "elsewhere").exists()
    report = render_report(metrics, figures.files, figures.note)
    assert "pip install 'shd[plot]'" in report and "![" not in report


def test_compare_two_runs(tracked, tiny_models, tiny_text, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    other = tmp_path / "lr"
    run(recipe_data(tiny_models["gpt2"], tiny_text, other, max_steps=3, lr=1e-3))
    png = tmp_path / "curves.png"
    code, out, err = run_main(monkeypatch, capsys, "compare", str(tracked), str(other), "--plot", str(png), "--json")
    assert code == 0, err
    table = json.loads(out)
    assert table["runs"] == ["run", "lr"]
    differ = {row[0]: row[1:] for row in table["recipe"]}
    assert differ["train.lr"] == [0.0005, 0.001] and "output_dir" not in differ
    metrics = {row[0]: row[1:] for row in table["final_eval"]}
    assert metrics["perplexity"][0] > 0 and len(metrics["perplexity"]) == 3  # teacher, then each run
    assert png.stat().st_size > 1000
    code, out, err = run_main(monkeypatch, capsys, "compare", str(tracked), str(other), "--plot", str(png))
    assert code == 0 and "train.lr" in out and "size and speed" in out


def test_compare_refuses_runs_of_different_teachers(tracked, tmp_path, monkeypatch, capsys):
    other = tmp_path / "other"
    other.mkdir()
    metrics = json.loads((tracked / "metrics.json").read_text())
    metrics["recipe"]["teacher"]["path"] = "/models/another-teacher"
    (other / "metrics.json").write_text(json.dumps(metrics))
    code, out, err = run_main(monkeypatch, capsys, "compare", str(tracked), str(other), "--plot",
                              str(tmp_path / "x.png"))
    assert code == 2
    [line] = [x for x in err.splitlines() if x.strip()]
    assert "different teachers" in line and "/models/another-teacher" in line
    assert not (tmp_path / "x.png").exists()


def test_missing_optional_eval_corpus_is_a_warning_and_a_report_row(tiny_models, tiny_text, tmp_path, monkeypatch):
    from shdcli.tasks import data as corpora

    empty = tmp_path / "no-fortunes"
    empty.mkdir()
    real = corpora.fortune_documents
    monkeypatch.setattr(corpora, "fortune_documents", lambda field="data.path", root=None: real(field, empty))
    out = tmp_path / "run"
    recipe = recipe_data(tiny_models["gpt2"], tiny_text, out, max_steps=2)
    recipe["data"]["ood_eval"] = "builtin:fortunes"
    from shdcli.train import run_distillation

    threads = torch.get_num_threads()
    console = Console(record=True, width=250, file=open(os.devnull, "w"))
    try:
        metrics = run_distillation(validate_recipe(recipe), console)
    finally:
        torch.set_num_threads(threads)
    assert "warning: data.ood_eval will not be measured: data.ood_eval: builtin:fortunes needs Debian's fortunes" \
        in console.export_text()
    assert not any(k.startswith("ood_") for k in metrics["final_eval"]) and "perplexity" in metrics["final_eval"]
    assert "apt-get install fortunes" in metrics["not_measured"]["data.ood_eval"]
    report = (out / "report.md").read_text()
    assert "| data.ood_eval (ood_*) | not measured | not measured | not measured (data.ood_eval: builtin:fortunes" \
        in report
    # A missing training corpus stays an error.
    recipe["data"]["path"] = "builtin:fortunes"
    recipe["output_dir"] = str(tmp_path / "run2")
    with pytest.raises(ShdError, match="data.path: builtin:fortunes needs Debian's fortunes"):
        run(recipe)
