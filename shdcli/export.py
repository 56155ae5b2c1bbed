"""`shd export`: write a causal-LM student as one GGUF file for llama.cpp (and everything built on it).

What llama.cpp needs that an HF folder states differently (following llama.cpp's convert_hf_to_gguf.py):
  - metadata under llama.cpp's keys, from the student's config.json: blocks, heads and KV heads (one
    number, or one per layer when the student's layers differ), head_dim as key/value length, MLP width
    (read from the tensors, so a pruned width is what the file says), rope base and scaling, norms,
    context length; Gemma-3 adds its sliding-window layers, local rope base and final soft-capping;
  - tensor names through the `gguf` package's own map for the architecture (get_tensor_name_map);
  - Llama / Mistral q and k rows permuted from HF's rotate-half rope layout to llama.cpp's interleaved one;
  - Gemma-3 RMSNorm weights stored as 1 + w (HF keeps w and adds 1 in the forward);
  - the tokenizer: copied from the teacher's GGUF when the teacher was one (the exact vocabulary,
    merges, special tokens and chat template llama.cpp already ran), else converted from the HF
    tokenizer.json (byte-level BPE -> `gpt2`, SentencePiece-style BPE with byte fallback -> `llama`).

Weights: f32 keeps every tensor in float32; f16 and q8_0 store matrices as float16 / Q8_0 blocks of 32
and keep 1-D tensors (norms, biases) in float32, as llama.cpp's converter does. A matrix whose rows are
not a multiple of 32 long cannot be Q8_0 and falls back to f16 (reported in the result's notes).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml

from shdcli.errors import ShdError, article
from shdcli.models.families import gguf_families
from shdcli.models.sources import TOKENIZER_FILES, source_path
from shdcli.report import destination, fsync_dir, make_readable, write_folder_atomic
from shdcli.tasks.base import CAUSAL_LM
from shdcli.tasks.registry import task_of

FORMATS = ("gguf", "safetensors")
DTYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32

# HF model_type -> (gguf architecture name, q/k rope permutation, Gemma norm +1): the family table's `gguf`
FAMILIES = gguf_families()


@dataclass
class ExportResult:
    path: Path
    arch: str
    dtype: str
    tensors: int
    bytes: int
    tokenizer: str  # where the vocabulary came from
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensor count
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- entry points
def export(student_dir: Path, fmt: str, dtype: str | None, out: Path | None) -> ExportResult | Path:
    """`shd export`: a GGUF file (ExportResult) or a copy of the HF folder (its path)."""
    student_dir = Path(student_dir)
    if fmt not in FORMATS:
        raise ShdError(f"--format: {fmt!r} is not an export format; use {' or '.join(FORMATS)}")
    if not (student_dir / "config.json").is_file():
        raise ShdError(f"{student_dir}: no config.json; give a student folder written by `shd distill`")
    if fmt == "safetensors":
        if dtype is not None:
            raise ShdError("--dtype applies to --format gguf; the safetensors folder keeps the student's dtype")
        return copy_folder(student_dir, out)
    dtype = dtype or "f16"
    if dtype not in DTYPES:
        raise ShdError(f"--dtype: {dtype!r} is not a GGUF dtype shd writes; use {', '.join(DTYPES)}")
    default_name = f"{student_dir.name}-{dtype}.gguf"
    out = student_dir.parent / default_name if out is None else Path(out)
    if out.is_dir():
        out = out / default_name
    return export_gguf(student_dir, out, dtype)


def copy_folder(student_dir: Path, out: Path | None) -> Path:
    """The HF folder is already the safetensors export; with --out, an atomic copy of it."""
    if out is None or Path(out).resolve() == student_dir.resolve():
        return student_dir
    with destination("--out", Path(out)):  # a full or read-only disk: one line, no partial copy left
        write_folder_atomic(Path(out), lambda tmp: shutil.copytree(student_dir, tmp, dirs_exist_ok=True))
    return Path(out)


def export_gguf(student_dir: Path, out: Path, dtype: str) -> ExportResult:
    gguf = _import_gguf()
    config = _read_config(student_dir)
    model_type = config.get("model_type", "?")
    if model_type not in FAMILIES:
        hint = " (multimodal Gemma-3: export its text model, Gemma3ForCausalLM)" if model_type == "gemma3" else ""
        raise ShdError(
            f"{student_dir}: model family {model_type!r} cannot be exported to GGUF{hint}; shd writes "
            f"{', '.join(sorted(FAMILIES))} (other families: --format safetensors)"
        )
    if task_of(SimpleNamespace(architectures=config.get("architectures"), model_type=model_type)) != CAUSAL_LM:
        names = ", ".join(config.get("architectures") or [model_type])
        raise ShdError(f"{student_dir}: {article(names)} {names} model is not a causal LM; GGUF export "
                       "needs a ...ForCausalLM student (use --format safetensors)")
    arch_name, permute_qk, norm_plus_one = FAMILIES[model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    state = _load_state(student_dir)
    shape = _layer_shapes(config, state)
    notes: list[str] = []

    with destination("--out", out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-")  # same filesystem: rename
    os.close(tmp_fd)
    tmp = Path(tmp_name)
    writer = gguf.GGUFWriter(str(tmp), arch_name)
    try:
        _write_metadata(writer, gguf, config, shape, student_dir, dtype, notes)
        tokenizer_source = _write_tokenizer(writer, gguf, student_dir, config, notes)
        counts = _write_tensors(writer, gguf, arch, config, state, shape, dtype, permute_qk, norm_plus_one, notes)
        with destination("--out", out):
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            make_readable(tmp)
            os.replace(tmp, out)
            fsync_dir(out.parent)
    finally:
        if writer.fout is not None:  # failed half way: close before removing the partial file
            writer.close()
        tmp.unlink(missing_ok=True)
    return ExportResult(out, arch_name, dtype, sum(counts.values()), out.stat().st_size, tokenizer_source,
                        counts, notes)


# --------------------------------------------------------------------------- reading the student
def _import_gguf():
    try:
        import gguf
    except ImportError as exc:
        raise ShdError("--format gguf needs the gguf package: pip install 'shd[gguf]'") from exc
    return gguf


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ShdError(f"{folder}/config.json: cannot read it ({exc}); fix or replace it") from None
    text = config.get("text_config")
    if config.get("model_type") == "gemma3" and isinstance(text, dict) and "vision_config" not in config:
        config = {**text, "architectures": ["Gemma3ForCausalLM"]}
    return config


def _load_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ShdError(f"{folder}: no model.safetensors; GGUF export reads safetensors weights only")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


@dataclass
class LayerShapes:
    """Per-layer counts as the tensors state them (a pruned student may differ from its config)."""

    blocks: int
    head_dim: int
    heads: list[int]
    kv_heads: list[int]
    ffn: list[int]
    hidden: int
    vocab: int


def _layer_shapes(config: dict, state: dict[str, torch.Tensor]) -> LayerShapes:
    blocks = int(config["num_hidden_layers"])
    heads_cfg = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads_cfg)
    heads, kv, ffn = [], [], []
    for i in range(blocks):
        prefix = f"model.layers.{i}."
        try:
            q = state[prefix + "self_attn.q_proj.weight"]  # [H d, D]
            k = state[prefix + "self_attn.k_proj.weight"]  # [KV d, D]
            up = state[prefix + "mlp.up_proj.weight"]  # [F, D]
        except KeyError as exc:
            raise ShdError(f"model.safetensors lacks {exc.args[0]}; the student folder is incomplete") from None
        if q.shape[0] % head_dim or k.shape[0] % head_dim:
            raise ShdError(f"layer {i}: q/k projections of {q.shape[0]}/{k.shape[0]} rows are not whole heads of "
                           f"head_dim {head_dim} (config.json head_dim is wrong)")
        heads.append(q.shape[0] // head_dim)
        kv.append(k.shape[0] // head_dim)
        ffn.append(up.shape[0])
        if heads[-1] % kv[-1]:
            raise ShdError(f"layer {i}: {heads[-1]} query heads cannot share {kv[-1]} key/value heads evenly")
    vocab = state["model.embed_tokens.weight"].shape[0]
    return LayerShapes(blocks, head_dim, heads, kv, ffn, hidden, vocab)


def _one_or_list(values: list[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else values


# --------------------------------------------------------------------------- metadata
def _rope(config: dict) -> tuple[dict, dict | None]:
    """(rope parameters of the full-attention layers, of the sliding ones or None); transformers 5 keeps
    them in rope_parameters (per layer type for Gemma-3), older configs in rope_theta / rope_scaling."""
    params = config.get("rope_parameters") or {}
    if "full_attention" in params:
        return params["full_attention"], params.get("sliding_attention")
    full = dict(params) or dict(config.get("rope_scaling") or {})
    full.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    local = {"rope_theta": config["rope_local_base_freq"]} if config.get("rope_local_base_freq") else None
    return full, local


def _write_metadata(writer, gguf, config: dict, shape: LayerShapes, student_dir: Path, dtype: str,
                    notes: list[str]) -> None:
    model_type = config["model_type"]
    name = student_dir.resolve().name if student_dir.resolve().name != "student" else student_dir.resolve().parent.name
    if name == "mistral":  # transformers' GGUF reader takes a llama file named exactly that for an arch
        name = "mistral-student"  # "mistral", which gguf-py lacks; as llama it loads (Mistral without SWA)
    writer.add_type("model")
    writer.add_name(name)
    teacher = _teacher_spec(student_dir)
    if teacher:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, str(teacher))
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_block_count(shape.blocks)
    writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(_one_or_list(shape.ffn))
    writer.add_head_count(_one_or_list(shape.heads))
    writer.add_head_count_kv(_one_or_list(shape.kv_heads))
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(shape.vocab)

    full, local = _rope(config)
    writer.add_rope_freq_base(float(full.get("rope_theta", 10000.0)))
    rope_type = (full.get("rope_type") or full.get("type") or "default").lower()
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    elif rope_type not in ("default", "llama3"):  # llama3 is written as a rope_freqs tensor (_rope_factors)
        raise ShdError(f"{student_dir}: rope_type {rope_type!r} is not exported to GGUF yet (default, linear and "
                       "llama3 are); use --format safetensors")
    partial = float(config.get("partial_rotary_factor") or full.get("partial_rotary_factor") or 1.0)
    writer.add_rope_dimension_count(int(shape.head_dim * partial))

    if model_type == "gemma3_text":
        _gemma3_metadata(writer, config, shape, local, notes)
    elif model_type == "mistral" and config.get("sliding_window"):
        if int(config["sliding_window"]) < int(config.get("max_position_embeddings") or 0):
            notes.append(f"Mistral sliding_window={config['sliding_window']} is not written: llama.cpp runs the "
                         "llama architecture with full attention (as its own converter does)")


def _gemma3_metadata(writer, config: dict, shape: LayerShapes, local: dict | None, notes: list[str]) -> None:
    if config.get("attn_logit_softcapping") is not None:
        raise ShdError("Gemma-3 student with attn_logit_softcapping: llama.cpp's gemma3 has none; use safetensors")
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    layer_types = config.get("layer_types") or []
    if config.get("sliding_window") and "sliding_attention" in layer_types:
        writer.add_sliding_window(int(config["sliding_window"]))
        # One flag per layer: a derived student keeps its teacher layers' types, not the 5:1 period.
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        if local is not None:
            writer.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))
    scalar = float(config.get("query_pre_attn_scalar") or shape.head_dim)
    if scalar != shape.head_dim:
        notes.append(f"query_pre_attn_scalar {scalar:g} != head_dim {shape.head_dim}: llama.cpp scales queries by "
                     "1/sqrt(head_dim), so q_norm is multiplied by sqrt(head_dim / query_pre_attn_scalar)")


# --------------------------------------------------------------------------- tensors
def permute_for_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows (per head: first halves, then second halves) -> llama.cpp's interleaved pairs.
    weight: [n_head * d, ...] (a q/k projection or its bias); the same as convert_hf_to_gguf's permute."""
    d = weight.shape[0] // n_head
    return weight.reshape(n_head, 2, d // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope_factors(config: dict, head_dim: int) -> torch.Tensor | None:
    """Llama-3 rope scaling as llama.cpp's per-frequency divisor tensor (rope_freqs), else None."""
    full, _ = _rope(config)
    if (full.get("rope_type") or full.get("type") or "").lower() != "llama3":
        return None
    base = float(full.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factor, low, high = full.get("factor", 8.0), full.get("low_freq_factor", 1.0), full.get("high_freq_factor", 4.0)
    old = full.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _write_tensors(writer, gguf, arch, config: dict, state: dict[str, torch.Tensor], shape: LayerShapes, dtype: str,
                   permute_qk: bool, norm_plus_one: bool, notes: list[str]) -> dict[str, int]:
    name_map = gguf.get_tensor_name_map(arch, shape.blocks)
    tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in state
    q_scale = 1.0
    if config["model_type"] == "gemma3_text":
        q_scale = math.sqrt(shape.head_dim / float(config.get("query_pre_attn_scalar") or shape.head_dim))
    counts: dict[str, int] = {}
    fallback = []
    for hf_name in sorted(state, key=_tensor_order):
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ShdError(f"tensor {hf_name} has no GGUF name in the {gguf.MODEL_ARCH_NAMES[arch]} map; this "
                           "student has parts llama.cpp does not run (use --format safetensors)")
        data = state[hf_name].to(torch.float32)
        match = _LAYER.match(hf_name)
        layer = int(match.group(1)) if match else None
        if permute_qk and layer is not None:
            if ".self_attn.q_proj." in hf_name:
                data = permute_for_rope(data, shape.heads[layer])
            elif ".self_attn.k_proj." in hf_name:
                data = permute_for_rope(data, shape.kv_heads[layer])
        if norm_plus_one and hf_name.endswith("norm.weight"):
            data = data + 1.0  # Gemma3RMSNorm: x * (1 + w); llama.cpp multiplies by the stored weight
            if hf_name.endswith("self_attn.q_norm.weight"):
                data = data * q_scale
        kind = _write_one(writer, gguf, gguf_name, data.numpy(), dtype)
        if dtype == "q8_0" and data.dim() == 2 and kind != "Q8_0":
            fallback.append(gguf_name)
        counts[kind] = counts.get(kind, 0) + 1
    factors = _rope_factors(config, shape.head_dim)
    if factors is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        counts["F32"] = counts.get("F32", 0) + 1
        writer.add_tensor(name, factors.numpy())
    if fallback:
        notes.append(f"{len(fallback)} matrices with rows not a multiple of {Q8_BLOCK} stay f16 (e.g. {fallback[0]})")
    return counts


def _tensor_order(name: str) -> tuple:
    match = _LAYER.match(name)
    return (1, int(match.group(1)), name) if match else (0 if "embed" in name else 2, 0, name)


def _write_one(writer, gguf, name: str, data: np.ndarray, dtype: str) -> str:
    """Add one tensor in the requested dtype; returns the ggml type name it was stored as."""
    q_type = gguf.GGMLQuantizationType
    if data.ndim <= 1 or dtype == "f32" or name.endswith("_norm.weight"):
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        return "F32"
    if dtype == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
        writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data), q_type.Q8_0), raw_dtype=q_type.Q8_0)
        return "Q8_0"
    writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))
    return "F16"


