"""Deriving, building and saving students (shdcli/models/families.py) for BERT, GPT-2 and Llama-GQA.

How a student is initialised from its teacher is tested by behaviour in tests/test_student.py.
"""

from __future__ import annotations

import pytest
import torch

from shdcli.attention import capture, shd
from shdcli.errors import ShdError
from shdcli.models.families import (
    ModelShape,
    attention_params,
    decoder_layers,
    default_kv_heads,
    derive_student_config,
    model_shape,
    output_projection,
)
from shdcli.models.mapping import layer_pairs
from shdcli.models.sources import save_model_folder
from shdcli.students.derive import StudentShape, build_student, init_from_teacher
from shdcli.students.derive import derive as derive_keep
from tests.helpers import load_tiny, make_batch

FAMILIES = ["bert", "gpt2", "llama"]


@pytest.fixture(scope="module")
def teachers(tiny_models):
    """Perturbed tiny teachers, loaded once: kind -> (model, tokenizer, task)."""
    return {kind: load_tiny(tiny_models[kind], seed=i) for i, kind in enumerate(FAMILIES)}


def derive(teacher, task, layers: int, heads: int, kv_heads=None, hidden=None, intermediate=None, seed: int = 123):
    shape = model_shape(teacher.config)
    pairs = layer_pairs(shape.layers, layers, "auto")
    config = derive_student_config(teacher.config, pairs, heads, kv_heads, hidden, intermediate)
    torch.manual_seed(seed)
    return build_student(teacher, config, task).eval(), pairs


def weights(layer, config) -> dict[str, torch.Tensor | None]:
    """q/k/v/o weights and biases of a layer in Linear orientation ([out, in]), whatever the family."""
    p = attention_params(layer, config)
    if p.fused_qkv is not None:  # GPT-2 Conv1D: weight [D, 3 W], x @ W
        w, b = p.fused_qkv.weight, p.fused_qkv.bias
        width = w.shape[1] // 3
        out = {}
        for i, name in enumerate("qkv"):
            out[f"{name}_w"] = w[:, i * width:(i + 1) * width].t()
            out[f"{name}_b"] = b[i * width:(i + 1) * width]
        out["o_w"], out["o_b"] = p.o.weight.t(), p.o.bias
        return out
    return {
        "q_w": p.q.weight, "q_b": p.q.bias, "k_w": p.k.weight, "k_b": p.k.bias,
        "v_w": p.v.weight, "v_b": p.v.bias, "o_w": p.o.weight, "o_b": p.o.bias,
    }


# =========================================================================== derive / build
@pytest.mark.parametrize("kind", FAMILIES)
def test_derive_and_build_shapes(teachers, kind):
    teacher, _, task = teachers[kind]
    t = model_shape(teacher.config)
    student, pairs = derive(teacher, task, layers=2, heads=3)
    s = model_shape(student.config)
    assert (s.layers, s.heads, s.hidden, s.vocab, s.max_positions) == (2, 3, t.hidden, t.vocab, t.max_positions)
    assert s.heads % s.kv_heads == 0
    assert len(decoder_layers(student)) == 2
    assert student.config.architectures == teacher.config.architectures
    assert type(student) is type(teacher)
    w = weights(decoder_layers(student)[0], student.config)
    width = s.heads * s.head_dim
    assert w["q_w"].shape == (width, s.hidden)
    assert w["k_w"].shape == (s.kv_heads * s.head_dim, s.hidden)
    assert w["v_w"].shape == (s.kv_heads * s.head_dim, s.hidden)
    assert w["o_w"].shape == (s.hidden, width)
    if kind == "llama":
        # Explicit head_dim is kept: fewer heads means a narrower attention, same head size; one
        # student head per teacher KV head (6 heads in 2 KV heads -> 3 heads: groups inside KV heads).
        assert s.head_dim == t.head_dim == 8 and s.kv_heads == 1
    else:
        assert s.head_dim == t.hidden // 3 == 16
    # The teacher's config is untouched.
    assert model_shape(teacher.config) == t


@pytest.mark.parametrize("kind", FAMILIES)
def test_derive_width_and_intermediate(teachers, kind):
    teacher, tokenizer, task = teachers[kind]
    student, _ = derive(teacher, task, layers=2, heads=3, hidden=24, intermediate=40)
    s = model_shape(student.config)
    assert s.hidden == 24 and s.intermediate == 40
    # The narrower student is built and runs.
    out = student(**make_batch(tokenizer))
    assert torch.isfinite(out[0]).all()


def test_derive_width_not_divisible_by_heads(teachers):
    teacher, _, task = teachers["bert"]
    with pytest.raises(ShdError, match="hidden size 48 is not divisible by 5 heads"):
        derive(teacher, task, layers=2, heads=5)


def test_derive_llama_explicit_kv_heads(teachers):
    teacher, _, task = teachers["llama"]
    student, _ = derive(teacher, task, layers=2, heads=6, kv_heads=3)
    assert model_shape(student.config).kv_heads == 3
    student, _ = derive(teacher, task, layers=2, heads=6)
    assert model_shape(student.config).kv_heads == 2  # the teacher's KV heads


