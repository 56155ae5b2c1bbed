"""`shd export --format gguf`: tiny random Llama / Qwen2 / Gemma-3 / Qwen3 / Mistral students with unusual
shapes, written to GGUF and read back by a consumer that shares no code with the writer (transformers' GGUF
loader).

Tolerances, max |logit difference| relative to the largest |logit| of the student's own output:
f32 1e-6 (measured: 0, the file is exact), f16 5e-3 (measured <= 1.4e-3), q8_0 5e-2 (measured <= 3.2e-2 on
these random tiny models: weights rounded to 8 bits per block of 32). Greedy continuations must be identical at f32.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shdcli.errors import ShdError
from shdcli.export import DTYPES, export, permute_for_rope
from tests.tiny import SENTENCES

gguf = pytest.importorskip("gguf")

FAMILIES = ("llama", "qwen2", "gemma3", "qwen3", "mistral")
TOLERANCE = {"f32": 1e-6, "f16": 5e-3, "q8_0": 5e-2}
TEXT = "The quick brown fox jumps over the lazy dog while the teacher squeezes heads."


def _byte_level_tokenizer():
    """GPT-2 style byte-level BPE (llama.cpp `gpt2`), BOS added, trained offline on shd's sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES.read_text().splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.token_to_id("<|endoftext|>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>")


