"""Layer pairs, model shapes from family-specific configs, and the distillation plan (shdcli/models/mapping.py)."""

from __future__ import annotations

import pytest
from rich.console import Console
from transformers import BertConfig, GPT2Config, LlamaConfig

from shdcli.errors import ShdError
from shdcli.models.families import ModelShape, model_shape
from shdcli.models.mapping import Plan, format_groups, layer_pairs, make_plan, plan_table


# =========================================================================== layer pairs
def ref_teacher_layer(i: int, lt: int, ls: int) -> int:
    """ceil((i + 1) * Lt / Ls) - 1 in exact integer arithmetic (no floats)."""
    num = (i + 1) * lt
    return -(-num // ls) - 1


@pytest.mark.parametrize("lt", range(1, 41))
def test_auto_pairs_match_reference(lt):
    for ls in range(1, lt + 1):
        pairs = layer_pairs(lt, ls, "auto")
        assert pairs == [(i, ref_teacher_layer(i, lt, ls)) for i in range(ls)]
        teacher = [t for _, t in pairs]
        assert teacher[-1] == lt - 1, "last layers are aligned"
        assert all(a < b for a, b in zip(teacher, teacher[1:])), "teacher layers strictly increase"
        assert all(0 <= t < lt for t in teacher)


def test_auto_pairs_known_values():
    assert layer_pairs(12, 4, "auto") == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert layer_pairs(6, 6, "auto") == [(i, i) for i in range(6)]
    assert layer_pairs(30, 4, "auto") == [(0, 7), (1, 14), (2, 22), (3, 29)]
    assert layer_pairs(5, 1, "auto") == [(0, 4)]


def test_last_pairs():
    assert layer_pairs(12, 4, "last") == [(3, 11)]
    assert layer_pairs(1, 1, "last") == [(0, 0)]


def test_explicit_pairs():
    assert layer_pairs(12, 4, [[0, 0], [3, 11]]) == [(0, 0), (3, 11)]
    assert layer_pairs(12, 4, [(1, 5)]) == [(1, 5)]
    # A teacher layer may serve two student layers; a student layer may not learn from two.
    assert layer_pairs(12, 4, [[0, 5], [1, 5]]) == [(0, 5), (1, 5)]


@pytest.mark.parametrize("pair", [[4, 0], [-1, 0], [0, 12], [0, -1]])
def test_explicit_pairs_out_of_range(pair):
    with pytest.raises(ShdError) as info:
        layer_pairs(12, 4, [pair])
    message = str(info.value)
    assert message.startswith("distill.layers:") and "out of range" in message
    assert "0..3" in message and "0..11" in message


def test_explicit_pairs_duplicate_student_layer():
    with pytest.raises(ShdError, match="distill.layers: a student layer appears twice"):
        layer_pairs(12, 4, [[1, 2], [1, 3]])


def test_student_with_more_layers_is_an_error():
    for spec in ("auto", "last", [[0, 0]]):
        with pytest.raises(ShdError) as info:
            layer_pairs(4, 6, spec)
        assert "(6)" in str(info.value) and "(4)" in str(info.value)


# =========================================================================== model shapes
def test_shape_bert():
    config = BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                        intermediate_size=96, max_position_embeddings=64)
    assert model_shape(config) == ModelShape("bert", 3, 6, 6, 8, 48, 96, 100, 64)


def test_shape_gpt2_names():
    config = GPT2Config(vocab_size=100, n_layer=5, n_head=4, n_embd=32, n_positions=128)
    assert model_shape(config) == ModelShape("gpt2", 5, 4, 4, 8, 32, 128, 100, 128)  # n_inner None -> 4 D
    config = GPT2Config(vocab_size=100, n_layer=5, n_head=4, n_embd=32, n_positions=128, n_inner=50)
    assert model_shape(config).intermediate == 50


