"""Load teachers, derive students, save them: everything that knows about model families.

Sources a recipe may name (all offline):
  - an HF folder (config.json + model.safetensors + tokenizer files);
  - a GGUF file, de-quantised once and cached as a safetensors HF folder under SHD_CACHE;
  - `pkg://package/sub/path`: a folder or GGUF file shipped inside an installed Python package.

Family knowledge is kept to one table of attention parameter names (Llama-style q/k/v/o_proj,
BERT/ViT query/key/value + attention.output.dense, GPT-2 fused c_attn/c_proj).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shdcli.errors import ShdError
from shdcli.report import write_folder_atomic

CAUSAL_LM = "causal-lm"
ENCODER = "encoder"
IMAGE_CLASSIFICATION = "image-classification"  # ViT / DeiT ...ForImageClassification (see vision.py)


def cache_dir() -> Path:
    """Where converted models and tokenised data are cached (SHD_CACHE, default ~/.cache/shd)."""
    return Path(os.environ.get("SHD_CACHE", Path.home() / ".cache" / "shd"))


# --------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ModelShape:
    """The numbers SHD needs from a config, whatever the family calls them."""

    model_type: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int | None
    vocab: int | None
    max_positions: int | None


def _first_attr(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def model_shape(config) -> ModelShape:
    config = getattr(config, "text_config", None) or config
    layers = _first_attr(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first_attr(config, "num_attention_heads", "n_head", "num_heads")
    hidden = _first_attr(config, "hidden_size", "n_embd", "d_model")
    if layers is None or heads is None or hidden is None:
        raise ShdError(f"model type {config.model_type!r}: cannot find its layer, head or width counts in config.json")
    kv_heads = _first_attr(config, "num_key_value_heads", default=heads) or heads
    head_dim = _first_attr(config, "head_dim", default=hidden // heads)
    intermediate = _first_attr(config, "intermediate_size", "n_inner")
    if intermediate is None and config.model_type == "gpt2":
        intermediate = 4 * hidden
    return ModelShape(
        model_type=config.model_type,
        layers=int(layers),
        heads=int(heads),
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        hidden=int(hidden),
        intermediate=int(intermediate) if intermediate else None,
        vocab=_first_attr(config, "vocab_size"),
        max_positions=_first_attr(config, "max_position_embeddings", "n_positions"),
    )


def task_of(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForImageClassification", "ForImageClassificationWithTeacher")) for a in archs):
        return IMAGE_CLASSIFICATION
    if any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        return CAUSAL_LM
    if not archs and getattr(config, "model_type", "") in {"gpt2", "llama", "mistral", "qwen2", "gemma3_text", "phi3"}:
        return CAUSAL_LM
    return ENCODER


# --------------------------------------------------------------------------- sources
def resolve_source(spec: str, field: str) -> Path:
    """Turn a recipe's model reference into a local HF folder (converting GGUF once)."""
    path = source_path(spec, field)
    if not os.path.exists(path):  # os.path: False (not an exception) for over-long or odd names
        raise ShdError(f"{field}: {spec} does not exist; give an HF folder, a .gguf file or pkg://package/path")
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, field)
    if path.is_file():
        raise ShdError(f"{field}: {spec} is a file; give an HF model folder (with config.json) or a .gguf file")
    if not (path / "config.json").exists():
        raise ShdError(f"{field}: {spec} has no config.json; point it at a Hugging Face model folder")
    return path


def source_path(spec: str, field: str) -> Path:
    """The file or folder a model reference names (pkg:// resolved), before any conversion."""
    return _resolve_pkg(spec, field) if spec.startswith("pkg://") else Path(spec).expanduser()


def _resolve_pkg(spec: str, field: str) -> Path:
    rest = spec.removeprefix("pkg://")
    package, _, sub = rest.partition("/")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        hint = package.replace("_", "-")
        raise ShdError(f"{field}: Python package {package!r} is not installed (pip install {hint})")
    return Path(list(found.submodule_search_locations)[0]) / sub


