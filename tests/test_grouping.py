"""Calibrated head grouping (shdcli/models/grouping.py): statistics vs direct squeeze math, search
validity and optimality on small cases, permuted copies, determinism, and the training path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shdcli.attention import shd
from shdcli.attention.capture import LayerRecord
from shdcli.models import grouping


def random_layer(b: int, h: int, n: int, width: int, seed: int, sharp: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    maps = torch.softmax(sharp * torch.randn(b, h, n, n, generator=gen), dim=-1)
    feats = torch.randn(b, h, n, width, generator=gen)
    return maps, feats


def direct_errors(maps, feats, groups, mode="lsq", row_mask=None):
    """Mean over samples of shd.reconstruction_error per group (the obviously-correct path)."""
    if row_mask is not None:
        maps = maps * row_mask[:, None, :, None]
    out = []
    for g in groups:
        w = shd.solve_weights(*shd.squeeze_statistics(maps[:, g], feats[:, g]), mode)
        out.append(shd.reconstruction_error(maps[:, g], feats[:, g], w))
    return out


def balanced_partitions(ht: int, hs: int):
    """Every partition of range(ht) into groups with the balanced size multiset (brute force)."""
    sizes = sorted(len(g) for g in shd.group_heads(ht, hs, "balanced"))

    def rec(left: tuple[int, ...], need: list[int]):
        if not left:
            yield []
            return
        first, rest = left[0], left[1:]
        for size in sorted(set(need)):
            import itertools

            for others in itertools.combinations(rest, size - 1):
                group = (first, *others)
                remaining = tuple(h for h in rest if h not in others)
                need2 = list(need)
                need2.remove(size)
                for tail in rec(remaining, need2):
                    yield [group, *tail]

    yield from rec(tuple(range(ht)), sizes)


def check_partition(groups: list[list[int]], ht: int, hs: int) -> None:
    flat = sorted(h for g in groups for h in g)
    assert flat == list(range(ht)), groups  # every head exactly once
    assert sorted(len(g) for g in groups) == sorted(len(g) for g in shd.group_heads(ht, hs, "balanced"))


# --------------------------------------------------------------------------- statistics
def test_head_statistics_matches_loop_reference_with_row_mask():
    maps, feats = random_layer(2, 3, 5, 4, seed=1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    q = grouping.head_statistics(maps, feats, mask)
    assert q.shape == (2, 3, 3, 3, 3) and q.dtype == torch.float64
    for b in range(2):
        m = maps[b] * mask[b][None, :, None]
        for h, a, g, c in [(0, 0, 0, 0), (0, 1, 2, 1), (2, 0, 1, 2), (1, 2, 1, 0)]:
            ref = ((m[h] @ feats[b, a]) * (m[g] @ feats[b, c])).sum()
            assert torch.allclose(q[b, h, a, g, c], ref.double(), rtol=1e-5, atol=1e-5)


def test_head_statistics_row_chunks_add_up_and_padding_is_excluded():
    maps, feats = random_layer(2, 4, 6, 3, seed=2)
    whole = grouping.head_statistics(maps, feats)
    chunks = grouping.head_statistics(maps[:, :, :2], feats) + grouping.head_statistics(maps[:, :, 2:], feats)
    assert torch.allclose(whole, chunks, rtol=1e-6, atol=1e-6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 4:] = False
    assert torch.allclose(grouping.head_statistics(maps, feats, mask), grouping.head_statistics(maps[:, :, :4], feats),
                          rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("heads,head_dim,width", [(3, 2, 10), (4, 3, 8)])  # H d < D (reduced) and H d > D
def test_layer_basis_gives_the_statistics_of_full_output_features(heads, head_dim, width):
    gen = torch.Generator().manual_seed(3)
    maps = torch.softmax(torch.randn(2, heads, 5, 5, generator=gen), dim=-1)
    values = torch.randn(2, heads, 5, head_dim, generator=gen)
    w_out = torch.randn(heads * head_dim, width, generator=gen)
    full = torch.einsum("bhmd,hde->bhme", values, w_out.view(heads, head_dim, width))  # X_h = V_h W_O[h]
    basis = grouping.layer_basis(w_out, heads, head_dim)
    assert basis.shape == (heads, head_dim, min(heads * head_dim, width))
    ref = grouping.head_statistics(maps, full)
    got = grouping.head_statistics(maps, values, basis=basis)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max())


@pytest.mark.parametrize("mode", ["lsq", "mean", "select"])
def test_group_errors_match_reconstruction_error(mode):
    maps, feats = random_layer(4, 7, 6, 5, seed=4)
    cost = grouping.GroupCost(grouping.head_statistics(maps, feats), mode)
    for g in ([0, 3], [5, 1], [6, 2, 4], [4, 0, 2, 1], [3, 6, 1, 0, 5]):  # any heads, any order
        err, w = cost.errors(g)
        ref_w = shd.solve_weights(*shd.squeeze_statistics(maps[:, g], feats[:, g]), mode)
        ref = shd.reconstruction_error(maps[:, g], feats[:, g], ref_w)
        assert torch.allclose(w, ref_w, atol=1e-4)
        assert torch.allclose(err.float(), ref, atol=1e-4)
        assert cost(g) == pytest.approx(float(ref.mean()), abs=1e-4)
    assert cost([2]) == 0.0 and torch.equal(cost.errors([2])[0], torch.zeros(4, dtype=torch.float64))


def make_record(b, h, kv, n, d, seed, copies_of=None, padded_from=None, causal=False):
    """A LayerRecord with GQA (kv key/value heads); copies_of[h] = the query head whose q/k to reuse."""
    gen = torch.Generator().manual_seed(seed)
    q = 1.5 * torch.randn(b, h, n, d, generator=gen)
    k = 1.5 * torch.randn(b, kv, n, d, generator=gen)
    v = torch.randn(b, kv, n, d, generator=gen)
    if copies_of is not None:
        q = q[:, copies_of]
    allowed, rows = None, None
    if padded_from is not None:
        allowed = torch.ones(b, 1, n, n, dtype=torch.bool)
        allowed[-1, :, :, padded_from:] = False
        rows = torch.ones(b, n, dtype=torch.bool)
        rows[-1, padded_from:] = False
    return LayerRecord(q, k, v, allowed, causal, d**-0.5), rows


@pytest.mark.parametrize("causal,padded", [(False, True), (True, False)])
def test_record_statistics_and_record_cost_match_direct_squeeze(causal, padded):
    h, kv, n, d, width = 6, 2, 7, 3, 20
    rec, rows = make_record(3, h, kv, n, d, seed=5, padded_from=5 if padded else None, causal=causal)
    w_out = torch.randn(h * d, width, generator=torch.Generator().manual_seed(6))
    tau = 1.7
    maps = shd.attention_maps(rec.query, rec.keys_per_head(), rec.scaling, rec.allowed_rows(0, n), tau)
    feats = torch.einsum("bhmd,hde->bhme", rec.values_per_head(), w_out.view(h, d, width))
    stats = grouping.GroupCost(grouping.record_statistics(rec, w_out, rows, tau, chunk_rows=3))
    per_group = grouping.RecordCost([rec], [rows], w_out, tau)
    for g in ([0, 3], [5, 1, 2], [4, 0, 2, 1]):
        ref = direct_errors(maps, feats, [g], row_mask=rows)[0]
        assert torch.allclose(stats.errors(g)[0].float(), ref, atol=1e-4)
        assert torch.allclose(per_group.errors(g)[0].float(), ref, atol=1e-4)
    a, b = grouping.choose_groups(stats, 3), grouping.choose_groups(per_group, 3)
    assert a.groups == b.groups and a.representatives == b.representatives
    assert a.error == pytest.approx(b.error, abs=1e-5)


# --------------------------------------------------------------------------- search
def test_packable_exact_fill():
    assert grouping._packable((2, 1, 1), (2, 2))
    assert not grouping._packable((2, 2), (3, 1))
    assert grouping._packable((1,) * 5, (3, 2))
    assert not grouping._packable((3,), (2, 1))
    assert grouping._packable((), ())


@pytest.mark.parametrize("ht", range(1, 9))
def test_partition_valid_and_never_worse_than_contiguous(ht):
    maps, feats = random_layer(2, ht, 4, 3, seed=10 + ht)
    stats = grouping.head_statistics(maps, feats)
    for hs in range(1, ht + 1):
        res = grouping.choose_groups(stats, hs, restarts=1)
        check_partition(res.groups, ht, hs)
        assert [g[0] for g in res.groups] == sorted(g[0] for g in res.groups)
        assert all(g == sorted(g) for g in res.groups)
        assert all(r in g for r, g in zip(res.representatives, res.groups))
        assert res.error <= res.contiguous_error + 1e-12
        assert res.error == pytest.approx(sum(res.group_errors) / hs)
        if hs == ht:
            assert res.groups == [[h] for h in range(ht)] and res.error == 0.0


@pytest.mark.parametrize("ht,hs", [(12, 4), (12, 5), (10, 3), (11, 4)])
def test_partition_valid_larger(ht, hs):
    maps, feats = random_layer(2, ht, 5, 4, seed=ht * 100 + hs)
    res = grouping.choose_groups(grouping.head_statistics(maps, feats), hs, restarts=1)
    check_partition(res.groups, ht, hs)
    assert res.error <= res.contiguous_error + 1e-12


@pytest.mark.parametrize("ht,hs,seed", [(6, 3, 0), (6, 3, 1), (6, 2, 2), (7, 3, 3), (5, 2, 4), (6, 4, 5)])
def test_search_finds_brute_force_optimum(ht, hs, seed):
    maps, feats = random_layer(3, ht, 5, 4, seed=seed, sharp=3.0)
    stats = grouping.head_statistics(maps, feats)
    cost = grouping.GroupCost(stats)
    parts = list(balanced_partitions(ht, hs))
    best = min(cost.total(p) for p in parts) / hs
    res = grouping.choose_groups(stats, hs)
    assert res.error == pytest.approx(best, abs=1e-9)
    # and the reported error is the direct squeeze error of the chosen groups
    direct = direct_errors(maps, feats, res.groups)
    assert res.error == pytest.approx(float(torch.stack(direct).mean()), abs=1e-4)


def copies_record(order: list[int], kv_copies: bool, seed: int):
    """Heads whose maps are copies: head h reuses the q (and, with per-head k/v, the k) of order[h]."""
    h = len(order)
    rec, _ = make_record(4, h, h, 12, 4, seed, copies_of=order)
    if kv_copies:
        rec.key = rec.key[:, order]  # identical q and k -> identical maps; values stay distinct
    return rec


@pytest.mark.parametrize("order,hs", [([0, 1, 2, 0, 1, 2], 3), ([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3], 4),
                                      ([0, 1, 0, 2, 1, 2], 3)])
def test_finds_permuted_copies_where_contiguous_does_not(order, hs):
    rec = copies_record(order, kv_copies=True, seed=7)
    heads, d = len(order), rec.query.shape[-1]
    w_out = torch.randn(heads * d, 16, generator=torch.Generator().manual_seed(8))
    expected = sorted([[h for h in range(heads) if order[h] == m] for m in sorted(set(order))])
    sources = [grouping.record_statistics(rec, w_out)]
    if heads <= 6:  # the per-candidate path agrees (it is slower: one map computation per candidate group)
        sources.append(grouping.RecordCost([rec], [None], w_out))
    for source in sources:
        res = grouping.choose_groups(source, hs)
        assert res.groups == expected
        assert res.error < 1e-3  # copies squeeze without loss
        assert res.contiguous_error > 0.05  # adjacent heads are different maps
    # the direct squeeze confirms both numbers
    maps = shd.attention_maps(rec.query, rec.keys_per_head(), rec.scaling, None)
    feats = torch.einsum("bhmd,hde->bhme", rec.values_per_head(), w_out.view(heads, d, -1))
    assert float(torch.stack(direct_errors(maps, feats, expected)).mean()) < 1e-3
    assert float(torch.stack(direct_errors(maps, feats, shd.group_heads(heads, hs))).mean()) > 0.05


def test_deterministic_for_a_seed():
    maps, feats = random_layer(3, 9, 6, 4, seed=21)
    stats = grouping.head_statistics(maps, feats)
    a = grouping.choose_groups(stats, 4, seed=3)
    b = grouping.choose_groups(stats.clone(), 4, seed=3)
    assert a == b
    by_layer = grouping.calibrate_groups({2: stats, 0: stats}, 4, seed=3)
    assert list(by_layer) == [0, 2] and by_layer[0] == a


def test_representative_is_head_with_largest_mean_lsq_weight():
    maps, feats = random_layer(5, 6, 6, 4, seed=30)
    stats = grouping.head_statistics(maps, feats)
    res = grouping.choose_groups(stats, 2)
    for g, r in zip(res.groups, res.representatives):
        w = shd.solve_weights(*shd.squeeze_statistics(maps[:, g], feats[:, g]), "lsq").mean(dim=0)
        assert r == g[int(w.argmax())]


def test_bad_statistics_shape_raises():
    with pytest.raises(ValueError, match=r"\[S, H, H, H, H\]"):
        grouping.choose_groups(torch.zeros(2, 3, 3, 3), 2)


# --------------------------------------------------------------------------- training path
def tiny_recipe(teacher: Path, text: Path, out: Path, grouping_mode: str = "calibrated", heads: int = 3,
                **distill) -> dict:
    return {
        "teacher": str(teacher),
        "student": {"from_teacher": {"layers": 2, "heads": heads}},
        "data": {"path": str(text), "seq_len": 32, "batch_size": 4, "val_batches": 1},
        "distill": {"grouping": grouping_mode, "calibration_batches": 2, **distill},
        "train": {"max_steps": 1, "eval_every": 1, "warmup_steps": 0, "device": "cpu"},
        "output_dir": str(out),
    }


@pytest.mark.parametrize("kind", ["llama", "bert"])  # GQA + causal; padded encoder rows
def test_distill_with_calibrated_grouping_writes_groups(kind, tiny_models, tiny_text, tmp_path):
    from rich.console import Console

    from shdcli.recipe import validate_recipe
    from shdcli.train import run_distillation

    # llama: 6 heads in 2 KV heads -> 4 heads in 2 KV heads, so each KV head's 3 query heads are split in 2
    heads = 4 if kind == "llama" else 3
    recipe = validate_recipe(tiny_recipe(tiny_models[kind], tiny_text, tmp_path / "run", heads=heads))
    console = Console(record=True, width=200, file=open("/dev/null", "w"))  # noqa: SIM115
    metrics = run_distillation(recipe, console)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    plan = saved["plan"]
    student_plan = json.loads((tmp_path / "run" / "student" / "shd_plan.json").read_text())
    assert plan["grouping"] == "calibrated" and saved["recipe"]["distill"]["grouping"] == "calibrated"
    assert student_plan["groups"] == plan["groups"] == metrics["plan"]["groups"]
    assert student_plan["representatives"] == plan["representatives"]
    assert len(plan["groups"]) == len(plan["layers"]) == len(plan["calibration"])
    for layer_groups, reps, cal in zip(plan["groups"], plan["representatives"], plan["calibration"]):
        check_partition(layer_groups, 6, heads)
        if kind == "llama":  # no group spans two teacher KV heads
            assert all(set(g) <= {0, 1, 2} or set(g) <= {3, 4, 5} for g in layer_groups)
        assert all(r in g for r, g in zip(reps, layer_groups))
        assert cal["error"] <= cal["contiguous_error"] + 1e-12 and cal["samples"] == 8
    text = console.export_text()
    assert "grouping calibrated" in text and "calibrating head groups on 8 training samples" in text
    assert "<-{" in text


def test_student_heads_start_from_their_calibrated_groups(tiny_models, tiny_text, tmp_path):
    """Calibration runs before the student is initialised: student head j starts as the merged head
    of its own calibrated group (mean query, summed W_O), wherever its heads sit."""
    import functools

    from shdcli.models.families import decoder_layers
    from shdcli.recipe import validate_recipe
    from shdcli.tasks.data import load_blocks
    from shdcli.train import calibration_batches, load_teacher, make_student

    recipe = validate_recipe(tiny_recipe(tiny_models["llama"], tiny_text, tmp_path / "run", heads=4))
    teacher, tokenizer, task, _ = load_teacher(recipe)
    train_blocks, _ = load_blocks(recipe.data, tokenizer, True, 0)
    batches = functools.cache(lambda: calibration_batches(train_blocks, recipe))
    student, plan, derivation = make_student(recipe, teacher, tokenizer, task, batches)
    assert plan.pairs == list(enumerate(derivation.layers)) and plan.calibration
    d = 8
    for s, t in plan.pairs:
        s_att, t_att = decoder_layers(student)[s].self_attn, decoder_layers(teacher)[t].self_attn
        for j, group in enumerate(plan.groups[s]):
            mean_q = sum(t_att.q_proj.weight[h * d:(h + 1) * d] for h in group) / len(group)
            sum_o = sum(t_att.o_proj.weight[:, h * d:(h + 1) * d] for h in group)
            torch.testing.assert_close(s_att.q_proj.weight[j * d:(j + 1) * d], mean_q)
            torch.testing.assert_close(s_att.o_proj.weight[:, j * d:(j + 1) * d], sum_o)


def test_recipe_rejects_unknown_grouping(tiny_models, tiny_text, tmp_path):
    from shdcli.errors import ShdError
    from shdcli.recipe import validate_recipe

    with pytest.raises(ShdError, match="grouping"):
        validate_recipe(tiny_recipe(tiny_models["llama"], tiny_text, tmp_path, grouping_mode="clustered"))
    assert validate_recipe(tiny_recipe(tiny_models["llama"], tiny_text, tmp_path)).distill.grouping == "calibrated"
