"""The performance benchmark's quick mode (asserts lean == naive through the training step), and the
training options issue 5 added: train.compile (capture under torch.compile) and train.teacher_dtype."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import torch

from shdcli.recipe import validate_recipe
from shdcli.teacher import teacher_dtype
from shdcli.train import prepare, step_losses
from tests.conftest import ROOT


def load_perf():
    spec = importlib.util.spec_from_file_location("shd_perf_bench", ROOT / "benchmarks" / "perf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_perf_quick_runs_and_asserts_equivalence():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "perf.py"), "--quick"], capture_output=True,
                         text=True, env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = res.stdout
    assert "lean == naive (loss and student gradients, rtol 1e-4, fp32): OK, 12 cases" in out
    for header in ("| N | B | student | floor | kd | lean | naive | lean / naive |", "lean extra / naive extra"):
        assert header in out
    rows = [line for line in out.splitlines() if line.startswith(("| 16 |", "| 40 |", "| 96 |"))]
    assert len(rows) == 6  # three sizes, in the time table and in the memory table


def test_equivalence_check_catches_a_wrong_gradient(monkeypatch):
    # The quick mode's assertion must be able to fail: scale the lean path's gradients by 1.001.
    perf = load_perf()
    from shdcli.attention import lean

    backward = lean._FusedStudentLoss.backward

    def skewed(ctx, grad_out):
        dq, dk, none = backward(ctx, grad_out)
        return dq * 1.001, dk, none

    monkeypatch.setattr(lean._FusedStudentLoss, "backward", staticmethod(skewed))
    try:
        perf.check_equivalence(perf.QUICK, 12, 2, torch.device("cpu"), chunks=(0,))
    except AssertionError as exc:
        assert "student gradient" in str(exc)
    else:
        raise AssertionError("a 0.1% gradient error went unnoticed")


def test_capture_works_under_torch_compile():
    # dynamo traces the student's forward, attention capture included (backend "eager": no C++ build, same
    # tracing, graph breaks and side effects as inductor); loss and gradients equal the uncompiled student's.
    perf = load_perf()
    cfg, n = perf.QUICK, 12
    batch = perf.make_batch(cfg, 2, n, torch.device("cpu"))
    results = []
    for compiled in (False, True):
        setup = perf.build(cfg, n, torch.device("cpu"))
        if compiled:
            torch._dynamo.reset()
            setup.student.compile(backend="eager")
        total, parts, _ = step_losses(setup, batch)
        total.backward()
        assert sorted(setup.student_recorder.records) == [0, 1]
        grads = [p.grad.clone() for p in setup.student.parameters()]
        results.append((parts, grads))
    (p0, g0), (p1, g1) = results
    for key in ("task", "logit", "shd"):
        torch.testing.assert_close(p1[key], p0[key], rtol=1e-5, atol=1e-7)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


def recipe_for(tiny_models, tiny_text, tmp_path, **train):
    return validate_recipe({
        "teacher": str(tiny_models["llama"]),
        "student": {"from_teacher": {"layers": 2, "heads": 3}},
        "data": {"path": str(tiny_text), "seq_len": 24, "batch_size": 2, "val_batches": 1},
        "train": {"device": "cpu", **train},
        "output_dir": str(tmp_path / "out"),
    })


def test_prepare_compile_flag_and_bfloat16_teacher(tiny_models, tiny_text, tmp_path):
    from rich.console import Console

    plain = recipe_for(tiny_models, tiny_text, tmp_path)
    assert plain.train.compile is False and plain.train.teacher_dtype == "auto"
    assert teacher_dtype(plain, torch.device("cpu")) == torch.float32  # auto keeps float32 on CPU
    setup = prepare(recipe_for(tiny_models, tiny_text, tmp_path, compile=True, teacher_dtype="bfloat16"),
                    Console(quiet=True))
    assert setup.student._compiled_call_impl is not None  # compiled in place; not run here (slow on CPU)
    assert next(setup.teacher.parameters()).dtype == torch.bfloat16
    assert next(setup.student.parameters()).dtype == torch.float32
    # A bf16 teacher's q/k/v feed both SHD paths, which compute maps in float32: same loss. (Sharper maps
    # than the random init's near-uniform ones, whose tiny KL is dominated by float32 rounding.)
    setup.student._compiled_call_impl = None
    with torch.no_grad():
        for model in (setup.teacher, setup.student):
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(6.0)
                layer.self_attn.k_proj.weight.mul_(6.0)
    batch = setup.val_batches[0]
    losses = {}
    for impl in ("lean", "naive"):
        setup.recipe.distill.impl = impl
        with torch.no_grad():
            _, parts, _ = step_losses(setup, batch)
        losses[impl] = parts["shd"]
        assert setup.teacher_recorder.records[setup.plan.pairs[0][1]].query.dtype == torch.bfloat16
    assert torch.isfinite(losses["lean"])
    torch.testing.assert_close(losses["lean"], losses["naive"], rtol=1e-4, atol=0.0)
    assert plain.fingerprint() == recipe_for(tiny_models, tiny_text, tmp_path, compile=True).fingerprint()