def convert_gguf(path: Path, field: str) -> Path:
    """De-quantise a GGUF file to a float32 safetensors HF folder, once (cached by path, size, mtime)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").exists():
        return target
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ShdError(f"{field}: {path.name} is a GGUF file; install the extra: pip install 'shd[gguf]'") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001 - a damaged or unsupported GGUF fails in many ways
        raise ShdError(
            f"{field}: cannot convert {path} ({_first_line(exc)}); the GGUF file is damaged or of an "
            "architecture transformers cannot read"
        ) from None
    # A GGUF-loaded model refuses save_pretrained until its quantizer is detached (weights are float already).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_model_folder(model, tokenizer, target)
    return target


def _auto_class(task: str):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

    return {CAUSAL_LM: AutoModelForCausalLM, IMAGE_CLASSIFICATION: AutoModelForImageClassification}.get(task, AutoModel)


def load_model(
    folder: Path,
    field: str,
    task: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, object | None, str]:
    """Load (model, tokenizer or None, task) from an HF folder; safetensors only unless allow_pickle.
    Image classifiers come with their image processor in the tokenizer's place (vision.load_processor)."""
    from transformers import AutoConfig, AutoTokenizer

    has_safetensors = any(folder.glob("*.safetensors"))
    has_pickle = any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise ShdError(
            f"{field}: {folder} holds only pickled weights (.bin/.pt), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle if you trust the source"
        )
    if not has_safetensors and not has_pickle:
        raise ShdError(f"{field}: {folder} has no weights (model.safetensors); point it at a complete model folder")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure here means a bad config.json (or remote code refused)
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            fix = ("set teacher.trust_remote_code: true in the recipe only if you trust that code"
                   if field.startswith("teacher") else "give a student of an architecture transformers ships")
            raise ShdError(f"{field}: {folder} needs its own Python code (auto_map in config.json); {fix}") from None
        raise ShdError(f"{field}: cannot read {folder}/config.json ({_first_line(exc)}); fix or replace it") from None
    task = task or task_of(config)
    cls = _auto_class(task)
    try:
        model, info = cls.from_pretrained(
            folder, dtype=torch.float32, use_safetensors=has_safetensors or not allow_pickle,
            trust_remote_code=trust_remote_code, output_loading_info=True,
        )
    except Exception as exc:  # noqa: BLE001 - damaged files raise SafetensorError, RuntimeError, OSError ...
        reason = "tensor shapes differ from config.json" if "mismatched_sizes" in str(exc) else _first_line(exc)
        raise ShdError(
            f"{field}: cannot load the weights in {folder} ({reason}); the weight files are damaged or do not "
            "belong to its config.json"
        ) from None
    # A missing tensor would silently stay random; only the unused BERT pooler may be absent.
    missing = sorted(k for k in info.get("missing_keys", ()) if "pooler" not in k)
    if missing:
        raise ShdError(
            f"{field}: the weights in {folder} lack {len(missing)} of the model's tensors (e.g. {missing[0]}); "
            "the checkpoint is incomplete or of another architecture"
        )
    if task == IMAGE_CLASSIFICATION:
        from shdcli.vision import load_processor

        return model, load_processor(folder, model.config), task
    tokenizer = None
    if any((folder / name).exists() for name in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - corrupt tokenizer files raise JSON, tokenizers and OS errors
            raise ShdError(
                f"{field}: cannot read the tokenizer in {folder} ({_first_line(exc)}); "
                "fix or replace its tokenizer files"
            ) from None
    return model, tokenizer, task


# Without one of these, transformers 5 builds an empty tokenizer instead of failing.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tekken.json")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# --------------------------------------------------------------------------- family table
@dataclass
class AttentionParams:
    """The attention projections of one layer. fused_qkv: GPT-2's Conv1D c_attn ([D, 3D], x @ W)."""

    q: nn.Module | None
    k: nn.Module | None
    v: nn.Module | None
    o: nn.Module
    fused_qkv: nn.Module | None = None
    o_is_conv1d: bool = False


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks (the longest ModuleList of blocks)."""
    n = model_shape(model.config).layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n > 0:
            return module
    raise ShdError(f"cannot find the {n} transformer blocks of a {type(model).__name__}")


_O_PATTERN = re.compile(r"(^|\.)(o_proj|out_proj|c_proj|attention\.output\.dense|attention\.dense)$")


def attention_params(layer: nn.Module) -> AttentionParams:
    named = dict(layer.named_modules())

    def find(*suffixes: str) -> nn.Module | None:
        for name, mod in named.items():
            last = name.rsplit(".", 1)[-1]
            if last in suffixes and "cross" not in name and "mlp" not in name:
                return mod
        return None

    fused = find("c_attn")
    o = next(
        (m for n, m in named.items() if _O_PATTERN.search(n) and "mlp" not in n and "cross" not in n), None
    )
    if o is None:
        raise ShdError(f"cannot find the attention output projection in {type(layer).__name__}")
    if fused is not None:
        return AttentionParams(None, None, None, o, fused_qkv=fused, o_is_conv1d=True)
    q, k, v = find("q_proj", "query"), find("k_proj", "key"), find("v_proj", "value")
    if q is None or k is None or v is None:
        raise ShdError(f"cannot find the q/k/v projections in {type(layer).__name__}")
    return AttentionParams(q, k, v, o)


def output_projection(model: nn.Module, layer: int) -> torch.Tensor:
    """W_O of a layer in x @ W orientation: [H * d, D]; rows h*d:(h+1)*d read head h."""
    params = attention_params(decoder_layers(model)[layer])
    weight = params.o.weight
    return weight if params.o_is_conv1d else weight.t()


# --------------------------------------------------------------------------- deriving a student
def derive_student_config(teacher_config, layer_pairs: list[tuple[int, int]], heads: int, kv_heads: int | None,
                          hidden: int | None, intermediate: int | None):
    """A copy of the teacher's config with fewer layers / heads / width."""
    shape = model_shape(teacher_config)
    config = teacher_config.__class__.from_dict(teacher_config.to_dict())
    config.num_hidden_layers = len(layer_pairs)
    config.num_attention_heads = heads
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = kv_heads or default_kv_heads(shape, heads)
    if hidden is not None:
        if getattr(config, "pooler_output_size", None) == shape.hidden:  # ViT/DeiT pooler follows the width
            config.pooler_output_size = hidden
        config.hidden_size = hidden
    if intermediate is not None:
        if shape.model_type == "gpt2":
            config.n_inner = intermediate
        else:
            config.intermediate_size = intermediate
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == shape.layers:
        config.layer_types = [layer_types[t] for _, t in layer_pairs]
    if getattr(teacher_config, "head_dim", None) is None:
        width = config.hidden_size
        if width % heads:
            raise ShdError(
                f"student.from_teacher: hidden size {width} is not divisible by {heads} heads "
                "(set student.from_teacher.hidden_size to a multiple of heads)"
            )
    config.architectures = teacher_config.architectures
    return config


def default_kv_heads(shape: ModelShape, heads: int) -> int:
    """Key/value heads that follow the head groups: GQA teachers give the largest divisor of the
    student's heads that is at most the teacher's KV heads (each student KV head then stands for one
    teacher KV head and its query heads); MHA teachers stay MHA."""
    if shape.kv_heads == shape.heads:
        return heads
    return max(d for d in range(1, min(shape.kv_heads, heads) + 1) if heads % d == 0)


def build_student(teacher: nn.Module, config, task: str) -> nn.Module:
    cls = _auto_class(task)
    torch_dtype = next(teacher.parameters()).dtype
    model = cls.from_config(config, dtype=torch_dtype)
    return model


# --------------------------------------------------------------------------- saving
def save_model_folder(model: nn.Module, tokenizer, target: Path, extra: dict[str, str] | None = None) -> None:
    """Write an HF folder (weights as safetensors, tokenizer, extra text files) atomically."""

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra or {}).items():  # names may hold a folder: 1_Pooling/config.json
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)

    write_folder_atomic(Path(target), fill)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
