"""Every family in the table (shdcli/models/families.py), each as a tiny random teacher (tests/tiny.py).

References are independent of shd's own code: transformers' eager attention (`output_attentions` on an
eager copy) for the maps and layer outputs, and the q/k/v the model itself hands its attention function
(captured at position 0, where rotary embeddings are the identity) for how a fused projection is sliced.
Then per family: the full-size head-pruned init is the teacher, each student head's q/k come from its own
teacher heads, and `shd distill` derives, trains 2 steps and saves a student that from_pretrained reloads.
"""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
import yaml

from shdcli.attention import capture, losses, shd
from shdcli.errors import ShdError
from shdcli.models import families
from shdcli.models.families import (
    attention_params,
    decoder_layers,
    enable_capture,
    model_shape,
    read_attention,
    write_attention,
)
from shdcli.students.derive import StudentShape, build_student, derive, init_from_teacher, student_config
from tests.conftest import ROOT, run_main
from tests.helpers import make_batch, perturb
from tests.tiny import FAMILY_KINDS, family_model, make_tokenizer, save_family, write_image_npz

NAMES = list(FAMILY_KINDS)
TASK = {"causal": "causal-lm", "encoder": "encoder", "image": "image-classification"}
Q_NORM = {"qwen3", "gemma3_text"}  # per-head RMSNorm on q and k before the rotary embedding


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def teachers():
    out = {}
    for i, name in enumerate(NAMES):
        model = family_model(name, seed=i)
        perturb(model, seed=100 + i, scale=0.3)
        enable_capture(model)
        out[name] = model.eval()
    return out


def batches(name: str, tokenizer) -> dict[str, dict[str, torch.Tensor]]:
    if FAMILY_KINDS[name] == "image":
        return {"pixels": {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))}}
    out = {"right": make_batch(tokenizer, side="right")}
    if FAMILY_KINDS[name] == "causal":
        out["left"] = make_batch(tokenizer, side="left")
    tokenizer.padding_side = "right"
    return out