def _sentencepiece_tokenizer():
    """SentencePiece-style BPE with byte fallback (llama.cpp `llama`), as Gemma/Llama-2 tokenizer.json files are."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", *bytes_],
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES.read_text().splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def _config(family: str, vocab: int):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if family == "llama":  # 3 heads, 3 KV heads, head_dim 20 != 96 / 3, odd MLP width
        return LlamaConfig(vocab_size=vocab, hidden_size=96, num_hidden_layers=2, num_attention_heads=3,
                           num_key_value_heads=3, head_dim=20, intermediate_size=77, max_position_embeddings=128,
                           rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    if family == "qwen2":  # 6 heads sharing 2 KV heads, q/k/v biases, odd MLP width
        return Qwen2Config(vocab_size=vocab, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                           num_key_value_heads=2, intermediate_size=101, max_position_embeddings=128,
                           rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    if family == "qwen3":  # q/k norms; head_dim 128 != 96 / 4 (transformers' GGUF reader assumes Qwen3's 128)
        return Qwen3Config(vocab_size=vocab, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=128, intermediate_size=70, max_position_embeddings=128,
                           tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    if family == "mistral":  # 6 heads, 3 KV heads (not a power of two), written as llama.cpp's llama
        return MistralConfig(vocab_size=vocab, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                             num_key_value_heads=3, head_dim=16, intermediate_size=80, max_position_embeddings=128,
                             sliding_window=None, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    # Gemma-3 text: 3 heads, 1 KV head, head_dim 256 (8x the width / heads), sliding window 6 < the text
    return Gemma3TextConfig(vocab_size=vocab, hidden_size=96, num_hidden_layers=3, num_attention_heads=3,
                            num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, intermediate_size=90,
                            max_position_embeddings=128, sliding_window=6, bos_token_id=2, eos_token_id=1,
                            pad_token_id=0)


def make_student(family: str, folder: Path) -> Path:
    """A tiny random causal LM of `family` with a tokenizer, saved as an HF folder (what distill writes)."""
    from transformers import AutoModelForCausalLM

    tokenizer = _sentencepiece_tokenizer() if family == "gemma3" else _byte_level_tokenizer()
    torch.manual_seed(FAMILIES.index(family))
    model = AutoModelForCausalLM.from_config(_config(family, len(tokenizer)), dtype=torch.float32)
    with torch.no_grad():  # random norm weights: a wrong Gemma +1 or a missing norm would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5) if family == "gemma3" else param.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def students(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("export")
    return {family: make_student(family, base / family / "student") for family in FAMILIES}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_transformers(students, family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = students[family]
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 8  # longer than Gemma's sliding window
    want = _logits(reference, ids)
    for dtype in DTYPES:
        out = tmp_path / f"{family}-{dtype}.gguf"
        result = export(folder, "gguf", dtype, out)
        assert out.is_file() and result.bytes == out.stat().st_size
        assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed, nothing left behind
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
        got = _logits(loaded, ids)
        err = (got - want).abs().max().item() / want.abs().max().item()
        assert err < TOLERANCE[dtype], f"{family} {dtype}: relative logit error {err:.2e}"
        if dtype == "f32":
            prompt = ids[:, :6]
            kwargs = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
            assert torch.equal(reference.generate(prompt, **kwargs), loaded.generate(prompt, **kwargs))
            # The tokenizer read back from the file splits text as the student's own does.
            gguf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
            for line in SENTENCES.read_text().splitlines()[:20]:
                assert gguf_tok(line)["input_ids"] == tokenizer(line)["input_ids"], line
        if dtype == "q8_0":
            assert result.tensor_types.get("Q8_0", 0) > 0 and result.tensor_types.get("F16", 0) > 0, result
            assert any("stay f16" in note for note in result.notes)


def _reader_value(reader, key):
    return reader.fields[key].contents()


def test_metadata_states_the_student_shape(students, tmp_path):
    out = tmp_path / "g.gguf"
    export(students["gemma3"], "gguf", "f16", out)
    reader = gguf.GGUFReader(str(out))
    assert _reader_value(reader, "general.architecture") == "gemma3"
    assert _reader_value(reader, "gemma3.attention.head_count") == 3
    assert _reader_value(reader, "gemma3.attention.head_count_kv") == 1
    assert _reader_value(reader, "gemma3.attention.key_length") == 256
    assert _reader_value(reader, "gemma3.feed_forward_length") == 90
    assert _reader_value(reader, "gemma3.attention.sliding_window") == 6
    assert _reader_value(reader, "gemma3.attention.sliding_window_pattern") == [True, True, True]
    assert _reader_value(reader, "tokenizer.ggml.model") == "llama"
    # Gemma norms are stored as 1 + w: compare with the safetensors weight directly.
    from safetensors.torch import load_file

    state = load_file(str(students["gemma3"] / "model.safetensors"))
    stored = next(t for t in reader.tensors if t.name == "blk.1.attn_norm.weight")
    np.testing.assert_allclose(np.asarray(stored.data), state["model.layers.1.input_layernorm.weight"].numpy() + 1,
                               rtol=0, atol=1e-7)


def test_rope_permutation_matches_interleaved_rotation():
    """permute_for_rope turns HF's rotate-half layout into llama.cpp's adjacent pairs: rotating the
    permuted vector pairwise equals permuting the rotate-half rotation (slow explicit loops)."""
    torch.manual_seed(0)
    heads, d = 3, 8
    q = torch.randn(heads * d, 1, dtype=torch.float64)
    angles = torch.rand(d // 2, dtype=torch.float64) * 3

    def rotate_half(vec):  # HF: pair (i, i + d/2)
        out = vec.clone()
        for h in range(heads):
            for i in range(d // 2):
                a, b = vec[h * d + i], vec[h * d + i + d // 2]
                c, s = torch.cos(angles[i]), torch.sin(angles[i])
                out[h * d + i], out[h * d + i + d // 2] = a * c - b * s, a * s + b * c
        return out

    def rotate_pairs(vec):  # llama.cpp (GGML_ROPE_TYPE_NORM): pair (2i, 2i + 1)
        out = vec.clone()
        for h in range(heads):
            for i in range(d // 2):
                a, b = vec[h * d + 2 * i], vec[h * d + 2 * i + 1]
                c, s = torch.cos(angles[i]), torch.sin(angles[i])
                out[h * d + 2 * i], out[h * d + 2 * i + 1] = a * c - b * s, a * s + b * c
        return out

    assert torch.allclose(rotate_pairs(permute_for_rope(q, heads)), permute_for_rope(rotate_half(q), heads))


def test_unsupported_family_and_format(tiny_models, students, tmp_path):
    with pytest.raises(ShdError, match="'bert' cannot be exported to GGUF"):
        export(tiny_models["bert"], "gguf", "f16", tmp_path / "x.gguf")
    with pytest.raises(ShdError, match="'onnx' is not an export format"):
        export(students["llama"], "onnx", None, None)
    with pytest.raises(ShdError, match="'q4_k' is not a GGUF dtype"):
        export(students["llama"], "gguf", "q4_k", None)
    assert not (tmp_path / "x.gguf").exists()


def test_failed_export_keeps_the_old_file(students, tmp_path):
    """A student whose weights lack a tensor fails before anything replaces an existing .gguf."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken" / "student"
    broken.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_text((students["llama"] / name).read_text())
    state = load_file(str(students["llama"] / "model.safetensors"))
    state["model.layers.1.mlp.extra_gate.weight"] = torch.zeros(2, 2)
    save_file(state, str(broken / "model.safetensors"))
    out = tmp_path / "old.gguf"
    out.write_bytes(b"previous export")
    with pytest.raises(ShdError, match="has no GGUF name"):
        export(broken, "gguf", "f16", out)
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "old.gguf"]


