"""bf16 on CPU: train.dtype=bfloat16 (autocast), a bf16 teacher (train.teacher_dtype) and FSDP2's
MixedPrecisionPolicy under gloo run, stay finite and stay close to the float32 run of the same recipe.

Tolerances, measured on this tiny GPT-2 (6 steps, no dropout) and set about 4x above what was seen:
the logged total within 1e-3 relative of float32 (seen: 5e-6 autocast, 5e-6 with a bf16 teacher, 5e-5 FSDP
mixed precision), each part within 2e-2 (seen: SHD 5e-3, logit KD 8e-4). The total is dominated by the
task loss of a near-uniform random model, which bf16 barely moves; SHD compares attention maps, which it
moves most."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from shdcli import distributed
from shdcli.recipe import load_recipe
from tests.test_distributed import _recipe, _single, _torchrun, no_dropout_gpt2  # noqa: F401 - fixture
from tests.tiny import write_text

TOTAL_RTOL, PART_RTOL = 1e-3, 2e-2
STEPS = 6


def assert_close_to_fp32(fp32: dict, other: dict, parts: tuple[str, ...] = ("task", "logit", "shd")) -> None:
    assert len(other["history"]) == len(fp32["history"]) == STEPS
    for a, b in zip(fp32["history"], other["history"]):
        assert all(math.isfinite(v) for v in b.values() if isinstance(v, float)), b
        assert b["total"] == pytest.approx(a["total"], rel=TOTAL_RTOL), (a["step"], "total")
        for key in parts:
            assert b[key] == pytest.approx(a[key], rel=PART_RTOL, abs=1e-6), (a["step"], key)
    assert other["validation"][-1]["val_total"] == pytest.approx(fp32["validation"][-1]["val_total"], rel=TOTAL_RTOL)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("bf16") / "train.txt")


@pytest.fixture(scope="module")
def fp32_run(no_dropout_gpt2, text, tmp_path_factory) -> dict:  # noqa: F811
    tmp = tmp_path_factory.mktemp("fp32")
    return _single(_recipe(tmp, no_dropout_gpt2, text, "fp32", 4, max_steps=STEPS, eval_every=STEPS))


@pytest.mark.parametrize("teacher_dtype", ["auto", "bfloat16"], ids=["fp32-teacher", "bf16-teacher"])
def test_bf16_autocast_on_cpu_stays_close_to_fp32(teacher_dtype, fp32_run, no_dropout_gpt2, text,  # noqa: F811
                                                  tmp_path):
    recipe = _recipe(tmp_path, no_dropout_gpt2, text, "bf16", 4, max_steps=STEPS, eval_every=STEPS,
                     dtype="bfloat16", teacher_dtype=teacher_dtype)
    assert_close_to_fp32(fp32_run, _single(recipe))
    # The student is saved in float32 (autocast computes in bf16, the weights stay fp32).
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "bf16" / "student" / "model.safetensors").values()} == \
        {torch.float32}


def test_bf16_settings_reach_the_models(no_dropout_gpt2, text, tmp_path):  # noqa: F811
    """Not a silent no-op: the teacher's weights are bf16, and the student's captured q/k under the run's
    autocast are bf16 too."""
    from shdcli import train

    recipe = load_recipe(_recipe(tmp_path, no_dropout_gpt2, text, "setup", 4, dtype="bfloat16",
                                 teacher_dtype="bfloat16"))
    threads = torch.get_num_threads()
    try:
        setup = train.prepare(recipe, Console(quiet=True))
    finally:
        torch.set_num_threads(threads)
    assert setup.amp_dtype == torch.bfloat16
    assert {p.dtype for p in setup.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in setup.student.parameters()} == {torch.float32}
    batch = {k: v for k, v in setup.val_batches[0].items() if k != "labels"}
    with setup.student_recorder.active(), train.autocast(setup):
        setup.student(**batch)
        records = dict(setup.student_recorder.records)
    assert records and {r.query.dtype for r in records.values()} == {torch.bfloat16}


def test_fsdp_mixed_precision_policy_applies_on_cpu(no_dropout_gpt2, tmp_path, monkeypatch):  # noqa: F811
    """wrap_student gives CPU ranks the bf16 MixedPrecisionPolicy: bf16 weights inside the forward, fp32
    master weights outside (a one-process gloo group standing in for the ranks)."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from shdcli.models.families import decoder_layers

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(distributed, "_INFO", distributed.DistInfo(0, 2, 0))  # wrap as a multi-rank run
        model = AutoModelForCausalLM.from_pretrained(no_dropout_gpt2)
        blocks = list(decoder_layers(model))
        distributed.wrap_student(model, "fsdp", torch.device("cpu"), torch.bfloat16, encoder=False, blocks=blocks)
        assert {p.dtype for p in model.parameters()} == {torch.float32}  # the sharded master weights
        seen: list[torch.dtype] = []
        blocks[0].mlp.c_fc.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
        model(input_ids=torch.arange(1, 13).view(2, 6))
        assert seen == [torch.bfloat16]
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_fsdp_bf16_match_one_process_fp32(fp32_run, no_dropout_gpt2, text, tmp_path):  # noqa: F811
    """torchrun, 2 CPU ranks, FSDP2 with bf16 mixed precision, each rank half of the global batch of 4."""
    recipe = _recipe(tmp_path, no_dropout_gpt2, text, "fsdp", 2, max_steps=STEPS, eval_every=STEPS,
                     strategy="fsdp", dtype="bfloat16")
    proc = _torchrun(recipe)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert metrics["distributed"] == {"world_size": 2, "strategy": "fsdp"}
    assert_close_to_fp32(fp32_run, metrics)