# --------------------------------------------------------------------------- tokenizer
def _teacher_spec(student_dir: Path) -> str | None:
    """The recipe's teacher path: from the run's metrics.json next to the student folder, else from the
    model card's front matter (base_model) when the folder was moved on its own; None if neither says."""
    try:
        return json.loads((student_dir.parent / "metrics.json").read_text())["recipe"]["teacher"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        front = (student_dir / "README.md").read_text().split("---\n")[1]
        return yaml.safe_load(front).get("base_model")
    except (OSError, IndexError, AttributeError, yaml.YAMLError):
        return None


def teacher_gguf(student_dir: Path) -> Path | None:
    """The teacher's GGUF file when the run's teacher was one and it is still there."""
    spec = _teacher_spec(student_dir)
    if not spec or not str(spec).endswith(".gguf"):
        return None
    try:
        path = source_path(str(spec), "teacher.path")
    except ShdError:
        return None
    return path if path.is_file() else None


def _write_tokenizer(writer, gguf, student_dir: Path, config: dict, notes: list[str]) -> str:
    vocab = int(config.get("vocab_size") or 0)
    source = teacher_gguf(student_dir)
    if source is not None:
        reader = gguf.GGUFReader(str(source))
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is not None and len(tokens.data) == vocab:
            copy_tokenizer_fields(writer, gguf, reader)
            return f"copied from the teacher's GGUF {source.name}"
        notes.append(f"teacher GGUF {source.name} has {len(tokens.data) if tokens else 0} tokens, the student "
                     f"{vocab}: converting the student's own tokenizer instead")
    return convert_hf_tokenizer(writer, gguf, student_dir, vocab, config["model_type"], notes)


def copy_tokenizer_fields(writer, gguf, reader) -> None:
    """Every tokenizer.* key of a GGUF file, with its stored type (arrays keep their element type)."""
    value_type = gguf.GGUFValueType
    for key, fld in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = fld.types[0]
        if main == value_type.ARRAY:
            writer.add_key_value(key, fld.contents(), main, sub_type=fld.types[-1])
        else:
            writer.add_key_value(key, fld.contents(), main)


def _pre_tokenizer_name(tok_json: dict) -> str | None:
    """llama.cpp's name for the BPE pre-tokenizer that tokenizer.json describes (None: not recognised)."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # SmolLM / SmolLM2
    if kinds[:1] == ["Split"] and kinds[-1] == "ByteLevel":
        regex = (parts[0].get("pattern") or {}).get("Regex", "")
        if regex.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"):
            return "llama-bpe"
        if regex.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"):
            return "qwen2"
    return None


def convert_hf_tokenizer(writer, gguf, folder: Path, vocab: int, model_type: str, notes: list[str]) -> str:
    """Byte-level BPE -> llama.cpp `gpt2`; SentencePiece-style BPE (byte fallback) -> `llama`."""
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        present = [n for n in TOKENIZER_FILES if (folder / n).exists()]
        raise ShdError(f"{folder}: GGUF export converts the tokenizer from tokenizer.json, which is missing "
                       f"(found {present or 'no tokenizer files'}); save a fast tokenizer into the folder")
    tok_json = json.loads(tok_file.read_text())
    model = tok_json.get("model", {})
    if model.get("type") != "BPE":
        raise ShdError(f"{tok_file}: a {model.get('type')} tokenizer cannot be converted to GGUF by shd (BPE only)")
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    if model.get("byte_fallback"):
        spm = gguf.LlamaHfVocab(folder)
        tokens, scores, types = [], [], []
        for text, score, kind in spm.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        _pad_vocab(gguf, tokens, types, vocab, scores)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        if model_type == "gemma3_text":
            writer.add_add_space_prefix(False)
        kind_name = "SentencePiece-style BPE (llama)"
    else:
        reverse = {i: t for t, i in hf_tok.get_vocab().items()}
        added = hf_tok.added_tokens_decoder
        tokens, types = [], []
        for i in range(max(vocab, len(reverse))):
            if i not in reverse:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
                continue
            tokens.append(reverse[i])
            if i in added:
                types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            else:
                types.append(gguf.TokenType.NORMAL)
        pre = _pre_tokenizer_name(tok_json)
        if pre is None:
            notes.append("pre-tokenizer of tokenizer.json not recognised: wrote llama.cpp's `default`; llama.cpp "
                         "may split text differently from transformers (token ids given directly are unaffected)")
            pre = "default"
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        kind_name = f"byte-level BPE (gpt2, pre {pre})"
    special = gguf.SpecialVocab(folder, load_merges=not model.get("byte_fallback"), n_vocab=len(tokens))
    # What the HF tokenizer really does with BOS/EOS, not what a config flag may claim.
    ids = hf_tok("a")["input_ids"]
    special.add_special_token["bos"] = hf_tok.bos_token_id is not None and ids[:1] == [hf_tok.bos_token_id]
    special.add_special_token["eos"] = hf_tok.eos_token_id is not None and ids[-1:] == [hf_tok.eos_token_id]
    special.add_to_gguf(writer, quiet=True)
    return f"converted from tokenizer.json: {kind_name}, {len(tokens)} tokens"


def _pad_vocab(gguf, tokens: list, types: list, vocab: int, scores: list | None = None) -> None:
    """llama.cpp needs one token per embedding row: unused [PADi] entries up to the model's vocab_size."""
    if len(tokens) > vocab:
        raise ShdError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab} embedding rows; "
                       "the student folder's tokenizer does not belong to its weights")
    for i in range(len(tokens), vocab):
        tokens.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)


def describe(result: ExportResult) -> str:
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(result.tensor_types.items()))
    return (f"{result.path}: GGUF {result.arch}, {result.dtype}, {result.tensors} tensors ({kinds}), "
            f"{result.bytes / 2**20:.1f} MiB; tokenizer {result.tokenizer}")
