"""Crash-safe resume: real SIGKILL / SIGTERM on `python -m shdcli distill`, then --resume, compared
bit for bit with an uninterrupted run; NaN stops that leave the last good state; the checkpoint
format itself (no pickle, atomic folders, pruning)."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file

from shdcli import checkpoint
from shdcli.errors import ShdError
from shdcli.recipe import validate_recipe
from tests.conftest import ROOT, run_cli

MAX_STEPS, SAVE_EVERY = 24, 3


def write_recipe(folder: Path, teacher: Path, text: Path, out: Path, **train) -> Path:
    recipe = {
        "teacher": str(teacher),
        # GPT-2 keeps dropout 0.1 in the derived student: resume must restore the torch RNG exactly.
        "student": {"from_teacher": {"layers": 2, "heads": 3}},
        "data": {"path": str(text), "seq_len": 32, "batch_size": 4, "val_batches": 2},
        "train": {"max_steps": MAX_STEPS, "save_every": SAVE_EVERY, "eval_every": 8, "warmup_steps": 3,
                  "device": "cpu", "threads": 1, "seed": 3, **train},
        "output_dir": str(out),
    }
    path = folder / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def student_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "student" / "model.safetensors")


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], context: str) -> None:
    assert a.keys() == b.keys(), context
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), f"{name} differs; {context}"


def squash(text: str) -> str:
    """Text without whitespace: rich wraps long lines (and paths) at 80 columns when not on a terminal."""
    return "".join(text.split())


def losses(out: Path) -> list[dict]:
    history = json.loads((out / "metrics.json").read_text())["history"]
    return [{k: v for k, v in h.items() if k != "time_s"} for h in history]


@pytest.fixture(scope="module")
def reference(tiny_models, tiny_text, tmp_path_factory):
    """An uninterrupted run: its student, its loss history and how long its training took."""
    folder = tmp_path_factory.mktemp("resume-ref")
    out = folder / "ref"
    result = run_cli("distill", str(write_recipe(folder, tiny_models["gpt2"], tiny_text, out)))
    assert result.returncode == 0, result.stderr
    train_s = json.loads((out / "metrics.json").read_text())["timings"]["train_s"]
    return {"tensors": student_tensors(out), "losses": losses(out), "train_s": train_s}


def start(recipe: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, "-m", "shdcli", "distill", str(recipe)], stdout=handle,
                                stderr=subprocess.STDOUT, env=env)


def wait_for_checkpoint(proc: subprocess.Popen, root: Path, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while checkpoint.latest(root) is None:
        assert proc.poll() is None, f"run ended before its first checkpoint:\n{log.read_text()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


def test_sigkill_at_random_point_then_resume_is_bit_identical(reference, tiny_models, tiny_text, tmp_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_models["gpt2"], tiny_text, out)
    for attempt in range(3):  # a kill that lands after the process finished proves nothing: draw again
        proc = start(recipe, tmp_path / "killed.log")
        wait_for_checkpoint(proc, out / "checkpoints", tmp_path / "killed.log")
        # Anywhere in the rest of training, mid-step and mid-checkpoint-write included.
        time.sleep(rng.uniform(0, reference["train_s"] * (1 - SAVE_EVERY / MAX_STEPS)) / (attempt + 1))
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if alive:
            break
        shutil.rmtree(out)
    assert alive, f"never killed a live run (seed {seed})"
    assert proc.returncode == -signal.SIGKILL
    killed_at = checkpoint.latest(out / "checkpoints")
    assert not (out / "student").exists() or killed_at.name == f"step-{MAX_STEPS:08d}"

    result = run_cli("distill", str(recipe), "--resume")
    context = f"seed {seed}, resumed from {killed_at.name}"
    assert result.returncode == 0, f"{context}\n{result.stderr}"
    assert squash(f"resumed from {killed_at} (step {killed_at.name[5:].lstrip('0')} of {MAX_STEPS})") in \
        squash(result.stdout), context
    assert_bit_identical(student_tensors(out), reference["tensors"], context)
    assert losses(out) == reference["losses"], context


def test_sigterm_saves_at_end_of_step_and_resume_is_bit_identical(reference, tiny_models, tiny_text, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_models["gpt2"], tiny_text, out)
    log = tmp_path / "term.log"
    proc = start(recipe, log)
    wait_for_checkpoint(proc, out / "checkpoints", log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()
    text = squash(log.read_text())
    assert "Traceback" not in text
    newest = checkpoint.latest(out / "checkpoints")
    step = int(newest.name.removeprefix("step-"))
    assert squash(f"stopped by SIGTERM after step {step}; checkpoint saved to {newest}") in text
    assert squash(f"continue with: shd distill {recipe} --resume") in text
    assert not (out / "student").exists() and not (out / "metrics.json").exists()

    result = run_cli("distill", str(recipe), "--resume")
    assert result.returncode == 0, result.stderr
    assert_bit_identical(student_tensors(out), reference["tensors"], f"stopped at step {step}")
    assert losses(out) == reference["losses"]


# --------------------------------------------------------------------------- in-process: NaN stops
def in_process_recipe(tiny_models, tiny_text, out: Path, **train):
    data = yaml.safe_load(write_recipe(out.parent, tiny_models["gpt2"], tiny_text, out).read_text())
    data["train"].update({"max_steps": 6, "save_every": 100, **train})
    return validate_recipe(data)


def run(recipe, **kwargs):
    from shdcli.train import run_distillation

    threads = torch.get_num_threads()  # the recipe's threads=1 (6x less CPU on a busy machine) must not leak
    try:
        return run_distillation(recipe, Console(file=open(os.devnull, "w")), **kwargs)
    finally:
        torch.set_num_threads(threads)


def test_nan_loss_part_stops_with_last_good_checkpoint_that_resumes_exactly(tiny_models, tiny_text, tmp_path,
                                                                            monkeypatch):
    import shdcli.train as train

    run(in_process_recipe(tiny_models, tiny_text, tmp_path / "clean", save_every=3))  # saves steps 3 and 6

    calls = {"n": 0}
    real = train.shd_loss

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        if torch.is_grad_enabled():  # training steps only (validation runs under no_grad)
            calls["n"] += 1
            if calls["n"] == 4:
                result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(train, "shd_loss", poisoned)
    bad = in_process_recipe(tiny_models, tiny_text, tmp_path / "bad")
    with pytest.raises(ShdError) as err:
        run(bad)
    message = str(err.value)
    saved = tmp_path / "bad" / "checkpoints" / "step-00000003"
    assert f"loss part 'shd' became nan at step 4; stopped and saved the last good state (step 3) to {saved}" \
        in message
    assert "lower train.lr" in message
    assert [p.name for p in saved.parent.iterdir()] == ["step-00000003"]
    assert not (tmp_path / "bad" / "student").exists()
    # The saved state is exactly that of a clean run stopped after 3 steps ...
    good = tmp_path / "clean" / "checkpoints" / "step-00000003"
    for name in ("student.safetensors", "state.safetensors"):
        assert_bit_identical(load_file(saved / name), load_file(good / name), name)
    state = json.loads((saved / "state.json").read_text())
    assert state["position"] == json.loads((good / "state.json").read_text())["position"]
    # ... and resuming it (with the fault gone) ends exactly where the clean run ended.
    monkeypatch.setattr(train, "shd_loss", real)
    run(bad, resume=True)
    assert_bit_identical(student_tensors(tmp_path / "bad"), student_tensors(tmp_path / "clean"), "resumed after NaN")


def test_huge_lr_stops_at_first_non_finite_step(tiny_models, tiny_text, tmp_path):
    recipe = in_process_recipe(tiny_models, tiny_text, tmp_path / "hot", lr=1e30, warmup_steps=0, grad_clip=0.0)
    with pytest.raises(ShdError) as err:
        run(recipe)
    message = str(err.value)
    assert "became" in message and "; stopped and saved the last good state (step" in message
    step = int(message.split(" at step ")[1].split(";")[0])
    assert step >= 2  # step 1 moves the weights to ~1e30, a later step overflows
    saved = checkpoint.latest(tmp_path / "hot" / "checkpoints")
    assert saved.name == f"step-{step - 1:08d}"
    weights = load_file(saved / "student.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


# --------------------------------------------------------------------------- checkpoint format
def test_encode_decode_round_trip_exact():
    shared = torch.randn(3)
    state = {
        "state": {0: {"step": torch.tensor(5.0), "exp_avg": shared}, 1: {"exp_avg": shared}},
        "param_groups": [{"betas": (0.9, 0.95), "lr": 1e-3 / 3, "params": [0, 1], "foreach": None}],
        "python": random.getstate(),
        "__odd": [math.pi, -0.0, 2**70, "x"],
        (1, 2): [torch.zeros(2, dtype=torch.bfloat16)],
    }
    tensors: dict[str, torch.Tensor] = {}
    encoded = checkpoint.encode(state, tensors)
    back = checkpoint.decode(json.loads(json.dumps(encoded)), tensors)
    assert len(tensors) == 3  # the shared tensor is stored once
    assert back["state"][0]["exp_avg"] is back["state"][1]["exp_avg"]
    assert back["param_groups"][0]["betas"] == (0.9, 0.95)
    assert back["param_groups"][0]["lr"] == 1e-3 / 3
    assert back["python"] == random.getstate()
    assert back["__odd"] == [math.pi, -0.0, 2**70, "x"]
    assert torch.equal(back[(1, 2)][0], torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(TypeError):
        checkpoint.encode({"f": object()}, {})


def test_latest_ignores_incomplete_folders_and_save_prunes(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()

    class Stream:
        def state_dict(self):
            return {"epoch": 0, "index": 4}

    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        checkpoint.save(root, step, "fp", model, optimizer, scheduler, checkpoint.position(Stream()), {"x": step}, 2)
    assert [p.name for _, p in checkpoint.complete_checkpoints(root)] == ["step-00000002", "step-00000003"]
    # What a crash leaves: a hidden temporary folder (even with every file) and a folder missing state.json.
    tmp = root / ".step-00000009.tmp-abc"
    tmp.mkdir()
    for name in ("student.safetensors", "state.safetensors", "state.json"):
        (tmp / name).write_bytes(b"")
    partial = root / "step-00000008"
    partial.mkdir()
    (partial / "student.safetensors").write_bytes(b"")
    assert checkpoint.latest(root) == root / "step-00000003"
    checkpoint.save(root, 4, "fp", model, optimizer, scheduler, checkpoint.position(Stream()), {}, 2)
    assert not tmp.exists()  # swept
    assert checkpoint.latest(root) == root / "step-00000004"
    # Nothing is pickled: every file is safetensors or JSON.
    for file in (root / "step-00000004").iterdir():
        assert file.suffix in {".safetensors", ".json"}


def test_damaged_checkpoint_is_a_clean_error(tiny_models, tiny_text, tmp_path):
    recipe = in_process_recipe(tiny_models, tiny_text, tmp_path / "out", max_steps=2, save_every=1)
    run(recipe)
    newest = checkpoint.latest(tmp_path / "out" / "checkpoints")
    (newest / "state.safetensors").write_bytes(b"\x00" * 10)
    recipe.train.max_steps = 3
    with pytest.raises(ShdError, match=r"checkpoint .*step-00000002 is damaged .*delete that folder to resume from "
                                       r"the previous checkpoint"):
        run(recipe, resume=True)


def test_sigint_stops_at_end_of_step_with_checkpoint(tiny_models, tiny_text, tmp_path, monkeypatch, default_sigint):
    import shdcli.train as train

    real, steps = train.train_step, {"n": 0}

    def step_then_ctrl_c(*args, **kwargs):
        result = real(*args, **kwargs)
        steps["n"] += 1
        if steps["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step, before the step's bookkeeping
        return result

    monkeypatch.setattr(train, "train_step", step_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    recipe = in_process_recipe(tiny_models, tiny_text, tmp_path / "out")
    with pytest.raises(checkpoint.Interrupted) as stop:
        run(recipe)
    assert stop.value.step == 2 and stop.value.exit_code == 130
    assert str(stop.value) == f"stopped by SIGINT after step 2; checkpoint saved to {stop.value.folder}"
    assert checkpoint.latest(tmp_path / "out" / "checkpoints") == stop.value.folder
    assert stop.value.folder.name == "step-00000002"
    assert signal.getsignal(signal.SIGINT) is before  # handlers are put back


# --------------------------------------------------------------------------- atomic outputs
def test_failed_writes_leave_old_files_and_no_temporaries(tmp_path, monkeypatch):
    from shdcli import report
    from shdcli.models import sources as models

    target = tmp_path / "metrics.json"
    report.write_json_atomic(target, {"old": 1})

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "fsync", crash)
    with pytest.raises(OSError):
        report.write_json_atomic(target, {"new": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode

    class Saving(torch.nn.Module):
        def __init__(self, fail: bool):
            super().__init__()
            self.lin, self.fail = torch.nn.Linear(2, 2), fail

        def save_pretrained(self, folder, safe_serialization=True):
            (Path(folder) / "model.safetensors").write_bytes(b"partial")
            if self.fail:
                raise KeyboardInterrupt  # a crash halfway through writing

    student = tmp_path / "student"
    models.save_model_folder(Saving(False), None, student, {"note.txt": "old"})
    with pytest.raises(KeyboardInterrupt):
        models.save_model_folder(Saving(True), None, student, {"note.txt": "new"})
    assert (student / "note.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "student"]