def unpadded(name: str) -> dict[str, torch.Tensor]:
    if FAMILY_KINDS[name] == "image":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))}
    ids = torch.randint(4, 400, (2, 9), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def first(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def eager_copy(model):
    """The same weights under transformers' eager attention (Falcon only switches at construction)."""
    config = copy.deepcopy(model.config)
    eager = type(model)._from_config(config, attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    return eager.eval()


def captured(model, batch, layers, keep_values=True):
    recorder = capture.AttentionRecorder(layers, keep_values=keep_values)
    with torch.no_grad(), recorder.active():
        out = model(**batch)
    return out, dict(recorder.records)


def sliding_layers(model) -> set[int]:
    config = model.config
    window = getattr(config, "sliding_window", None)
    if not window:
        return set()
    types = getattr(config, "layer_types", None)
    if types is None:
        return set(range(model_shape(config).layers))
    return {i for i, t in enumerate(types) if t == "sliding_attention"}


# --------------------------------------------------------------------------- the table itself
def test_table_covers_the_issue_families():
    want = {"gpt2", "gpt_neox", "phi3", "falcon", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "opt",
            "bert", "roberta", "distilbert", "electra", "vit", "deit"}
    assert want <= set(families.supported_types())
    assert {n.removesuffix("_mq").removesuffix("_mha") for n in NAMES} == set(families.supported_types()), \
        "every family in the table has a tiny teacher here"


def test_readme_lists_the_table():
    """README's "Supported families" section is generated from the table (scripts/families_table.py)."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- families:start -->\n(.*?)\n<!-- families:end -->", readme, re.S)
    assert block is not None, "README lacks the generated families block"
    assert block.group(1) == families.supported_markdown(), "run: python scripts/families_table.py"


@pytest.mark.parametrize("layout,heads,kv", [("blocks", 6, 2), ("blocks", 6, 1), ("per_head", 6, 6),
                                             ("kv_grouped", 6, 2), ("kv_grouped", 6, 3)])
def test_split_merge_layouts_against_index_loops(layout, heads, kv):
    """split_qkv against an explicit index loop over the documented layout; merge_qkv inverts it."""
    d = 4
    out = (heads + 2 * kv) * d
    x = torch.arange(out, dtype=torch.float64)[None].repeat(3, 1)
    q, k, v = families.split_qkv(x, layout, heads, kv, d)
    r = heads // kv
    for h in range(heads):
        if layout == "blocks":
            start = h * d
        elif layout == "per_head":
            start = h * 3 * d
        else:
            start = (h // r) * (r + 2) * d + (h % r) * d
        assert torch.equal(q[:, h], x[:, start:start + d]), (layout, h)
    for g in range(kv):
        if layout == "blocks":
            ks, vs = heads * d + g * d, heads * d + kv * d + g * d
        elif layout == "per_head":
            ks, vs = g * 3 * d + d, g * 3 * d + 2 * d
        else:
            ks, vs = g * (r + 2) * d + r * d, g * (r + 2) * d + (r + 1) * d
        assert torch.equal(k[:, g], x[:, ks:ks + d]) and torch.equal(v[:, g], x[:, vs:vs + d]), (layout, g)
    assert torch.equal(families.merge_qkv(q, k, v, layout), x)


# --------------------------------------------------------------------------- capture: maps and outputs
@pytest.mark.parametrize("name", NAMES)
def test_captured_maps_and_outputs_equal_eager(teachers, tokenizer, name):
    model = teachers[name]
    eager = eager_copy(model)
    n_layers = model_shape(model.config).layers
    sliding = sliding_layers(model)
    for side, batch in batches(name, tokenizer).items():
        out, records = captured(model, batch, set(range(n_layers)))
        with torch.no_grad():
            ref = eager(**batch, output_attentions=True)
        where = f"{name} {side}"
        assert len(records) == n_layers and len(ref.attentions) == n_layers, where
        mask = batch.get("attention_mask")
        if mask is None:  # images: every patch is real; the output is the class logits
            torch.testing.assert_close(first(out), first(ref), rtol=1e-4, atol=1e-5, msg=where)
        else:
            torch.testing.assert_close(first(out)[mask.bool()], first(ref)[mask.bool()], rtol=1e-4, atol=1e-5,
                                       msg=where)
        for layer in range(n_layers):
            rec = records[layer]
            n = rec.query.shape[2]
            real = torch.ones(rec.query.shape[0], n, dtype=torch.bool) if mask is None else mask.bool()  # [B, N]
            maps = shd.attention_maps(rec.query, rec.keys_per_head(), rec.scaling, rec.allowed_rows(0, n),
                                      softcap=rec.softcap)  # [B, H, N, M]
            want = ref.attentions[layer].float()
            rows = real[:, None, :, None].expand_as(maps)
            torch.testing.assert_close(maps[rows], want[rows], rtol=1e-4, atol=1e-6, msg=f"{where} layer {layer}")
            if layer in sliding:  # keys further back than the window get no mass
                window = model.config.sliding_window
                far = torch.ones(n, n, dtype=torch.bool).tril(-window)[None, None].expand_as(maps)
                assert (maps[far & rows] == 0).all(), f"{where} layer {layer}"
        if name == "gemma2":
            assert all(rec.softcap == 2.0 for rec in records.values())


# --------------------------------------------------------------------------- how a layer's weights are sliced
def _post(name: str, attn: torch.nn.Module, x: torch.Tensor, which: str) -> torch.Tensor:
    """What the family does to a projected q or k head before its attention function (not rotary: position 0)."""
    if name in Q_NORM:
        return getattr(attn, f"{which}_norm")(x)
    return x


@pytest.mark.parametrize("name", NAMES)
def test_canonical_heads_are_the_models_own(teachers, name):
    """read_attention's head h, applied to the layer's input, is the q/k/v head h the model attends with."""
    model = teachers[name]
    shape = model_shape(model.config)
    d = shape.head_dim
    block = decoder_layers(model)[0]
    p = attention_params(block, model.config)
    w = read_attention(p)
    seen = {}
    handle = (p.fused_qkv or p.q).register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    try:
        _, records = captured(model, unpadded(name), {0})
    finally:
        handle.remove()
    rec = records[0]
    x = seen["x"].double()  # [B, N, D]
    attn = block.get_submodule(p.names["o"].rsplit(".", 1)[0])  # the module holding o (and q/k norms)

    def proj(weight, bias, h):
        y = x @ weight[:, h * d:(h + 1) * d]
        return y if bias is None else y + bias[h * d:(h + 1) * d]

    scale_ratio = rec.scaling / d**-0.5  # OPT scales q inside its forward and passes scaling 1
    for h in range(shape.heads):
        want = _post(name, attn, proj(w.q, w.bq, h)[:, 0].float(), "q")
        torch.testing.assert_close(rec.query[:, h, 0].double() * scale_ratio, want.double(), rtol=1e-4, atol=1e-5,
                                   msg=f"{name} q head {h}")
    for g in range(shape.kv_heads):
        want_k = _post(name, attn, proj(w.k, w.bk, g)[:, 0].float(), "k")
        torch.testing.assert_close(rec.key[:, g, 0].double(), want_k.double(), rtol=1e-4, atol=1e-5,
                                   msg=f"{name} k head {g}")
        torch.testing.assert_close(rec.value[:, g].double(), proj(w.v, w.bv, g), rtol=1e-4, atol=1e-5,
                                   msg=f"{name} v head {g}")
    # the output projection: the layer's attention output is sum_h (A_h V_h) W_O[h] + b_O (all rows)


@pytest.mark.parametrize("name", NAMES)
def test_write_is_the_inverse_of_read(name):
    """write(read(W)) leaves every parameter as it was; read(write(R)) gives R back for random R."""
    model = family_model(name)
    p = attention_params(decoder_layers(model)[1], model.config)
    before = {k: v.clone() for m in p.modules() for k, v in m.named_parameters(prefix=str(id(m)))}
    with torch.no_grad():
        written = write_attention(p, read_attention(p))
    after = {k: v for m in p.modules() for k, v in m.named_parameters(prefix=str(id(m)))}
    assert all(torch.equal(before[k], after[k]) for k in before), name
    assert written == {id(t) for m in p.modules() for t in m.parameters(recurse=False)}
    gen = torch.Generator().manual_seed(3)
    w = read_attention(p)
    rand = families.AttentionWeights(*(None if t is None else torch.randn(t.shape, generator=gen, dtype=t.dtype)
                                       for t in (w.q, w.k, w.v, w.o, w.bq, w.bk, w.bv, w.bo)))
    with torch.no_grad():
        write_attention(p, rand)
    back = read_attention(p)
    for field in ("q", "k", "v", "o", "bq", "bk", "bv", "bo"):
        a, b = getattr(rand, field), getattr(back, field)
        assert (a is None) == (b is None), field
        if a is not None:
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0, msg=f"{name} {field}")


# --------------------------------------------------------------------------- the student's init
def _derived(teacher, name: str, heads: int, prune: str = "uniform"):
    t = model_shape(teacher.config)
    shape = StudentShape(t.layers, heads, families.default_kv_heads(t, heads), t.hidden, t.intermediate)
    task = TASK[FAMILY_KINDS[name]]
    calib = [unpadded(name)]
    d = derive(teacher, task, shape, prune, "balanced", calib)
    torch.manual_seed(0)
    student = build_student(teacher, student_config(teacher.config, d.layers, shape), task).eval()
    init_from_teacher(student, teacher, d)
    enable_capture(student)
    return student, d


@pytest.mark.parametrize("name", NAMES)
def test_full_size_init_is_the_teacher(teachers, tokenizer, name):
    """All heads and layers kept: the head-pruned init reproduces the teacher exactly."""
    teacher = teachers[name]
    for prune in ("uniform", "importance"):
        student, _ = _derived(teacher, name, model_shape(teacher.config).heads, prune)
        for batch in batches(name, tokenizer).values():
            with torch.no_grad():
                want, got = first(teacher(**batch)), first(student(**batch))
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{name} {prune}")


@pytest.mark.parametrize("name", NAMES)
def test_student_heads_come_from_their_teacher_heads(teachers, name):
    """6 -> 3 heads (GQA, 2 KV heads: 6 -> 2, each squeezing one KV head's 3 query heads), all layers: each
    student head's q/k (canonical weights, whose slicing the test above checks against the model) follow
    the init rule of derive.py from the teacher heads of its group."""
    teacher = teachers[name]
    t = model_shape(teacher.config)
    student, d = _derived(teacher, name, t.kv_heads if 1 < t.kv_heads < t.heads else 3)
    s = model_shape(student.config)
    tw = read_attention(attention_params(decoder_layers(teacher)[0], teacher.config))
    sw = read_attention(attention_params(decoder_layers(student)[0], student.config))
    dt, ds = t.head_dim, s.head_dim
    groups, reps = d.groups[0], d.representatives[0]
    assert [h for g in groups for h in g] == list(range(t.heads)) and all(len(g) > 1 for g in groups)

    def col(x, h, width):
        return x[:, h * width:(h + 1) * width]

    fixed = families.family_of(teacher.config).head_dim_fixed
    rotary = families.is_rotary(teacher.config)
    if t.kv_heads < t.heads and ds == dt:  # GQA: mean query of the group, its own KV head copied
        assert fixed
        for j, g in enumerate(groups):
            torch.testing.assert_close(col(sw.q, j, ds), torch.stack([col(tw.q, h, dt) for h in g]).mean(0))
            assert len({h // (t.heads // t.kv_heads) for h in g}) == 1, "a group stays inside one KV head"
        for m, src in enumerate(d.kv_sources[0]):
            torch.testing.assert_close(col(sw.k, m, ds), col(tw.k, src, dt))
    elif rotary:  # the representative's q/k, zero-padded to the student's head_dim
        for j, rep in enumerate(reps):
            assert rep in groups[j]
            torch.testing.assert_close(col(sw.q, j, ds)[:, :dt], col(tw.q, rep, dt))
            assert (col(sw.q, j, ds)[:, dt:] == 0).all()
        t_rep, s_rep = t.heads // t.kv_heads, s.heads // s.kv_heads
        for m in range(s.kv_heads):
            src = reps[m * s_rep] // t_rep
            torch.testing.assert_close(col(sw.k, m, ds)[:, :dt], col(tw.k, src, dt))
    else:  # MHA with absolute positions: the student's scores are the group's mean scores
        def circuit(w, h, width):
            q = torch.cat([col(w.q, h, width), w.bq[None, h * width:(h + 1) * width]]) if w.bq is not None else \
                col(w.q, h, width)
            k = torch.cat([col(w.k, h, width), w.bk[None, h * width:(h + 1) * width]]) if w.bk is not None else \
                col(w.k, h, width)
            return q @ k.t() * width**-0.5

        for j, g in enumerate(groups):
            want = sum(circuit(tw, h, dt) for h in g) / len(g)
            torch.testing.assert_close(circuit(sw, j, ds), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_mlp_pruning_is_exact_when_dropped_neurons_are_dead(name, tokenizer):
    """Neurons the teacher's MLP output projection never reads can be pruned without changing the output:
    a uniformly pruned student (the leading neurons) of such a teacher is the teacher. Checks the
    intermediate config field and fused MLP inputs (Phi-3's [gate; up] rows) of every family."""
    teacher = family_model(name, seed=7)
    perturb(teacher, seed=8, scale=0.3)
    t = model_shape(teacher.config)
    keep = t.intermediate // 2
    with torch.no_grad():
        for block in decoder_layers(teacher):
            down = families.mlp_down(block, teacher.config)
            if families.family_of(teacher.config).conv1d:  # Conv1D [in, out]
                down.weight[keep:] = 0.0
            else:
                down.weight[:, keep:] = 0.0
    enable_capture(teacher.eval())
    shape = StudentShape(t.layers, t.heads, t.kv_heads, t.hidden, keep)
    task = TASK[FAMILY_KINDS[name]]
    d = derive(teacher, task, shape, "uniform", "balanced", [])
    student = build_student(teacher, student_config(teacher.config, d.layers, shape), task).eval()
    init_from_teacher(student, teacher, d)
    assert model_shape(student.config).intermediate == keep
    enable_capture(student)
    for batch in batches(name, tokenizer).values():
        with torch.no_grad():
            torch.testing.assert_close(first(student(**batch)), first(teacher(**batch)), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- shd distill, 2 steps, reload
RECIPE = {
    "student": {"from_teacher": {"layers": 2, "heads": 3, "init": "teacher"}},
    "data": {"seq_len": 32, "batch_size": 2, "val_batches": 1, "val_fraction": 0.25},
    # balance none: SHD trains in every family (auto would turn it off for the encoders)
    "distill": {"calibration_batches": 1, "balance": "none"},
    "train": {"max_steps": 2, "eval_every": 2, "warmup_steps": 1, "device": "cpu", "threads": 1},
}


@pytest.mark.parametrize("name", NAMES)
def test_distill_trains_saves_and_reloads(name, tmp_path, tiny_text, monkeypatch, capsys):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

    kind = FAMILY_KINDS[name]
    teacher = save_family(name, tmp_path / "teacher", layers=2)
    recipe = copy.deepcopy(RECIPE)
    recipe["teacher"] = str(teacher)
    recipe["data"]["path"] = str(write_image_npz(tmp_path / "d.npz") if kind == "image" else tiny_text)
    recipe["output_dir"] = str(tmp_path / "run")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, out, err = run_main(monkeypatch, capsys, "distill", str(tmp_path / "r.yaml"))
    assert code == 0, err[-3000:] + out[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [1, 2]
    assert all(math.isfinite(h["total"]) and h["shd"] >= 0 for h in metrics["history"]), metrics["history"]
    assert metrics["plan"]["student"]["heads"] == 3 and metrics["plan"]["teacher"]["heads"] == 6
    cls = {"causal": AutoModelForCausalLM, "encoder": AutoModel, "image": AutoModelForImageClassification}[kind]
    student = cls.from_pretrained(tmp_path / "run" / "student").eval()
    assert model_shape(student.config).heads == 3 and model_shape(student.config).layers == 2
    batch = unpadded(name)
    with torch.no_grad():
        result = first(student(**batch))
    assert torch.isfinite(result).all()


# --------------------------------------------------------------------------- what cannot be reproduced
def test_unsupported_family_is_one_line(tmp_path, tiny_text, monkeypatch, capsys):
    from transformers import BloomConfig, BloomForCausalLM

    folder = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(vocab_size=400, hidden_size=48, n_layer=2, n_head=6)).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    recipe = {**copy.deepcopy(RECIPE), "teacher": str(folder), "output_dir": str(tmp_path / "run")}
    recipe["data"]["path"] = str(tiny_text)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = run_main(monkeypatch, capsys, "distill", str(tmp_path / "r.yaml"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "teacher.path" in lines[0] and "'bloom'" in lines[0] and "supported:" in lines[0]


@pytest.mark.parametrize("name,kv,ok", [("gpt2", 1, False), ("gpt2", 3, True), ("falcon_mq", 3, False),
                                         ("falcon_mq", 1, True), ("falcon_mha", 1, False), ("falcon", 1, True),
                                         ("phi3", 1, True)])
def test_kv_heads_a_family_cannot_hold_are_refused(name, kv, ok):
    config = family_model(name).config
    pairs = [(0, 0), (1, 1)]
    if ok:
        student = families.derive_student_config(config, pairs, 3, kv, None, None)
        assert model_shape(student).kv_heads == kv
    else:
        with pytest.raises(ShdError, match="student.from_teacher.kv_heads"):
            families.derive_student_config(config, pairs, 3, kv, None, None)


def test_falcon_alibi_is_refused_naming_the_feature():
    from transformers import FalconConfig

    config = FalconConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, alibi=True)
    with pytest.raises(ShdError, match="falcon with alibi"):
        families.family_of(config, "teacher.path")


def test_attention_sinks_run_exactly_and_are_refused_when_recorded():
    """GPT-OSS passes per-head sink logits (s_aux): the capture's output is the eager one; recording such a
    layer for SHD is one clear error naming the family's attention and the feature."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(vocab_size=100, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                          num_experts_per_tok=1, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    model = GptOssForCausalLM(config).eval()
    perturb(model, seed=5, scale=0.3)
    eager = eager_copy(model)
    capture.enable(model)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        got, want = model(input_ids=ids, attention_mask=mask).logits, eager(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-5)
    with pytest.raises(ShdError, match="GptOssAttention: attention sinks"):
        captured(model, {"input_ids": ids, "attention_mask": mask}, {0})


# --------------------------------------------------------------------------- soft-capped SHD loss
def _record(q, k, v, softcap, allowed=None, causal=True):
    return capture.LayerRecord(query=q, key=k, value=v, allowed=allowed, causal=causal, scaling=q.shape[-1] ** -0.5,
                               softcap=softcap)


@pytest.mark.parametrize("kind", ["kl", "mse", "cosine"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_lean_loss_with_softcap_equals_naive(kind, tau):
    """The lean (fused, chunked) SHD loss and its q/k gradients on soft-capped layers equal the naive
    autograd path, which applies the cap in shd.attention_scores."""
    gen = torch.Generator().manual_seed(0)
    bsz, n, d = 2, 11, 8
    tq, tk, tv = (torch.randn(bsz, h, n, d, generator=gen) * 2 for h in (6, 2, 2))
    sq = (torch.randn(bsz, 3, n, d, generator=gen) * 2).requires_grad_()
    sk = (torch.randn(bsz, 1, n, d, generator=gen) * 2).requires_grad_()
    row_mask = torch.ones(bsz, n, dtype=torch.bool)
    row_mask[1, -3:] = False
    allowed = (torch.ones(n, n, dtype=torch.bool).tril() & row_mask[:, None, :])[:, None]  # [B, 1, N, N]
    t_rec, groups = _record(tq, tk, tv, 1.5, allowed), [[0, 1], [2, 3], [4, 5]]
    results = {}
    for impl in ("naive", "lean"):
        s_rec = _record(sq, sk, None, 1.5, allowed)
        out = losses.shd_loss({0: t_rec}, {0: s_rec}, [(0, 0)], [groups], {}, row_mask, kind=kind, tau=tau,
                              impl=impl, chunk_rows=4)
        grads = torch.autograd.grad(out.loss, (sq, sk))
        results[impl] = (out.loss.detach(), *grads)
    for a, b in zip(results["naive"], results["lean"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    # the cap matters: without it the loss differs
    plain = losses.shd_loss({0: _record(tq, tk, tv, None, allowed)}, {0: _record(sq, sk, None, None, allowed)},
                            [(0, 0)], [groups], {}, row_mask, kind=kind, tau=tau, impl="lean")
    assert not torch.allclose(plain.loss, results["lean"][0])


def test_eager_attention_fallback_matches_loops():
    """capture.eager_attention (row blocks) against a per-row loop with soft-capping, a bool mask and GQA."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 7, 8, generator=gen), torch.randn(2, 2, 7, 8, generator=gen), \
        torch.randn(2, 2, 7, 8, generator=gen)
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    allowed[1, :, :, :2] = False
    allowed[1, :, 0] = False  # a row with no key: uniform, as eager's additive mask gives
    module = torch.nn.Module().eval()
    out, _ = capture.eager_attention(module, q, k, v, allowed, 0.0, 0.3, True, softcap=2.0, chunk_bytes=200)
    for b in range(2):
        for h in range(4):
            for i in range(7):
                s = (q[b, h, i] @ k[b, h // 2].t()) * 0.3
                s = torch.tanh(s / 2.0) * 2.0
                s = torch.where(allowed[b, 0, i], s, torch.finfo(s.dtype).min)
                want = torch.softmax(s, dim=-1) @ v[b, h // 2]
                torch.testing.assert_close(out[b, i, h], want, rtol=1e-5, atol=1e-6)


def test_families_table_script_writes_the_readme_block(tmp_path):
    """scripts/families_table.py rewrites README's block in place from the table."""
    import runpy

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- families:start -->\nold\n<!-- families:end -->\nrest\n")
    runpy.run_path(str(ROOT / "scripts" / "families_table.py"), run_name="script")["update"](readme)
    text = readme.read_text()
    assert text == f"intro\n<!-- families:start -->\n{families.supported_markdown()}\n<!-- families:end -->\nrest\n"


def test_depth_search_distance_in_row_chunks_equals_the_whole(monkeypatch):
    """The causal LM's token KL (importance pruning) in chunks of rows equals the one-shot formula."""
    from shdcli.tasks import causal_lm

    gen = torch.Generator().manual_seed(2)
    ref, out = torch.randn(3, 7, 50, generator=gen) * 3, torch.randn(3, 7, 50, generator=gen) * 3
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 4:] = 0
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(out, -1)
    want = float(((log_p.exp() * (log_p - log_q)).sum(-1) * mask).sum() / mask.sum())
    monkeypatch.setattr(causal_lm, "DISTANCE_CHUNK_BYTES", 4 * 50 * 4)  # 4 rows per chunk
    got = causal_lm.CausalLM().output_distance(ref, out, {"attention_mask": mask})
    assert got == pytest.approx(want, rel=1e-5)


def test_multimodal_gemma3_is_refused_but_its_shape_reads():
    from transformers import Gemma3Config

    config = Gemma3Config(text_config={"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
                                       "head_dim": 8, "hidden_size": 32, "vocab_size": 100})
    assert model_shape(config).model_type == "gemma3_text"
    with pytest.raises(ShdError, match="model type 'gemma3'"):
        families.family_of(config, "teacher.path")


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3_text"])
def test_narrower_gemma_student_keeps_embeddings_and_head(name):
    """Gemma scales embeddings by sqrt(width): a width-pruned student's embedding of each kept channel is the
    teacher's, and its tied head maps a normalised state to the teacher's logits over those channels."""
    teacher = family_model(name, seed=3)
    perturb(teacher, seed=4, scale=0.3)
    t = model_shape(teacher.config)
    shape = StudentShape(t.layers, t.heads, t.kv_heads, 32, t.intermediate)
    d = derive(teacher.eval(), "causal-lm", shape, "uniform", "balanced", [])
    student = build_student(teacher, student_config(teacher.config, d.layers, shape), "causal-lm").eval()
    init_from_teacher(student, teacher, d)
    assert d.channels == list(range(32))
    ids = torch.randint(4, 400, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(student.get_input_embeddings()(ids), teacher.get_input_embeddings()(ids)[..., :32])
        x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
        unit = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + teacher.config.rms_norm_eps)  # RMS-normalised
        t_scale = 1.0 + teacher.model.norm.weight[:32]
        want = (unit * t_scale) @ teacher.get_output_embeddings().weight[:, :32].t()
        got = student.get_output_embeddings()(student.model.norm(x))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