def test_shape_gpt2_from_raw_dict_names():
    # A config.json written with GPT-2's own names only.
    config = GPT2Config.from_dict({"model_type": "gpt2", "n_layer": 2, "n_head": 3, "n_embd": 24, "vocab_size": 50})
    shape = model_shape(config)
    assert (shape.layers, shape.heads, shape.hidden, shape.head_dim) == (2, 3, 24, 8)


def test_shape_llama_gqa():
    config = LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=256)
    shape = model_shape(config)
    # head_dim is explicit (16), not hidden / heads (8).
    assert shape == ModelShape("llama", 4, 8, 2, 16, 64, 128, 100, 256)


def test_shape_llama_without_kv_heads_is_mha():
    config = LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=None)
    shape = model_shape(config)
    assert shape.kv_heads == 8 and shape.head_dim == 8


def test_shape_smollm2_like():
    config = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152)
    shape = model_shape(config)
    assert (shape.layers, shape.heads, shape.kv_heads, shape.head_dim) == (30, 9, 3, 64)


def test_shape_gemma3_multimodal_reads_the_text_config():
    from transformers import Gemma3Config

    config = Gemma3Config(text_config={"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
                                       "head_dim": 32, "hidden_size": 64, "intermediate_size": 128,
                                       "vocab_size": 100, "max_position_embeddings": 512})
    shape = model_shape(config)
    assert shape == ModelShape("gemma3_text", 4, 8, 4, 32, 64, 128, 100, 512)


def test_shape_unknown_config_is_a_clean_error():
    from transformers import PretrainedConfig

    config = PretrainedConfig()
    config.model_type = "mystery"
    with pytest.raises(ShdError, match="'mystery'"):
        model_shape(config)


# =========================================================================== plan
def shape(layers: int, heads: int, kv: int | None = None, head_dim: int = 8) -> ModelShape:
    kv = heads if kv is None else kv
    return ModelShape("llama", layers, heads, kv, head_dim, heads * head_dim, 4 * heads * head_dim, 100, 256)


