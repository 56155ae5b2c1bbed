"""Deriving, building, initialising and saving students (shdcli/models.py) for BERT, GPT-2 and Llama-GQA.

The initialisation checks read weights back in one orientation for every family (Linear: rows are
output features) and compare them with an index built by a plain loop, independent of models.py.
"""

from __future__ import annotations

import pytest
import torch

from shdcli import capture, shd
from shdcli.errors import ShdError
from shdcli.mapping import layer_pairs
from shdcli.models import (
    ModelShape,
    attention_params,
    build_student,
    decoder_layers,
    default_kv_heads,
    derive_student_config,
    init_student_from_teacher,
    model_shape,
    output_projection,
    save_model_folder,
)
from shdcli.shd import group_heads
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


def weights(layer) -> dict[str, torch.Tensor | None]:
    """q/k/v/o weights and biases of a layer in Linear orientation ([out, in]), whatever the family."""
    p = attention_params(layer)
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


def expected_rows(groups, reps, t_dim: int, s_dim: int) -> list[int | None]:
    """For each student row along a [heads * head_dim] axis, the teacher row it must hold (None: own init).

    Student head j = its group's teacher heads, representative first, concatenated, cut to s_dim.
    """
    rows: list[int | None] = []
    for group, rep in zip(groups, reps):
        order = [rep] + [h for h in group if h != rep]
        head_rows: list[int | None] = []
        for h in order:
            for i in range(t_dim):
                head_rows.append(h * t_dim + i)
        head_rows = head_rows[:s_dim]
        while len(head_rows) < s_dim:
            head_rows.append(None)
        rows.extend(head_rows)
    return rows


def assert_rows(student_w, teacher_w, rows, what: str, student_before=None) -> None:
    """student_w[r] == teacher_w[rows[r]] along dim 0 (or == the student's own init where rows[r] is None)."""
    assert student_w.shape[0] == len(rows), what
    n = min(student_w.shape[1], teacher_w.shape[1]) if student_w.dim() == 2 else None
    for r, src in enumerate(rows):
        got = student_w[r] if n is None else student_w[r, :n]
        if src is None:
            if student_before is not None:
                assert torch.equal(student_w[r], student_before[r]), f"{what}: row {r} should keep its init"
            continue
        want = teacher_w[src] if n is None else teacher_w[src, :n]
        assert torch.equal(got, want), f"{what}: student row {r} != teacher row {src}"


