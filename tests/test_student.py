"""Derived students (shdcli/students/derive.py, pruning.py): each defect of the old init has a behavioural test.

The references here are brute force: attention scores recomputed from captured q/k, layers removed
by trying every choice, parameter counts of really built models.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from shdcli.attention import capture
from shdcli.errors import ShdError
from shdcli.models.families import attention_params, decoder_layers, has_fixed_head_dim, model_shape
from shdcli.models.sources import count_parameters
from shdcli.students import pruning
from shdcli.students.derive import (
    StudentShape,
    build_student,
    config_counter,
    derive,
    init_from_teacher,
    kv_plan,
    resolve_shape,
    student_config,
)
from tests.tiny import make_tiny

TASK = {"llama": "causal-lm", "gpt2": "causal-lm", "bert": "encoder"}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("student_teachers")
    out = {}
    for kind in ("llama", "gpt2", "bert"):
        cls = AutoModel if kind == "bert" else AutoModelForCausalLM
        # llama: 6 heads in 2 KV heads (3 query heads each), like SmolLM2's 9 in 3
        folder = make_tiny(kind, root / kind, layers=4, heads=6, kv_heads=2, hidden=48)
        out[kind] = cls.from_pretrained(folder).eval()
    return out


def batch(seed: int = 0, rows: int = 3, n: int = 14) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 380, (rows, n), generator=gen)
    mask = torch.ones_like(ids)
    mask[-1, n - 4:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def derived(teacher, kind, shape, prune="uniform", batches=None):
    d = derive(teacher, TASK[kind], shape, prune, "balanced", batches or [batch()])
    student = build_student(teacher, student_config(teacher.config, d.layers, shape), TASK[kind]).eval()
    init_from_teacher(student, teacher, d)
    return student, d


def output(model, kind, b):
    out = model(**b)
    hidden = out.last_hidden_state if kind == "bert" else out.logits
    return hidden * b["attention_mask"][..., None]


def make_groups_identical(teacher, kind, groups: list[list[int]]) -> None:
    """Every head of a group becomes a copy of the group's first head (q, k, v; MHA: per head)."""
    shape = model_shape(teacher.config)
    d = shape.head_dim
    with torch.no_grad():
        for layer in decoder_layers(teacher):
            p = attention_params(layer, teacher.config)
            for g in groups:
                for h in g[1:]:
                    if p.fused_qkv is not None:  # GPT-2 Conv1D [D, 3D]
                        for part in range(3):
                            dst, src = part * shape.hidden + h * d, part * shape.hidden + g[0] * d
                            p.fused_qkv.weight[:, dst:dst + d] = p.fused_qkv.weight[:, src:src + d]
                            p.fused_qkv.bias[dst:dst + d] = p.fused_qkv.bias[src:src + d]
                        continue
                    mods = [p.q] if kind == "llama" else [p.q, p.k, p.v]  # llama groups share their KV head
                    for mod in mods:
                        mod.weight[h * d:(h + 1) * d] = mod.weight[g[0] * d:(g[0] + 1) * d]
                        if mod.bias is not None:
                            mod.bias[h * d:(h + 1) * d] = mod.bias[g[0] * d:(g[0] + 1) * d]


# --------------------------------------------------------------------------- defect 1: GQA pairing
def test_default_kv_heads_follow_head_groups():
    assert pruning.kv_layout(9, 3, 3, None) == (3, 1)  # SmolLM2 9 -> 3: one student head per teacher KV head
    assert pruning.kv_layout(9, 3, 6, None) == (3, 2)
    assert pruning.kv_layout(9, 3, 4, None) == (2, 2)  # 4 heads: 2 kept KV heads, 2 query heads each
    assert pruning.kv_layout(12, 12, 4, None) == (4, 1)  # MHA: no sharing to respect
    with pytest.raises(ValueError, match="use kv_heads 2 or 3"):
        pruning.kv_layout(9, 3, 6, 1)  # 6 query heads cannot all come from one teacher KV head of 3


def test_gqa_student_heads_score_with_their_own_keys(teachers):
    """Each student head's scores equal the mean of its group's teacher scores: its q and k come from
    the same teacher KV head (the old init paired two of three heads with the wrong keys)."""
    teacher = teachers["llama"]
    shape = StudentShape(4, 2, 2, 48, model_shape(teacher.config).intermediate)
    student, d = derived(teacher, "llama", shape)
    assert d.kv_sources == [[0, 1]] * 4 and d.groups[0] == [[0, 1, 2], [3, 4, 5]]
    b = batch()
    records = {}
    for name, model in (("t", teacher), ("s", student)):
        capture.enable(model)
        rec = capture.AttentionRecorder({0})
        with torch.no_grad(), rec.active():
            model(**b)
        records[name] = rec.records[0]
    t, s = records["t"], records["s"]
    t_scores = t.query @ t.keys_per_head().transpose(-1, -2)  # [B, 6, N, N], layer 0 sees identical inputs
    s_scores = s.query @ s.keys_per_head().transpose(-1, -2)  # [B, 2, N, N]
    for j, group in enumerate(d.groups[0]):
        torch.testing.assert_close(s_scores[:, j], t_scores[:, group].mean(1), atol=1e-5, rtol=1e-4)