def test_plan_balanced_groups():
    plan = make_plan(shape(12, 12), shape(4, 4), "auto", "balanced")
    assert isinstance(plan, Plan)
    assert plan.pairs == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert plan.groups == [[[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]] * 4
    assert plan.representatives == [[0, 3, 6, 9]] * 4
    # Groups are independent lists per layer (calibration may replace one layer's groups).
    plan.groups[0][0].append(99)
    assert plan.groups[1][0] == [0, 1, 2]


def test_plan_uneven_and_pairs_grouping():
    plan = make_plan(shape(4, 12), shape(2, 5), "last", "balanced")
    assert plan.pairs == [(1, 3)]
    assert plan.groups == [[[0, 1, 2], [3, 4, 5], [6, 7], [8, 9], [10, 11]]]
    plan = make_plan(shape(4, 9, 3), shape(2, 3, 1), "auto", "pairs")
    for groups in plan.groups:
        assert sorted(h for g in groups for h in g) == list(range(9))
        assert len(groups) == 3
        assert all(g == list(range(g[0], g[0] + len(g))) for g in groups), "contiguous groups"
    assert plan.representatives == [[g[0] for g in groups] for groups in plan.groups]


def test_plan_equal_heads_is_identity():
    plan = make_plan(shape(6, 6), shape(6, 6), "auto", "balanced")
    assert plan.groups == [[[h] for h in range(6)]] * 6


def test_plan_student_more_heads_names_both_counts():
    with pytest.raises(ShdError) as info:
        make_plan(shape(4, 6), shape(2, 8), "auto", "balanced")
    message = str(info.value)
    assert "(8)" in message and "(6)" in message and "heads" in message


def test_plan_to_dict_is_json():
    import json

    plan = make_plan(shape(4, 6, 2), shape(2, 3, 1), [[0, 1], [1, 3]], "balanced")
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["layers"] == [[0, 1], [1, 3]]
    assert data["groups"] == [[[0, 1], [2, 3], [4, 5]]] * 2
    assert data["teacher"]["heads"] == 6 and data["student"]["kv_heads"] == 1


def test_plan_table_renders():
    plan = make_plan(shape(12, 12, 4), shape(4, 4, 2), "auto", "balanced")
    console = Console(record=True, width=200)
    console.print(plan_table(plan))
    text = console.export_text()
    assert "teacher 12L x 12H (kv 4) -> student 4L x 4H (kv 2)" in text
    assert "0<-{0,1,2}" in text and "3<-{9,10,11}" in text
    lines = [line for line in text.splitlines() if "<-{" in line]
    assert len(lines) == 4
    for (s, t), line in zip(plan.pairs, lines):
        cells = [c.strip() for c in line.split("│") if c.strip()]
        assert cells[0] == str(s) and cells[1] == str(t)


def test_format_groups():
    assert format_groups([[0, 1], [2]]) == "{0,1} {2}"


# --------------------------------------------------------------------------- {every: N} / {last: N} / {first: N}
@pytest.mark.parametrize("spec,expected", [
    ({"last": 1}, [(5, 5)]),
    ({"last": 3}, [(3, 3), (4, 4), (5, 5)]),
    ({"every": 1}, [(i, i) for i in range(6)]),
    ({"every": 2}, [(1, 1), (3, 3), (5, 5)]),
    ({"every": 4}, [(1, 1), (5, 5)]),
    ({"every": 9}, [(5, 5)]),
    ({"first": 1}, [(0, 0)]),
    ({"first": 5}, [(i, i) for i in range(5)]),
    ({"first": 6}, [(i, i) for i in range(6)]),
])
def test_layer_subsets_of_a_same_depth_student(spec, expected):
    assert layer_pairs(6, 6, spec) == expected


def test_layer_subsets_use_the_auto_rule_for_the_teacher_layer():
    auto = dict(layer_pairs(30, 6, "auto"))
    assert layer_pairs(30, 6, {"last": 2}) == [(4, auto[4]), (5, 29)]
    assert layer_pairs(30, 6, {"every": 3}) == [(2, auto[2]), (5, 29)]
    assert layer_pairs(30, 6, {"first": 2}) == [(0, auto[0]), (1, auto[1])]


def test_layer_subsets_from_a_recipe_and_their_errors():
    from shdcli.recipe import validate_recipe

    base = {"teacher": "t", "student": {"path": "s"}, "data": {"path": "d.txt"}}
    recipe = validate_recipe({**base, "distill": {"layers": {"every": 2}}})
    assert layer_pairs(4, 4, recipe.distill.layers) == [(1, 1), (3, 3)]
    assert validate_recipe({**base, "distill": {"layers": "last"}}).distill.layers == "last"
    assert validate_recipe({**base, "distill": {"layers": [[0, 1]]}}).distill.layers == [(0, 1)]
    with pytest.raises(ShdError, match="distill.layers"):
        validate_recipe({**base, "distill": {"layers": {"every": 0}}})
    assert validate_recipe({**base, "distill": {"layers": {"first": 2}}}).distill.layers == {"first": 2}
    with pytest.raises(ShdError, match="distill.layers"):
        validate_recipe({**base, "distill": {"layers": {"top": 2}}})
    with pytest.raises(ShdError, match=r"distill.layers: last: 5 is more than the student's 4 layers; choose 1..4"):
        layer_pairs(6, 4, {"last": 5})
    with pytest.raises(ShdError, match=r"distill.layers: first: 5 is more than the student's 4 layers; choose 1..4"):
        layer_pairs(6, 4, {"first": 5})
    with pytest.raises(ShdError, match=r"distill.layers: every: 0 must be a whole number >= 1"):
        layer_pairs(6, 4, {"every": 0})
    with pytest.raises(ShdError, match=r"not a layer selection; write \{every: N\}, \{last: N\} or \{first: N\}"):
        layer_pairs(6, 4, {"every": 2, "last": 1})
