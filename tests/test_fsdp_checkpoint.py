"""FSDP checkpoints (torch.distributed.checkpoint, every rank writes its shards): a 2-rank gloo run killed with
a real SIGKILL and resumed ends bit-identical to an uninterrupted one, and its checkpoints resume in another
world size: 2 ranks -> 1 process (to the end), and 2 -> 1 -> 2 (the sharded checkpoint read by one process and
written again whole, then read by 2 FSDP ranks) still ends bit-identical."""

from __future__ import annotations

import json
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

from shdcli import checkpoint, distributed
from tests.conftest import ROOT, run_cli
from tests.test_distributed import _recipe, no_dropout_gpt2  # noqa: F401 - fixture
from tests.test_resume import assert_bit_identical, losses, student_tensors
from tests.tiny import write_text

STEPS, SAVE_EVERY = 6, 2
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "shdcli",
            "distill"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def fsdp_recipe(tmp: Path, teacher: Path, text: Path, name: str) -> Path:
    return _recipe(tmp, teacher, text, name, 2, max_steps=STEPS, eval_every=STEPS, strategy="fsdp",
                   save_every=SAVE_EVERY, keep_checkpoints=3)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, env=ENV, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def back_to(out: Path, step: int) -> None:
    """What a crash after checkpoint `step` leaves: later checkpoints and every output gone."""
    for found, folder in checkpoint.complete_checkpoints(out / "checkpoints"):
        if found > step:
            shutil.rmtree(folder)
    checkpoint.remove_outputs(out)


@pytest.fixture(scope="module")
def reference(no_dropout_gpt2, tmp_path_factory) -> dict:  # noqa: F811
    """An uninterrupted 2-rank FSDP run, with its checkpoints (kept: every one)."""
    tmp = tmp_path_factory.mktemp("fsdp-ref")
    text = write_text(tmp / "train.txt")
    recipe = fsdp_recipe(tmp, no_dropout_gpt2, text, "ref")
    proc = ok(torchrun(str(recipe)))
    out = tmp / "ref"
    assert f"sharded over 2 ranks (torch.distributed.checkpoint), to {out / 'checkpoints'}" in \
        " ".join(proc.stdout.split())  # the plan says where checkpoints go before step 1
    mid = out / "checkpoints" / f"step-{SAVE_EVERY:08d}"
    assert (mid / checkpoint.SHARDED / ".metadata").is_file() and not (mid / "student.safetensors").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    return {"out": out, "text": text, "tensors": student_tensors(out), "losses": losses(out),
            "train_s": metrics["timings"]["train_s"]}


def copy_of(reference: dict, tmp: Path, teacher: Path) -> tuple[Path, Path]:
    """(recipe, output_dir): the reference run's folder under a recipe of its own."""
    out = tmp / "run"
    shutil.copytree(reference["out"], out)
    return fsdp_recipe(tmp, teacher, reference["text"], "run"), out


def test_fsdp_sigkill_then_resume_is_bit_identical(reference, no_dropout_gpt2, tmp_path):  # noqa: F811
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    recipe = fsdp_recipe(tmp_path, no_dropout_gpt2, reference["text"], "run")
    out, log = tmp_path / "run", tmp_path / "killed.log"
    for attempt in range(3):  # a kill that lands after the run finished proves nothing: draw again
        with open(log, "w") as handle:  # its own session: SIGKILL reaches torchrun and both ranks at once
            proc = subprocess.Popen([*TORCHRUN, str(recipe)], stdout=handle, stderr=subprocess.STDOUT, env=ENV,
                                    start_new_session=True)
        deadline = time.monotonic() + 300
        while checkpoint.latest(out / "checkpoints") is None:
            assert proc.poll() is None, f"run ended before its first checkpoint:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, reference["train_s"] * (1 - SAVE_EVERY / STEPS)) / (attempt + 1))
        alive = proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if alive:
            break
        shutil.rmtree(out)
    assert alive, f"never killed a live run (seed {seed})"
    killed_at = checkpoint.latest(out / "checkpoints")
    proc = ok(torchrun(str(recipe), "--resume"))
    context = f"seed {seed}, resumed from {killed_at.name}"
    assert "resumed from" in proc.stdout, context
    assert_bit_identical(student_tensors(out), reference["tensors"], context)
    assert losses(out) == reference["losses"], context


def test_fsdp_checkpoint_resumes_in_one_process(reference, no_dropout_gpt2, tmp_path):  # noqa: F811
    recipe, out = copy_of(reference, tmp_path, no_dropout_gpt2)
    back_to(out, SAVE_EVERY)
    result = run_cli("distill", str(recipe), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distributed"]["world_size"] == 1
    assert [h["step"] for h in metrics["history"]] == list(range(1, STEPS + 1))
    # The steps before the checkpoint are the 2-rank run's; after it one process trains on (half the batch).
    assert losses(out)[:SAVE_EVERY] == reference["losses"][:SAVE_EVERY]


def test_fsdp_checkpoint_through_one_process_and_back_is_bit_identical(reference, no_dropout_gpt2,  # noqa: F811
                                                                       tmp_path):
    """2 -> 1: one process reads the sharded checkpoint (DCP reshards to whole tensors) and writes it again
    whole; 1 -> 2: two FSDP ranks read that (each slices its shard) and finish. Any inexact step in either
    direction (weights, AdamW moments, schedule, data position) would show in the final student."""
    from shdcli.recipe import load_recipe
    from shdcli.train import open_run

    recipe, out = copy_of(reference, tmp_path, no_dropout_gpt2)
    back_to(out, SAVE_EVERY)
    threads = torch.get_num_threads()
    try:
        run = open_run(load_recipe(recipe), Console(quiet=True), resume=True, overwrite=False,
                       dist_info=distributed.init("cpu"))
        assert run.state.step == SAVE_EVERY and not run.sharded
        assert run.save() == out / "checkpoints" / f"step-{SAVE_EVERY:08d}"  # replaces it, whole this time
    finally:
        torch.set_num_threads(threads)
    assert (out / "checkpoints" / f"step-{SAVE_EVERY:08d}" / "student.safetensors").is_file()
    ok(torchrun(str(recipe), "--resume"))
    assert_bit_identical(student_tensors(out), reference["tensors"], "2 -> 1 -> 2 ranks")
    assert losses(out) == reference["losses"]
    assert yaml.safe_load(recipe.read_text())["train"]["strategy"] == "fsdp"
