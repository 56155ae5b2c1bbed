"""torchrun on CPU (gloo): 2 ranks reproduce one process with the same global batch, DDP and FSDP2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from shdcli import distributed
from shdcli.tasks.data import BatchStream, TokenBlocks
from tests.conftest import ROOT
from tests.tiny import make_tiny, write_text


@pytest.fixture(scope="module")
def no_dropout_gpt2(tmp_path_factory) -> Path:
    # Dropout draws different masks in one process and in two: equality needs it off.
    folder = make_tiny("gpt2", tmp_path_factory.mktemp("gpt2nd") / "gpt2")
    config = json.loads((folder / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _recipe(tmp: Path, teacher: Path, text: Path, out: str, batch_size: int, balance: str = "none", **train) -> Path:
    data = {
        "teacher": str(teacher),
        "student": {"from_teacher": {"layers": 2, "heads": 3}},
        "distill": {"balance": balance},
        "data": {"path": str(text), "seq_len": 32, "batch_size": batch_size, "val_batches": 2},
        "train": {"max_steps": 4, "eval_every": 4, "device": "cpu", "warmup_steps": 1, "lr": 1e-3, "threads": 1,
                  **train},
        "output_dir": str(tmp / out),
    }
    path = tmp / f"{out}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _torchrun(recipe: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "shdcli", "distill", str(recipe)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _single(recipe: Path) -> dict:
    from rich.console import Console

    from shdcli.recipe import load_recipe
    from shdcli.train import run_distillation

    return run_distillation(load_recipe(recipe), Console(quiet=True))


def _assert_same_run(one: dict, two: dict, rtol: float = 1e-4) -> None:
    assert len(one["history"]) == len(two["history"])
    for a, b in zip(one["history"], two["history"]):
        for key in ("total", "task", "logit", "shd", "grad_norm", "grad_cos_shd", "shd_coef", "shd_agreement"):
            if key in a and key in b:  # FSDP runs take no per-part gradients (no grad_cos_shd)
                assert b[key] == pytest.approx(a[key], rel=rtol, abs=1e-7), (a["step"], key)
    for a, b in zip(one["validation"], two["validation"]):
        for key in ("val_total", "val_task", "val_shd"):
            assert b[key] == pytest.approx(a[key], rel=rtol, abs=1e-7), (a["step"], key)


def _same_student(dir_a: Path, dir_b: Path) -> None:
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(dir_a).eval()
    b = AutoModelForCausalLM.from_pretrained(dir_b).eval()
    ids = torch.arange(1, 25).view(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy,accum,balance", [("ddp", 1, "none"), ("fsdp", 2, "none"), ("ddp", 2, "agreement")])
def test_two_gloo_ranks_match_one_process(tmp_path, no_dropout_gpt2, strategy, accum, balance):
    # balance=agreement: per-part gradients averaged over ranks by hand, so both ranks cap SHD alike
    text = write_text(tmp_path / "train.txt")
    one = _single(_recipe(tmp_path, no_dropout_gpt2, text, "one", 4, balance, grad_accum=accum, grad_norms_every=1))
    proc = _torchrun(_recipe(tmp_path, no_dropout_gpt2, text, "two", 2, balance, grad_accum=accum, strategy=strategy,
                             grad_norms_every=1))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["distributed"] == {"world_size": 2, "strategy": strategy}
    assert one["distributed"]["world_size"] == 1
    _assert_same_run(one, two)
    # rank 0 alone printed the plan and the result line
    assert proc.stdout.count("student written to") == 1
    _same_student(tmp_path / "one" / "student", tmp_path / "two" / "student")
    # rank 0 alone wrote: no stray temporary folders beside the outputs. Both strategies checkpoint (DDP:
    # rank 0 writes; FSDP: every rank its shards, tests/test_fsdp_checkpoint.py), every rank can resume.
    expected = ["checkpoints", "metrics.json", "report.md", "run.json", "student"]
    steps = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    assert steps and all(name.startswith("step-") for name in steps), steps
    written = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert set(expected) <= set(written) and set(written) - set(expected) <= {"logs", "plots"}, written


def test_rank_slices_concatenate_to_the_global_batch():
    ids = torch.arange(50 * 4).view(50, 4)
    blocks = TokenBlocks(ids, torch.ones_like(ids))
    single = BatchStream(blocks, 6, seed=3)
    ranks = [BatchStream(blocks, 2, seed=3, rank=r, world=3) for r in range(3)]
    for _ in range(20):  # crosses epoch boundaries (50 rows, 6 per global batch)
        whole = single.next()["input_ids"]
        parts = torch.cat([s.next()["input_ids"] for s in ranks])
        assert torch.equal(whole, parts)


def test_without_torchrun_everything_is_a_noop(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = distributed.init("cpu")
    assert (info.rank, info.world, info.is_main, info.enabled) == (0, 1, True, False)
    model = torch.nn.Linear(3, 2)
    assert distributed.wrap_student(model, "fsdp", torch.device("cpu"), None, encoder=False) is model
    assert distributed.reduce_metrics({"a": 1.5}, 7, torch.device("cpu")) == ({"a": 1.5}, 7)
    assert distributed.model_for_saving(model) is model
    batch = {"input_ids": torch.ones(3, 2)}
    assert distributed.rank_rows(batch) is batch


def test_bad_torchrun_environment_is_a_user_error(monkeypatch):
    from shdcli.errors import ShdError

    monkeypatch.setenv("RANK", "zero")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ShdError, match="RANK"):
        distributed.env_info()


def test_two_rank_run_resumes_and_changes_world_size(no_dropout_gpt2, tmp_path):
    """A 2-rank DDP run resumed from its mid-run checkpoint ends where the uninterrupted run ended;
    the same checkpoint also resumes in a single process (another world size) and finishes."""
    import shutil

    text = write_text(tmp_path / "train.txt")
    recipe = _recipe(tmp_path, no_dropout_gpt2, text, "run", 2, save_every=2, keep_checkpoints=3)
    proc = _torchrun(recipe)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "run"
    full = json.loads((out / "metrics.json").read_text())
    shutil.copytree(out / "student", tmp_path / "uninterrupted")
    mid = out / "checkpoints" / "step-00000002"
    assert mid.is_dir()
    shutil.copytree(out, tmp_path / "backup")  # for the single-process resume below

    # Lose everything after step 2, as a crash would, then resume on 2 ranks.
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    for name in ("student", "metrics.json", "report.md"):
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "shdcli", "distill", str(recipe), "--resume"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    resumed = json.loads((out / "metrics.json").read_text())
    _assert_same_run(full, resumed)
    _same_student(tmp_path / "uninterrupted", out / "student")

    # The 2-rank checkpoint resumes in one process too (global batch halves; the run completes).
    backup = tmp_path / "backup"
    shutil.rmtree(backup / "checkpoints" / "step-00000004")
    text_recipe = yaml.safe_load(recipe.read_text())
    text_recipe["output_dir"] = str(backup)
    single = tmp_path / "single.yaml"
    single.write_text(yaml.safe_dump(text_recipe))
    from tests.conftest import run_cli

    result = run_cli("distill", str(single), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((backup / "metrics.json").read_text())
    assert metrics["steps_done"] == 4 and metrics["distributed"]["world_size"] == 1
    assert [h["step"] for h in metrics["history"]] == [1, 2, 3, 4]