def test_safetensors_format_copies_the_folder(students, tmp_path):
    out = export(students["qwen2"], "safetensors", None, tmp_path / "copy")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in students["qwen2"].iterdir())
    assert export(students["qwen2"], "safetensors", None, None) == students["qwen2"]


def test_cli_export(students, tmp_path):
    out = tmp_path / "cli.gguf"
    run = subprocess.run([sys.executable, "-m", "shdcli", "export", str(students["qwen2"]), "--format", "gguf",
                          "--dtype", "q8_0", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.is_file() and "qwen2" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "shdcli", "export", str(students["qwen2"]), "--format", "onnx"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "onnx" in bad.stderr and "Traceback" not in bad.stderr
    assert json.loads((students["qwen2"] / "config.json").read_text())["model_type"] == "qwen2"


def test_per_layer_head_counts_and_widths_come_from_the_tensors(students, tmp_path):
    """A student pruned unevenly (layer 1: 2 of 3 heads and KV heads, a narrower MLP) is described per layer."""
    from safetensors.torch import load_file, save_file

    pruned = tmp_path / "pruned" / "student"
    shutil.copytree(students["llama"], pruned)
    state = load_file(str(pruned / "model.safetensors"))
    p = "model.layers.1."
    state[p + "self_attn.q_proj.weight"] = state[p + "self_attn.q_proj.weight"][:40].clone()  # 2 heads x 20
    state[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"][:, :40].clone()
    for name in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):  # and 2 of 3 key/value heads
        state[p + name] = state[p + name][:40].clone()
    for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        state[p + name] = state[p + name][:50].clone()
    state[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, :50].clone()
    save_file(state, str(pruned / "model.safetensors"))
    out = tmp_path / "pruned.gguf"
    export(pruned, "gguf", "f32", out)
    reader = gguf.GGUFReader(str(out))
    assert _reader_value(reader, "llama.attention.head_count") == [3, 2]
    assert _reader_value(reader, "llama.attention.head_count_kv") == [3, 2]
    assert _reader_value(reader, "llama.feed_forward_length") == [77, 50]
    q = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    assert list(q.shape) == [96, 40]  # ggml order: [in, out]


def _tokenizer_fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def test_tokenizer_is_copied_from_a_gguf_teacher(students, tmp_path):
    """A run whose teacher was a GGUF file: the student's file carries the teacher's tokenizer keys as they
    are (found through the run's metrics.json, or the model card when the folder was moved alone)."""
    teacher = tmp_path / "teacher.gguf"
    export(students["qwen2"], "gguf", "f16", teacher)
    run = tmp_path / "run"
    shutil.copytree(students["qwen2"], run / "student")
    (run / "metrics.json").write_text(json.dumps({"recipe": {"teacher": {"path": str(teacher)}}}))
    (run / "student" / "tokenizer.json").unlink()  # so a conversion could not have produced the keys
    result = export(run / "student", "gguf", "q8_0", tmp_path / "student.gguf")
    assert result.tokenizer.startswith("copied from the teacher's GGUF teacher.gguf")
    want = _tokenizer_fields(teacher)
    assert _tokenizer_fields(result.path) == want and "tokenizer.ggml.merges" in want

    alone = tmp_path / "moved"
    shutil.copytree(run / "student", alone)
    (alone / "README.md").write_text(f"---\nbase_model: {teacher}\nlibrary_name: transformers\n---\n# card\n")
    assert _tokenizer_fields(export(alone, "gguf", "f16", tmp_path / "moved.gguf").path) == want


def test_gemma_query_scale_is_folded_for_llamacpp(tmp_path):
    """llama.cpp's gemma3 scales queries by 1/sqrt(head_dim); a student with query_pre_attn_scalar != head_dim
    gets the difference folded into q_norm. transformers told to use 1/sqrt(head_dim) as llama.cpp does
    (query_pre_attn_scalar=head_dim) must then reproduce the student's logits."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    tokenizer = _sentencepiece_tokenizer()
    torch.manual_seed(5)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=200, intermediate_size=64,
                              max_position_embeddings=128, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tmp_path / "gemma" / "student"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    result = export(folder, "gguf", "f32", tmp_path / "g.gguf")
    assert any("query_pre_attn_scalar" in note for note in result.notes)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    like_llamacpp = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="g.gguf", dtype=torch.float32,
                                                         query_pre_attn_scalar=32).eval()
    want, got = _logits(model, ids), _logits(like_llamacpp, ids)
    assert (got - want).abs().max().item() / want.abs().max().item() < 1e-5
