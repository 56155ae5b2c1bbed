"""What every model family calls its parts: shapes from config.json, transformer blocks, attention
projections, and the config of a smaller student of the same family.

Family knowledge is kept to one table of attention parameter names (Llama-style q/k/v/o_proj,
BERT/ViT query/key/value + attention.output.dense, GPT-2 fused c_attn/c_proj).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from shdcli.errors import ShdError


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
