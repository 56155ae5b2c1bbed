"""q/k/v capture through AttentionInterface (shdcli/attention/capture.py) on tiny BERT, GPT-2 and Llama-GQA.

The reference for the maps is transformers' own eager attention (output_attentions=True) on the
same weights: rebuilt maps must match it on every real query row, with padding and causality.
"""

from __future__ import annotations

import pytest
import torch

from shdcli.attention import capture, shd
from shdcli.models.families import model_shape
from tests.helpers import load_tiny, make_batch

FAMILIES = ["bert", "gpt2", "llama"]
CAUSAL = {"bert": False, "gpt2": True, "llama": True}


@pytest.fixture(scope="module")
def models(tiny_models):
    return {kind: load_tiny(tiny_models[kind], seed=10 + i, scale=0.5) for i, kind in enumerate(FAMILIES)}


def first(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def run_captured(model, batch, layers, keep_values=True):
    capture.enable(model)
    recorder = capture.AttentionRecorder(layers, keep_values=keep_values)
    with torch.no_grad(), recorder.active():
        out = model(**batch)
    return out, dict(recorder.records)


def run_eager(model, batch):
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**batch, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")


def batches(kind, tokenizer):
    """Right padding for every family, left padding for the causal ones, and a batch without padding."""
    out = {"right": make_batch(tokenizer, side="right")}
    if CAUSAL[kind]:
        out["left"] = make_batch(tokenizer, side="left")
    tokenizer.padding_side = "right"
    ids = tokenizer(["one two three four five six seven", "eight nine ten eleven twelve thirteen x"],
                    return_tensors="pt", padding=True)
    if (ids["attention_mask"] == 1).all():
        out["none"] = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
    return out


@pytest.mark.parametrize("kind", FAMILIES)
def test_capture_outputs_equal_sdpa(models, kind):
    model, tokenizer, _ = models[kind]
    for name, batch in batches(kind, tokenizer).items():
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            want = first(model(**batch))
        got, records = run_captured(model, batch, set(range(model_shape(model.config).layers)))
        model.set_attn_implementation("sdpa")
        assert len(records) == model_shape(model.config).layers
        torch.testing.assert_close(first(got), want, rtol=0, atol=0, msg=f"{kind} {name}")


@pytest.mark.parametrize("kind", FAMILIES)
def test_recorded_shapes(models, kind):
    model, tokenizer, _ = models[kind]
    shape = model_shape(model.config)
    batch = make_batch(tokenizer)
    bsz, n = batch["input_ids"].shape
    _, records = run_captured(model, batch, {1, 3})
    assert set(records) == {1, 3}, "only the asked-for layers are kept"
    for rec in records.values():
        assert rec.query.shape == (bsz, shape.heads, n, shape.head_dim)
        assert rec.key.shape == (bsz, shape.kv_heads, n, shape.head_dim)
        assert rec.value.shape == (bsz, shape.kv_heads, n, shape.head_dim)
        assert rec.kv_repeat == shape.heads // shape.kv_heads
        assert rec.keys_per_head().shape == (bsz, shape.heads, n, shape.head_dim)
        assert rec.values_per_head().shape == (bsz, shape.heads, n, shape.head_dim)
        assert rec.scaling == pytest.approx(shape.head_dim ** -0.5)
        assert rec.allowed is not None and rec.allowed.dtype == torch.bool
        assert rec.allowed.shape[-2:] == (n, n) and rec.allowed.shape[1] == 1
        assert rec.allowed_rows(2, 5).shape[-2:] == (3, n)
    if kind == "llama":
        # GQA: each query head's keys are its KV group's keys.
        rec = records[1]
        expanded = rec.keys_per_head()
        for h in range(shape.heads):
            assert torch.equal(expanded[:, h], rec.key[:, h // rec.kv_repeat])
    # Values are only kept when asked (the student's are never needed).
    _, records = run_captured(model, batch, {0}, keep_values=False)
    assert records[0].value is None


def test_recorder_inactive_records_nothing(models):
    model, tokenizer, _ = models["gpt2"]
    capture.enable(model)
    recorder = capture.AttentionRecorder({0, 1})
    with torch.no_grad():
        model(**make_batch(tokenizer))
    assert recorder.records == {}
    with torch.no_grad(), recorder.active():
        model(**make_batch(tokenizer))
    assert set(recorder.records) == {0, 1}
    with torch.no_grad(), recorder.active():  # a new block starts empty
        pass
    assert recorder.records == {}
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("kind", FAMILIES)
def test_rebuilt_maps_equal_eager_attentions(models, kind):
    model, tokenizer, _ = models[kind]
    layers = model_shape(model.config).layers
    for name, batch in batches(kind, tokenizer).items():
        mask = batch["attention_mask"].bool()  # [B, N]
        n = mask.shape[1]
        _, records = run_captured(model, batch, set(range(layers)))
        model.set_attn_implementation("sdpa")
        eager = run_eager(model, batch)
        assert len(eager.attentions) == layers
        if name == "none":
            assert all(rec.allowed is None for rec in records.values())
            assert all(rec.causal == CAUSAL[kind] for rec in records.values())
        for layer in range(layers):
            rec = records[layer]
            # Rebuild in two row chunks to exercise allowed_rows offsets.
            half = n // 2
            maps = torch.cat(
                [shd.attention_maps(rec.query[:, :, a:b], rec.keys_per_head(), rec.scaling, rec.allowed_rows(a, b))
                 for a, b in ((0, half), (half, n))],
                dim=2,
            )  # [B, H, N, N]
            ref = eager.attentions[layer].float()
            where = f"{kind} {name} layer {layer}"
            assert maps.shape == ref.shape, where
            real_rows = mask[:, None, :, None].expand_as(maps)
            torch.testing.assert_close(maps[real_rows], ref[real_rows], rtol=1e-4, atol=1e-6, msg=where)
            # Rows of real queries sum to 1; padded keys get exactly zero mass.
            torch.testing.assert_close(maps.sum(-1)[mask[:, None].expand(-1, maps.shape[1], -1)],
                                       torch.ones(int(mask.sum()) * maps.shape[1]), rtol=0, atol=1e-5)
            pad_keys = (~mask)[:, None, None, :].expand_as(maps)
            assert (maps[real_rows & pad_keys] == 0).all(), where
            if CAUSAL[kind]:
                future = torch.ones(n, n, dtype=torch.bool).triu(1)[None, None].expand_as(maps)
                assert (maps[future & real_rows] == 0).all(), where
            else:
                # Bidirectional: real queries may attend to later real keys (the mask allows them).
                later_real = torch.ones(n, n, dtype=torch.bool).triu(1)[None, None] & mask[:, None, None, :]
                allowed = rec.allowed_rows(0, n)
                allowed = torch.ones_like(later_real) if allowed is None else allowed.expand_as(later_real)
                assert allowed[later_real & mask[:, None, :, None]].all(), where


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_allowed_rows_without_mask(kind, models):
    """A pure causal pass (no padding) records no mask; allowed_rows must rebuild the causal one."""
    model, tokenizer, _ = models[kind]
    ids = torch.randint(4, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    _, records = run_captured(model, batch, {0})
    model.set_attn_implementation("sdpa")
    rec = records[0]
    if rec.allowed is None:
        assert rec.causal
    allowed = rec.allowed_rows(3, 7)
    want = torch.arange(9)[None, :] <= torch.arange(3, 7)[:, None]
    assert torch.equal(allowed.expand(2, 1, 4, 9), want[None, None].expand(2, 1, 4, 9))