def kv_reference(groups, reps, s_heads, s_kv, t_heads, t_kv) -> tuple[list[list[int]], list[int]]:
    """Student key/value head m serves query heads m*r..; it starts from the teacher KV heads of the
    first of those query heads' group (representative's KV head first)."""
    s_rep, t_rep = s_heads // s_kv, t_heads // t_kv
    kv_groups, kv_reps = [], []
    for m in range(s_kv):
        j = m * s_rep
        rep = reps[j] // t_rep
        heads = []
        for h in [reps[j]] + groups[j]:
            if h // t_rep not in heads:
                heads.append(h // t_rep)
        kv_groups.append(heads)
        kv_reps.append(rep)
    return kv_groups, kv_reps


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
    w = weights(decoder_layers(student)[0])
    width = s.heads * s.head_dim
    assert w["q_w"].shape == (width, s.hidden)
    assert w["k_w"].shape == (s.kv_heads * s.head_dim, s.hidden)
    assert w["v_w"].shape == (s.kv_heads * s.head_dim, s.hidden)
    assert w["o_w"].shape == (s.hidden, width)
    if kind == "llama":
        # Explicit head_dim is kept: fewer heads means a narrower attention, same head size.
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
    assert model_shape(student.config).kv_heads == 2  # ratio 3 kept


def shape_of(heads: int, kv: int) -> ModelShape:
    return ModelShape("llama", 4, heads, kv, 8, heads * 8, None, None, None)


@pytest.mark.parametrize(
    "t_heads, t_kv, s_heads, expected",
    [
        (9, 3, 3, 1),  # SmolLM2 9/3 -> 3 heads: ratio 3 kept
        (9, 3, 6, 2),
        (9, 3, 9, 3),
        (12, 4, 6, 2),
        (32, 8, 24, 6),
        (8, 8, 6, 6),  # MHA stays MHA
        (6, 2, 4, 1),  # 4 * 2 // 6 = 1
        (12, 4, 8, 2),  # ratio 3 does not divide 8: round down to a divisor
        (12, 1, 5, 1),  # MQA stays MQA
    ],
)
def test_default_kv_heads(t_heads, t_kv, s_heads, expected):
    kv = default_kv_heads(shape_of(t_heads, t_kv), s_heads)
    assert kv == expected
    assert s_heads % kv == 0


def test_default_kv_heads_always_divides():
    for t_heads in range(1, 17):
        for t_kv in [d for d in range(1, t_heads + 1) if t_heads % d == 0]:
            for s_heads in range(1, t_heads + 1):
                kv = default_kv_heads(shape_of(t_heads, t_kv), s_heads)
                assert 1 <= kv <= s_heads and s_heads % kv == 0
                # Never more KV sharing than asked for relative to the teacher's ratio.
                assert kv <= max(1, s_heads * t_kv // t_heads)


# =========================================================================== init from teacher
def check_init(teacher, student, pairs, groups, reps):
    t_shape, s_shape = model_shape(teacher.config), model_shape(student.config)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    init_student_from_teacher(student, teacher, pairs, [groups] * len(pairs), [reps] * len(pairs))
    t_layers, s_layers = decoder_layers(teacher), decoder_layers(student)
    q_rows = expected_rows(groups, reps, t_shape.head_dim, s_shape.head_dim)
    kv_groups, kv_reps = kv_reference(groups, reps, s_shape.heads, s_shape.kv_heads, t_shape.heads, t_shape.kv_heads)
    kv_rows = expected_rows(kv_groups, kv_reps, t_shape.head_dim, s_shape.head_dim)
    for s_idx, t_idx in pairs:
        sw, tw = weights(s_layers[s_idx]), weights(t_layers[t_idx])
        prefix = f"layer {s_idx}<-{t_idx}"
        assert_rows(sw["q_w"], tw["q_w"], q_rows, f"{prefix} q")
        assert_rows(sw["k_w"], tw["k_w"], kv_rows, f"{prefix} k")
        assert_rows(sw["v_w"], tw["v_w"], kv_rows, f"{prefix} v")
        for name, rows in (("q_b", q_rows), ("k_b", kv_rows), ("v_b", kv_rows)):
            if sw[name] is not None:
                assert_rows(sw[name], tw[name], rows, f"{prefix} {name}")
        # o: columns are heads.
        assert_rows(sw["o_w"].t(), tw["o_w"].t(), q_rows, f"{prefix} o")
        if sw["o_b"] is not None:
            assert torch.equal(sw["o_b"], tw["o_b"])
    # Everything outside attention in a mapped layer is the teacher layer's, and embeddings are copied.
    t_state = teacher.state_dict()
    s_prefix = next(n for n, m in student.named_modules() if m is s_layers)
    t_prefix = next(n for n, m in teacher.named_modules() if m is t_layers)
    attn_words = ("q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "attention.output.dense",
                  "c_attn", "attn.c_proj")
    checked = 0
    for name, value in student.state_dict().items():
        if name.startswith(s_prefix + "."):
            idx, rest = name[len(s_prefix) + 1:].split(".", 1)
            if any(w in rest for w in attn_words):
                continue
            src = f"{t_prefix}.{dict(pairs)[int(idx)]}.{rest}"
        else:
            src = name
        if src in t_state:
            assert torch.equal(value, t_state[src]), f"{name} not copied from {src}"
            checked += 1
        else:
            assert torch.equal(value, before[name]), f"{name} has no teacher counterpart and must keep its init"
    assert checked > 10
    emb = student.get_input_embeddings().weight
    assert torch.equal(emb, teacher.get_input_embeddings().weight)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("rep_pick", ["first", "last"])
def test_init_copies_group_heads(teachers, kind, rep_pick):
    teacher, _, task = teachers[kind]
    student, pairs = derive(teacher, task, layers=2, heads=3)
    groups = group_heads(6, 3, "balanced")
    reps = [g[0] if rep_pick == "first" else g[-1] for g in groups]
    check_init(teacher, student, pairs, groups, reps)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_init_concatenates_group_heads(teachers, kind):
    """BERT/GPT-2: a student head of width 2 d starts as its two teacher heads side by side."""
    teacher, _, task = teachers[kind]
    student, pairs = derive(teacher, task, layers=2, heads=3)
    groups = group_heads(6, 3, "balanced")
    init_student_from_teacher(student, teacher, pairs, [groups] * 2)
    for s_idx, t_idx in pairs:
        sw, tw = weights(decoder_layers(student)[s_idx]), weights(decoder_layers(teacher)[t_idx])
        for name in ("q_w", "k_w", "v_w"):
            for j, group in enumerate(groups):
                want = torch.cat([tw[name][h * 8:(h + 1) * 8] for h in group])
                assert torch.equal(sw[name][j * 16:(j + 1) * 16], want), f"{name} head {j}"
        for j, group in enumerate(groups):
            want = torch.cat([tw["o_w"][:, h * 8:(h + 1) * 8] for h in group], dim=1)
            assert torch.equal(sw["o_w"][:, j * 16:(j + 1) * 16], want)


def test_init_uneven_groups_keep_student_init_for_missing_rows(teachers):
    """6 -> 4 heads on width 48 (head 12): a group of one 8-wide teacher head leaves 4 rows of init."""
    teacher, _, task = teachers["bert"]
    student, pairs = derive(teacher, task, layers=2, heads=4)
    before = [weights(layer) for layer in decoder_layers(student)]
    before = [{k: (v.clone() if v is not None else None) for k, v in w.items()} for w in before]
    groups = group_heads(6, 4, "balanced")  # {0,1} {2,3} {4} {5}
    init_student_from_teacher(student, teacher, pairs, [groups] * 2)
    rows = expected_rows(groups, [g[0] for g in groups], 8, 12)
    assert rows.count(None) == 8
    for s_idx, t_idx in pairs:
        sw, tw = weights(decoder_layers(student)[s_idx]), weights(decoder_layers(teacher)[t_idx])
        for name in ("q_w", "k_w", "v_w", "q_b"):
            assert_rows(sw[name], tw[name], rows, name, before[s_idx][name])
        assert_rows(sw["o_w"].t(), tw["o_w"].t(), rows, "o", before[s_idx]["o_w"].t())


@pytest.mark.parametrize("kind", FAMILIES)
def test_full_size_student_reproduces_teacher(teachers, kind):
    """Hs == Ht, every layer, init teacher: the copy must be the teacher, output for output."""
    teacher, tokenizer, task = teachers[kind]
    t = model_shape(teacher.config)
    student, pairs = derive(teacher, task, layers=t.layers, heads=t.heads)
    assert pairs == [(i, i) for i in range(t.layers)]
    groups = group_heads(t.heads, t.heads)
    init_student_from_teacher(student, teacher, pairs, [groups] * t.layers)
    t_state = teacher.state_dict()
    for name, value in student.state_dict().items():
        assert torch.equal(value, t_state[name]), name
    batch = make_batch(tokenizer)
    with torch.no_grad():
        want, got = teacher(**batch)[0], student(**batch)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# =========================================================================== saving
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_save_model_folder_loads(teachers, tmp_path, kind):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    teacher, tokenizer, task = teachers[kind]
    student, pairs = derive(teacher, task, layers=2, heads=3)
    init_student_from_teacher(student, teacher, pairs, [group_heads(6, 3)] * 2)
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
    o_module = attention_params(decoder_layers(teacher)[layer_idx]).o
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