def test_fewer_kv_heads_keep_whole_teacher_kv_groups(teachers):
    teacher = teachers["llama"]
    scores = torch.tensor([0.1, 0.1, 0.1, 5.0, 1.0, 1.0])  # teacher KV head 1 (heads 3-5) matters most
    kept, blocks, per_block = kv_plan(model_shape(teacher.config), StudentShape(4, 3, 1, 48, 96), scores)
    assert kept == [1] and blocks == [[3, 4, 5]] and per_block == 3


def test_calibrated_groups_stay_inside_kv_heads(teachers):
    from shdcli.models.grouping import calibrate_teacher

    teacher = teachers["llama"]
    blocks = {1: [[0, 1, 2], [3, 4, 5]]}
    chosen = calibrate_teacher(teacher, [1], [batch(), batch(1)], 2, blocks=blocks)
    for g in chosen[1].groups:
        assert set(g) <= {0, 1, 2} or set(g) <= {3, 4, 5}
    assert len(chosen[1].groups) == 4 and sorted(h for g in chosen[1].groups for h in g) == list(range(6))


# --------------------------------------------------------------------------- defects 2 and 5: merged heads
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_group_of_identical_heads_is_reproduced_exactly(teachers, kind):
    """A group of k identical heads writes k x one head's output; the merged student head (W_O summed,
    or the rescaled concatenation for BERT/GPT-2) must write exactly that, with the same map."""
    teacher = type(teachers[kind])(teachers[kind].config).eval()
    teacher.load_state_dict(teachers[kind].state_dict())
    make_groups_identical(teacher, kind, [[0, 1, 2], [3, 4, 5]])
    t_shape = model_shape(teacher.config)
    student, _ = derived(teacher, kind, StudentShape(4, 2, 2, 48, t_shape.intermediate))
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(output(student, kind, b), output(teacher, kind, b), atol=2e-5, rtol=1e-4)


def test_merged_head_reads_the_group_sum(teachers):
    """W_O of a GQA student head is the sum of its group's W_O blocks (the squeeze's S = sum_h X_h)."""
    teacher = teachers["llama"]
    student, d = derived(teacher, "llama", StudentShape(4, 2, 2, 48, 96))
    t_o = decoder_layers(teacher)[0].self_attn.o_proj.weight
    s_o = decoder_layers(student)[0].self_attn.o_proj.weight
    dim = 8
    for j, group in enumerate(d.groups[0]):
        expected = sum(t_o[:, h * dim:(h + 1) * dim] for h in group)
        torch.testing.assert_close(s_o[:, j * dim:(j + 1) * dim], expected)