def shape_of(heads: int, kv: int) -> ModelShape:
    return ModelShape("llama", 4, heads, kv, 8, heads * 8, None, None, None)


@pytest.mark.parametrize(
    "t_heads, t_kv, s_heads, expected",
    [
        (9, 3, 3, 3),  # SmolLM2 9/3 -> 3 heads: one student head per teacher KV head (the head groups)
        (9, 3, 6, 3),
        (9, 3, 9, 3),
        (12, 4, 6, 3),  # 3 kept KV heads of 2 query heads each
        (32, 8, 24, 8),
        (8, 8, 6, 6),  # MHA stays MHA
        (6, 2, 4, 2),
        (6, 2, 3, 1),  # 3 heads cannot split over 2 KV heads: one kept KV head with 3 query heads
        (12, 4, 8, 4),
        (12, 1, 5, 1),  # MQA stays MQA
    ],
)
def test_default_kv_heads(t_heads, t_kv, s_heads, expected):
    kv = default_kv_heads(shape_of(t_heads, t_kv), s_heads)
    assert kv == expected
    assert s_heads % kv == 0


def test_default_kv_heads_always_divides_and_never_splits_a_teacher_kv_head():
    for t_heads in range(1, 17):
        for t_kv in [d for d in range(1, t_heads + 1) if t_heads % d == 0]:
            for s_heads in range(1, t_heads + 1):
                kv = default_kv_heads(shape_of(t_heads, t_kv), s_heads)
                assert 1 <= kv <= s_heads and s_heads % kv == 0
                if t_kv < t_heads:  # GQA: each student KV head stands for one teacher KV head
                    assert kv <= t_kv


# =========================================================================== saving
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_save_model_folder_loads(teachers, tmp_path, kind):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    teacher, tokenizer, task = teachers[kind]
    student, pairs = derive(teacher, task, layers=2, heads=3)
    s = model_shape(student.config)
    kept = derive_keep(teacher, task, StudentShape(2, 3, s.kv_heads, s.hidden, s.intermediate), "uniform",
                       "balanced", [])
    init_from_teacher(student, teacher, kept)
    target = tmp_path / "out" / "student"
    save_model_folder(student, tokenizer, target, {"shd_plan.json": "{}"})
    assert (target / "config.json").exists() and (target / "model.safetensors").exists()
    assert (target / "shd_plan.json").read_text() == "{}"
    cls = AutoModelForCausalLM if kind == "llama" else AutoModel
    loaded = cls.from_pretrained(target).eval()
    loaded_tok = AutoTokenizer.from_pretrained(target)
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()
    batch = make_batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch)[0], student(**batch)[0])
    assert not [p.name for p in target.parent.iterdir() if p.name != "student"], "no temporary folders left"


def test_save_model_folder_replaces_whole_folder(teachers, tmp_path):
    teacher, tokenizer, _ = teachers["bert"]
    target = tmp_path / "student"
    target.mkdir()
    (target / "stale.bin").write_text("old weights")
    (target / "config.json").write_text("{}")
    save_model_folder(teacher, tokenizer, target)
    assert not (target / "stale.bin").exists()
    assert (target / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_save_model_folder_failure_keeps_old_folder(teachers, tmp_path, monkeypatch):
    teacher, tokenizer, _ = teachers["bert"]
    target = tmp_path / "student"
    target.mkdir()
    (target / "config.json").write_text('{"old": true}')

    class Broken:
        def save_pretrained(self, path):
            (path / "partial").write_text("half")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_model_folder(teacher, Broken(), target)
    assert (target / "config.json").read_text() == '{"old": true}'
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"], "the temporary folder was removed"


# =========================================================================== output projection
@pytest.mark.parametrize("kind", FAMILIES)
def test_output_projection_orientation(teachers, kind):
    """attention output == sum_h (A_h V_h) W_O[h] + bias, from captured q/k/v and the real module output."""
    teacher, tokenizer, _ = teachers[kind]
    shape = model_shape(teacher.config)
    capture.enable(teacher)
    layer_idx = 1
    o_module = attention_params(decoder_layers(teacher)[layer_idx], teacher.config).o
    seen = {}
    hook = o_module.register_forward_hook(lambda m, i, o: seen.setdefault("out", o.detach()))
    recorder = capture.AttentionRecorder({layer_idx}, keep_values=True)
    batch = make_batch(tokenizer)
    try:
        with torch.no_grad(), recorder.active():
            teacher(**batch)
    finally:
        hook.remove()
    rec = recorder.records[layer_idx]
    n = rec.query.shape[2]
    maps = shd.attention_maps(rec.query, rec.keys_per_head(), rec.scaling, rec.allowed_rows(0, n))  # [B, H, N, M]
    heads_out = torch.matmul(maps, rec.values_per_head())  # [B, H, N, d]
    w_o = output_projection(teacher, layer_idx)  # [H d, D]
    assert w_o.shape == (shape.heads * shape.head_dim, shape.hidden)
    want = sum(heads_out[:, h] @ w_o[h * shape.head_dim:(h + 1) * shape.head_dim] for h in range(shape.heads))
    if o_module.bias is not None:
        want = want + o_module.bias
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(seen["out"][real], want[real], rtol=1e-4, atol=1e-5)
