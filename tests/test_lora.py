"""LoRA students: adapters train on a frozen, teacher-initialised student; merged folder loads and evaluates."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")

from shdcli.errors import ShdError  # noqa: E402
from shdcli.recipe import validate_recipe  # noqa: E402


def _recipe(teacher, text, out, **lora):
    return validate_recipe({
        "teacher": str(teacher),
        "student": {"from_teacher": {"layers": 2, "heads": 3}, "lora": {"r": 4, **lora}},
        "data": {"path": str(text), "seq_len": 32, "batch_size": 2, "val_batches": 2},
        "train": {"max_steps": 3, "eval_every": 3, "device": "cpu", "warmup_steps": 0, "lr": 1e-2, "threads": 1},
        "output_dir": str(out),
    })


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_lora_student_trains_adapters_and_saves_a_merged_student(tmp_path, tiny_models, tiny_text, kind):
    from rich.console import Console
    from transformers import AutoModelForCausalLM

    from shdcli.tasks.causal_lm import perplexity
    from shdcli.tasks.data import eval_batches, load_blocks
    from shdcli.train import calibration_batches, load_teacher, make_student, run_distillation

    recipe = _recipe(tiny_models[kind], tiny_text, tmp_path / "run")
    metrics = run_distillation(recipe, Console(quiet=True))
    sizes = metrics["sizes"]
    assert 0 < sizes["student_trainable_params"] < sizes["student_params"] / 10

    # lora/base is exactly the student derived from the teacher: the base weights stayed frozen.
    teacher, tokenizer, task, _ = load_teacher(recipe)
    train_blocks, _ = load_blocks(recipe.data, tokenizer, True, recipe.train.seed)
    initial, _, _ = make_student(recipe, teacher, tokenizer, task, lambda: calibration_batches(train_blocks, recipe))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "lora" / "base").eval()
    for name, value in initial.state_dict().items():
        torch.testing.assert_close(base.state_dict()[name], value, rtol=0, atol=0, msg=name)

    # The merged student (plain HF folder) computes what base + adapter compute, and differs from base.
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student").eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "run" / "lora" / "adapter").eval()
    ids = torch.arange(4, 28).view(2, 12)
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)
    config = json.loads((tmp_path / "run" / "lora" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16.0

    # ...and evaluates to the final validation perplexity the run reported.
    _, val_blocks = load_blocks(recipe.data, tokenizer, True, recipe.train.seed)
    val = eval_batches(val_blocks, recipe.data.batch_size, recipe.data.val_batches)
    ppl = perplexity(merged, val, torch.device("cpu"))["perplexity"]
    assert ppl == pytest.approx(metrics["final_eval"]["val_perplexity"], rel=1e-4)


def test_adapters_move_the_merged_weights(tmp_path, tiny_models, tiny_text):
    from rich.console import Console
    from safetensors.torch import load_file

    from shdcli.train import run_distillation

    run_distillation(_recipe(tiny_models["gpt2"], tiny_text, tmp_path / "run"), Console(quiet=True))
    base = load_file(tmp_path / "run" / "lora" / "base" / "model.safetensors")
    merged = load_file(tmp_path / "run" / "student" / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    # attention target: only the attention projections move (GPT-2: attn.c_attn and attn.c_proj, not mlp.c_proj)
    assert changed and all(".attn.c_attn." in k or ".attn.c_proj." in k for k in changed), changed
    assert len(changed) == 4  # 2 layers x (c_attn, c_proj) weights


def test_lora_recipe_errors():
    with pytest.raises(ShdError, match="init=teacher"):
        validate_recipe({"teacher": "x", "student": {"from_teacher": {"init": "random"}, "lora": {}},
                         "data": {"path": "x"}})
    with pytest.raises(ShdError, match="student.lora.r"):
        validate_recipe({"teacher": "x", "student": {"from_teacher": {}, "lora": {"r": 0}}, "data": {"path": "x"}})