def test_full_size_student_reproduces_teacher(teachers):
    for kind, teacher in teachers.items():
        t = model_shape(teacher.config)
        student, _ = derived(teacher, kind, StudentShape(t.layers, t.heads, t.kv_heads, t.hidden, t.intermediate))
        b = batch()
        with torch.no_grad():
            torch.testing.assert_close(output(student, kind, b), output(teacher, kind, b), atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------- defect 3: depth
def _brute_force_drop(teacher, kind, b, drop: int) -> list[int]:
    """Try every set of `drop` skipped layers; return the kept layers of the best set."""
    layers = model_shape(teacher.config).layers
    with torch.no_grad():
        ref = pruning._output(teacher, b, TASK[kind])
        best = None
        for removed in itertools.combinations(range(layers), drop):
            with pruning.skipping(teacher, removed):
                dist = pruning.output_distance(ref, pruning._output(teacher, b, TASK[kind]), b, TASK[kind])
            if best is None or dist < best[0]:
                best = (dist, removed)
    return sorted(set(range(layers)) - set(best[1]))


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_depth_choice_removes_the_layer_that_matters_least(teachers, kind):
    teacher = teachers[kind]
    b = batch()
    choice = pruning.choose_layers(teacher, [b], 3, TASK[kind])
    assert choice.kept == _brute_force_drop(teacher, kind, b, 1)


def test_near_identity_layers_are_dropped_first(teachers):
    """Blocks that write (almost) nothing into the residual stream are the ones to remove."""
    teacher = type(teachers["llama"])(teachers["llama"].config).eval()
    teacher.load_state_dict(teachers["llama"].state_dict())
    with torch.no_grad():
        for i in (1, 2):
            block = decoder_layers(teacher)[i]
            block.self_attn.o_proj.weight.mul_(1e-3)
            block.mlp.down_proj.weight.mul_(1e-3)
    choice = pruning.choose_layers(teacher, [batch()], 2, "causal-lm")
    assert choice.kept == [0, 3]
    assert all(choice.scores[i] < choice.scores[0] for i in (1, 2))


def test_skipping_restores_the_model(teachers):
    teacher, b = teachers["llama"], batch()
    with torch.no_grad():
        before = teacher(**b).logits
        with pruning.skipping(teacher, [0, 2]):
            skipped = teacher(**b).logits
        after = teacher(**b).logits
    assert not torch.allclose(before, skipped) and torch.equal(before, after)


# --------------------------------------------------------------------------- defect 4: width
def test_dead_neurons_are_pruned_first_and_exactly(teachers):
    """MLP neurons that never fire carry no importance: pruning exactly those leaves the model unchanged."""
    teacher = type(teachers["llama"])(teachers["llama"].config).eval()
    teacher.load_state_dict(teachers["llama"].state_dict())
    dead = list(range(0, 96, 2))  # half of the 96 neurons of every layer
    with torch.no_grad():
        for block in decoder_layers(teacher):
            block.mlp.gate_proj.weight[dead] = 0.0
            block.mlp.up_proj.weight[dead] = 0.0
    t = model_shape(teacher.config)
    shape = StudentShape(t.layers, t.heads, t.kv_heads, t.hidden, 48)
    student, d = derived(teacher, "llama", shape, prune="importance")
    assert all(n == list(range(1, 96, 2)) for n in d.neurons)
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(output(student, "llama", b), output(teacher, "llama", b), atol=2e-5, rtol=1e-4)


def test_loud_channels_are_kept(teachers):
    teacher = type(teachers["bert"])(teachers["bert"].config).eval()
    teacher.load_state_dict(teachers["bert"].state_dict())
    loud = [5, 17, 30, 41]
    with torch.no_grad():
        for module in teacher.modules():
            if "LayerNorm" in type(module).__name__:
                module.weight[loud] *= 20.0
    imp = pruning.width_importance(teacher, [batch()])
    assert set(loud) <= set(pruning.top_indices(imp.channels, 8))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_importance_pruned_students_build_and_run(teachers, kind):
    teacher = teachers[kind]
    t = model_shape(teacher.config)
    shape = StudentShape(2, 2, 2, 32 if kind != "llama" else 40, 64)  # 40: Llama widths need not divide heads
    student, d = derived(teacher, kind, shape, prune="importance")
    assert len(d.channels) == shape.hidden and d.layers == sorted(d.layers) and len(d.layers) == 2
    assert count_parameters(student) < count_parameters(teacher)
    b = batch()
    assert torch.isfinite(output(student, kind, b)).all() and t.hidden > shape.hidden


def test_a_narrower_gpt2_keeps_the_mlp_width_it_was_given(teachers):
    """GPT-2's n_inner null means 4 x the width: a student narrowed to 24 channels keeps the MLP width its
    shape names (the teacher's 192), not 4 x 24, and its neurons are the ones derive chose."""
    teacher = teachers["gpt2"]
    t = model_shape(teacher.config)
    assert teacher.config.n_inner is None and t.intermediate == 192
    for mlp, prune in ((t.intermediate, "uniform"), (t.intermediate // 2, "importance")):
        student, d = derived(teacher, "gpt2", StudentShape(2, 2, 2, 24, mlp), prune=prune)
        assert decoder_layers(student)[0].mlp.c_fc.weight.shape == (24, mlp)  # Conv1D [in, out]
        assert model_shape(student.config).intermediate == mlp
        assert all(n is None if mlp == t.intermediate else len(n) == mlp for n in d.neurons)


# --------------------------------------------------------------------------- target size
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_params_target_gives_the_largest_shape_on_the_path_that_fits(teachers, kind):
    teacher = teachers[kind]
    t = model_shape(teacher.config)
    count = config_counter(teacher, TASK[kind])
    full = count_parameters(teacher)
    shape = resolve_shape(t, None, 2, None, None, None, 0.5, count, has_fixed_head_dim(teacher.config))
    student = build_student(teacher, student_config(teacher.config, pruning.uniform_layers(t.layers, shape.layers),
                                                    shape), TASK[kind])
    assert count(shape) == count_parameters(student) <= 0.5 * full
    assert count(shape) > 0.3 * full  # it stopped as soon as it fit, not at the floor


def test_params_target_that_cannot_fit_names_the_fix(teachers):
    teacher = teachers["llama"]
    t = model_shape(teacher.config)
    with pytest.raises(ShdError, match="student.from_teacher.params: .*raise params"):
        resolve_shape(t, 4, 6, 2, 48, 96, 0.1, config_counter(teacher, "causal-lm"), True)
