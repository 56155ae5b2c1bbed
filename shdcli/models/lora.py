"""LoRA students (student.lora): train low-rank adapters on a student initialised from the teacher.

The derived student (fewer heads/layers, weights from the teacher's head groups) is frozen; PEFT
injects A [r, in] and B [out, r] per target projection, W x + (alpha / r) B A x. Only A, B train, so
optimizer state and gradients shrink to the adapters (a few MB), while the SHD loss still reads q/k
from the student's forward (the capture sits in the attention function, beneath the projections).

Output (rank 0):
  output_dir/student/        the merged student, W + (alpha / r) B A: a plain HF folder for from_pretrained
  output_dir/lora/adapter/   PEFT adapter (adapter_config.json + adapter_model.safetensors)
  output_dir/lora/base/      the frozen base student the adapter applies to (it is derived, not the teacher)

Needs the optional package peft (pip install peft).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from shdcli.errors import ShdError
from shdcli.models.families import attention_params, decoder_layers
from shdcli.report import write_folder_atomic


def _peft():
    try:
        import peft
    except ImportError:
        raise ShdError("student.lora: needs the optional package peft; pip install peft") from None
    return peft


def attention_targets(model: nn.Module) -> list[str]:
    """In-block paths of the attention projections (models/families.py: q/k/v/o, or a fused q/k/v and o)."""
    params = attention_params(decoder_layers(model)[0], model.config)
    # Full in-layer paths (e.g. attn.c_proj, not c_proj which is also the MLP's output in GPT-2).
    return sorted(params.names.values())


def apply_lora(student: nn.Module, spec) -> nn.Module:
    """Wrap the student in a PEFT LoRA model (spec: recipe.LoraSpec); base weights frozen."""
    peft = _peft()
    if spec.target_modules == "attention":
        # A regex over full module names: GPT-2's attn.c_proj, not the MLP's c_proj.
        targets: list[str] | str = r".*\.(" + "|".join(re.escape(n) for n in attention_targets(student)) + ")$"
    else:
        targets = spec.target_modules  # "all-linear" or a list of module-name suffixes (PEFT semantics)
    from transformers.pytorch_utils import Conv1D

    # GPT-2's Conv1D stores W as [in, out] (x @ W): PEFT must know, else it warns and flips it itself.
    conv1d = any(isinstance(m, Conv1D) for m in student.modules())
    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                             bias="none", fan_in_fan_out=conv1d)
    try:
        model = peft.get_peft_model(student, config)
    except ValueError as exc:
        raise ShdError(f"student.lora.target_modules: {str(exc).splitlines()[0]}") from None
    return model


def is_lora(model: nn.Module) -> bool:
    try:
        import peft
    except ImportError:
        return False
    return isinstance(model, peft.PeftModel)


def _plain_state(model: nn.Module, merged: bool) -> dict[str, torch.Tensor]:
    """The base model's state dict under its own names; merged: with (alpha / r) B A added to each W.

    Computed without touching the live model (no merge/unmerge round trip, so training state stays exact).
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    state = {k.replace(".base_layer.", "."): v.detach().cpu().clone() for k, v in base.state_dict().items()
             if "lora_" not in k}
    if merged:
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                for adapter in module.active_adapters:
                    delta = module.get_delta_weight(adapter).detach().cpu()
                    state[f"{name}.weight"] = state[f"{name}.weight"] + delta.to(state[f"{name}.weight"].dtype)
    return state


def save_lora_student(model: nn.Module, tokenizer, student_dir: Path, extra: dict[str, str] | None = None) -> None:
    """Write the merged student to student_dir and adapter + base beside it (see the module docstring)."""
    student_dir = Path(student_dir)
    lora_dir = student_dir.parent / "lora"
    base = model.get_base_model()

    def write_plain(merged: bool, files: dict[str, str]):
        def write(tmp: Path) -> None:
            # save_pretrained with an explicit state dict: the injected LoRA modules are not saved.
            base.save_pretrained(tmp, state_dict=_plain_state(model, merged), safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name, text in files.items():  # names may hold a folder: 1_Pooling/config.json
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_text(text)
        return write

    write_folder_atomic(lora_dir / "adapter", lambda tmp: model.save_pretrained(tmp, safe_serialization=True))
    write_folder_atomic(lora_dir / "base", write_plain(False, {}))
    write_folder_atomic(student_dir, write_plain(True, extra or {}))
