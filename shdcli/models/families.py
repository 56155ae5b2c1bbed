"""What every model family calls its parts: one table (FAMILIES) of where a family keeps its blocks,
its q/k/v/o projections (and how a fused projection lays them out), its KV heads, MLP, norms and
positions; shapes from config.json; reading and writing a layer's attention weights in one canonical
orientation; switching a model to q/k/v capture; and the config of a smaller student of the family.

Capture (attention/capture.py through `enable_capture`), the student's init (students/derive.py),
importance pruning (students/pruning.py) and LoRA targets (models/lora.py) all read this table. A model
type that is not in it is refused with one line (`family_of`); README's "Supported families" list is
generated from it (`supported_markdown`, checked by tests/test_families.py).

Fused q/k/v layouts (the output axis of one projection, x @ W orientation [D, out]):
  blocks      [q (H d); k (Hkv d); v (Hkv d)]: GPT-2 Conv1D c_attn, Phi-3 qkv_proj, Falcon multi-query
  per_head    [H, 3, d], each head's q, k, v side by side: GPT-NeoX query_key_value, Falcon (classic MHA)
  kv_grouped  [Hkv, r + 2, d], each KV head's r query heads, then its k and v: Falcon new decoder architecture
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from shdcli.attention import capture, processors
from shdcli.errors import ShdError, article


# --------------------------------------------------------------------------- the family table
@dataclass(frozen=True)
class Family:
    """Where one family keeps its parts. Paths are dotted module names inside one transformer block."""

    name: str  # as README lists it
    model_types: tuple[str, ...]
    example: str  # an architecture class of the family
    blocks: str  # the ModuleList of blocks (a suffix of its module name)
    o: str  # attention output projection
    mlp_down: str  # the MLP's output projection (reads the intermediate neurons)
    q: str | None = None  # separate projections ...
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # ... or one fused projection
    layout: str | Callable[[object], str] = "separate"  # fused layout (module docstring), or config -> layout
    mlp_in_fused: str | None = None  # an MLP input projection holding [gate; up] (2 I rows): Phi-3
    conv1d: bool = False  # GPT-2's Conv1D: weights stored [in, out]
    kv_field: str | None = "num_key_value_heads"  # config field of the KV heads (None: always MHA)
    intermediate_field: str = "intermediate_size"
    head_dim_fixed: bool = False  # head_dim is a config field (stays when heads drop) vs width / heads
    positions: str = "rotary"  # rotary | learned absolute | ... (rotary changes the q/k init)
    norm: str = "RMSNorm"
    # interface (transformers.AttentionInterface) | falcon (projection hooks) | processor (diffusers processors)
    capture: str = "interface"
    notes: str = ""
    kv_heads: Callable[[object], int] | None = None  # irregular KV head counts (Falcon)
    gguf: tuple[str, bool, bool] | None = None  # shd export: (GGUF architecture, q/k rope permutation, norm + 1)
    final_norm: str | None = None  # the norm before the LM head, inside the base model (Gemma: x (1 + w))
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma 1
    # every tensor axis of the model's width is one plain channel axis, so a narrower student copies the kept
    # channels of it (False: DiT's adaLN-Zero modulation stacks 6 width-sized chunks on one axis)
    width_copy: bool = True

    def layout_of(self, config) -> str:
        return self.layout(config) if callable(self.layout) else self.layout

    def rotary(self, config) -> bool:
        if self.model_types[0] == "falcon":
            return not getattr(config, "alibi", False)
        return self.positions.startswith("rotary")


def _falcon_layout(config) -> str:
    if config.new_decoder_architecture:
        return "kv_grouped"
    return "blocks" if config.multi_query else "per_head"


def _falcon_kv_heads(config) -> int:
    if config.new_decoder_architecture:
        return int(config.num_kv_heads)
    return 1 if config.multi_query else int(config.num_attention_heads)


_LLAMA_LIKE = dict(blocks="layers", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                   o="self_attn.o_proj", mlp_down="mlp.down_proj", head_dim_fixed=True)
_GEMMA = dict(final_norm="norm", norm_offset=1.0)  # embeddings x sqrt(width), norms x (1 + w)
_BERT_LIKE = dict(blocks="encoder.layer", q="attention.self.query", k="attention.self.key",
                  v="attention.self.value", o="attention.output.dense", mlp_down="output.dense", kv_field=None,
                  positions="learned absolute", norm="LayerNorm (post)")
_VIT_LIKE = dict(blocks="layers", q="attention.q_proj", k="attention.k_proj", v="attention.v_proj",
                 o="attention.o_proj", mlp_down="mlp.fc2", kv_field=None, positions="learned absolute (patches)",
                 norm="LayerNorm (pre)")

FAMILIES: tuple[Family, ...] = (
    Family("GPT-2", ("gpt2",), "GPT2LMHeadModel", blocks="h", qkv="attn.c_attn", layout="blocks", o="attn.c_proj",
           mlp_down="mlp.c_proj", conv1d=True, kv_field=None, intermediate_field="n_inner",
           positions="learned absolute", norm="LayerNorm (pre)", notes="fused Conv1D c_attn"),
    Family("GPT-NeoX (Pythia)", ("gpt_neox",), "GPTNeoXForCausalLM", blocks="layers", qkv="attention.query_key_value",
           layout="per_head", o="attention.dense", mlp_down="mlp.dense_4h_to_h", kv_field=None,
           positions="rotary (partial)", norm="LayerNorm (pre)", notes="fused query_key_value, per-head interleaved"),
    Family("Phi-3", ("phi3",), "Phi3ForCausalLM", blocks="layers", qkv="self_attn.qkv_proj", layout="blocks",
           o="self_attn.o_proj", mlp_down="mlp.down_proj", mlp_in_fused="mlp.gate_up_proj",
           notes="fused qkv_proj [q; k; v] (GQA), fused gate_up_proj"),
    Family("Falcon", ("falcon",), "FalconForCausalLM", blocks="h", qkv="self_attention.query_key_value",
           layout=_falcon_layout, o="self_attention.dense", mlp_down="mlp.dense_4h_to_h", kv_field="num_kv_heads",
           intermediate_field="ffn_hidden_size", norm="LayerNorm (pre)", capture="falcon", kv_heads=_falcon_kv_heads,
           notes="fused query_key_value: multi-query, new decoder architecture (GQA) or per-head; ALiBi refused"),
    Family("Llama", ("llama",), "LlamaForCausalLM", **_LLAMA_LIKE, notes="SmolLM2", gguf=("llama", True, False)),
    # llama.cpp runs Mistral as llama (convert_hf_to_gguf does the same)
    Family("Mistral", ("mistral",), "MistralForCausalLM", **_LLAMA_LIKE, notes="sliding window",
           gguf=("llama", True, False)),
    Family("Qwen2", ("qwen2",), "Qwen2ForCausalLM", **_LLAMA_LIKE, notes="q/k/v biases", gguf=("qwen2", False, False)),
    Family("Qwen3", ("qwen3",), "Qwen3ForCausalLM", **_LLAMA_LIKE, notes="q/k norms", gguf=("qwen3", False, False)),
    Family("Gemma", ("gemma",), "GemmaForCausalLM", **_LLAMA_LIKE, **_GEMMA),
    Family("Gemma-2", ("gemma2",), "Gemma2ForCausalLM", **_LLAMA_LIKE, **_GEMMA,
           notes="attention and final logit soft-capping, sliding window"),
    Family("Gemma-3 (text)", ("gemma3_text",), "Gemma3ForCausalLM", **_LLAMA_LIKE, **_GEMMA,
           notes="q/k norms, sliding and global layers", gguf=("gemma3", False, True)),
    Family("OPT", ("opt",), "OPTForCausalLM", blocks="decoder.layers", q="self_attn.q_proj", k="self_attn.k_proj",
           v="self_attn.v_proj", o="self_attn.out_proj", mlp_down="fc2", kv_field=None, intermediate_field="ffn_dim",
           positions="learned absolute", norm="LayerNorm (pre or post)"),
    Family("BERT", ("bert",), "BertModel", **_BERT_LIKE, notes="MiniLM"),
    Family("RoBERTa", ("roberta", "xlm-roberta"), "RobertaModel", **_BERT_LIKE),
    Family("ELECTRA", ("electra",), "ElectraModel", **_BERT_LIKE),
    Family("DistilBERT", ("distilbert",), "DistilBertModel", blocks="transformer.layer", q="attention.q_lin",
           k="attention.k_lin", v="attention.v_lin", o="attention.out_lin", mlp_down="ffn.lin2", kv_field=None,
           intermediate_field="hidden_dim", positions="learned or sinusoidal absolute", norm="LayerNorm (post)"),
    Family("ViT", ("vit",), "ViTForImageClassification", **_VIT_LIKE),
    Family("DeiT", ("deit",), "DeiTForImageClassification", **_VIT_LIKE),
)

# Families outside transformers: diffusers transformers (task: diffusion, tasks/diffusion.py wraps them in an
# HF-style config), captured through diffusers' attention processors. Not in README's generated transformers table.
DIFFUSERS_FAMILIES: tuple[Family, ...] = (
    Family("DiT (diffusers)", ("dit",), "DiTTransformer2DModel", blocks="transformer_blocks", q="attn1.to_q",
           k="attn1.to_k", v="attn1.to_v", o="attn1.to_out.0", mlp_down="ff.net.2", kv_field=None,
           positions="sin-cos absolute (patches)", norm="LayerNorm + adaLN-Zero", capture="processor",
           width_copy=False, notes="diffusers DiTTransformer2DModel; pip install 'shd[diffusion]'"),
)

_BY_TYPE: dict[str, Family] = {t: f for f in (*FAMILIES, *DIFFUSERS_FAMILIES) for t in f.model_types}


def _text_config(config):
    return getattr(config, "text_config", None) or config


def supported_types() -> list[str]:
    return [t for f in FAMILIES for t in f.model_types]


def find_family(config) -> Family | None:
    """The table entry of a config's model type, or None. A multimodal wrapper (Gemma-3's gemma3, with a
    vision tower beside its text model) is its own type: not in the table."""
    return _BY_TYPE.get(getattr(config, "model_type", None) or "")


def family_of(config, field: str = "model") -> Family:
    """The table entry of a config, or one line naming the family and what shd supports."""
    found = find_family(config)
    if found is None:
        kind = getattr(config, "model_type", None) or "unknown"
        arch = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        raise ShdError(
            f"{field}: model type {kind!r} ({arch}) is not a family shd knows where to find the attention "
            f"of; supported: {', '.join(supported_types())} (README 'Supported families'; a new family is one "
            "entry in shdcli/models/families.py FAMILIES)"
        )
    if found.model_types[0] == "falcon" and getattr(config, "alibi", False):
        raise ShdError(f"{field}: falcon with alibi: true adds ALiBi position biases inside the attention, which "
                       "shd's capture does not reproduce; use a rotary Falcon (alibi: false)")
    return found


def gguf_families() -> dict[str, tuple[str, bool, bool]]:
    """model_type -> (GGUF architecture, q/k rope permutation, Gemma norm + 1) of the families shd exports."""
    return {t: f.gguf for f in FAMILIES if f.gguf is not None for t in f.model_types}


def causal_model_types() -> set[str]:
    """Model types whose hand-built configs (no `architectures`) are causal LMs."""
    return {t for f in FAMILIES if f.example.endswith(("ForCausalLM", "LMHeadModel")) for t in f.model_types}


def supported_markdown() -> str:
    """README's list of supported families (tests/test_families.py checks README holds exactly this)."""
    lines = ["| family | model_type | blocks | q / k / v / o | KV heads | positions, norm | notes | export |",
             "|---|---|---|---|---|---|---|---|"]
    for f in FAMILIES:
        qkv = f"`{f.qkv}` ({f.layout if isinstance(f.layout, str) else 'by config'})" if f.qkv else \
            f"`{f.q}`, `{f.k}`, `{f.v}`"
        kv = "MHA" if f.kv_field is None else f"`{f.kv_field}`"
        types = ", ".join(f"`{t}`" for t in f.model_types)
        export = "GGUF, safetensors" if f.gguf else "safetensors"
        lines.append(f"| {f.name} | {types} | `{f.blocks}` | {qkv}, `{f.o}` | {kv} | {f.positions}, {f.norm} | "
                     f"{f.notes} | {export} |")
    return "\n".join(lines)


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
    config = _text_config(config)
    layers = _first_attr(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first_attr(config, "num_attention_heads", "n_head", "num_heads")
    hidden = _first_attr(config, "hidden_size", "n_embd", "d_model")
    if layers is None or heads is None or hidden is None:
        raise ShdError(f"model type {config.model_type!r}: cannot find its layer, head or width counts in config.json")
    family = find_family(config)
    if family is not None and family.kv_heads is not None:
        kv_heads = family.kv_heads(config)
    elif family is not None and family.kv_field is None:
        kv_heads = heads
    else:
        kv_heads = _first_attr(config, "num_key_value_heads", default=heads) or heads
    if family is not None and not family.head_dim_fixed:
        head_dim = hidden // heads
    else:
        head_dim = _first_attr(config, "head_dim", default=hidden // heads)
    names = (family.intermediate_field,) if family is not None else ("intermediate_size", "n_inner")
    intermediate = _first_attr(config, *names)
    if intermediate is None and config.model_type in ("gpt2", "falcon"):
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


def has_fixed_head_dim(config) -> bool:
    """Llama-style configs keep head_dim when heads drop; BERT/GPT-2/NeoX/Falcon/ViT derive it as width / heads."""
    return family_of(config).head_dim_fixed


def is_rotary(config) -> bool:
    return family_of(config).rotary(_text_config(config))


# --------------------------------------------------------------------------- blocks and projections
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks (the table's ModuleList)."""
    family = family_of(model.config)
    n = model_shape(model.config).layers
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) == n and n > 0
                and (name == family.blocks or name.endswith("." + family.blocks))):
            return module
    name = type(model).__name__
    raise ShdError(f"cannot find the {n} transformer blocks ({family.blocks}) of {article(name)} {name}")


def _module(layer: nn.Module, path: str) -> nn.Module:
    try:
        return layer.get_submodule(path)
    except AttributeError:
        raise ShdError(f"cannot find {path} in {type(layer).__name__} (shdcli/models/families.py)") from None


@dataclass
class AttentionParams:
    """The attention projections of one layer: separate q/k/v, or one fused projection in `layout`."""

    q: nn.Module | None
    k: nn.Module | None
    v: nn.Module | None
    o: nn.Module
    fused_qkv: nn.Module | None = None
    o_is_conv1d: bool = False
    layout: str = "separate"
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    names: dict[str, str] = field(default_factory=dict)  # role -> module path inside the block

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.fused_qkv, self.q, self.k, self.v, self.o) if m is not None]


def attention_params(layer: nn.Module, config) -> AttentionParams:
    """The attention projections of a block of a model with `config` (FAMILIES)."""
    family = family_of(config)
    shape = model_shape(config)
    text = _text_config(config)
    common = dict(o_is_conv1d=family.conv1d, heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim)
    if family.qkv is not None:
        return AttentionParams(None, None, None, _module(layer, family.o), fused_qkv=_module(layer, family.qkv),
                               layout=family.layout_of(text), names={"qkv": family.qkv, "o": family.o}, **common)
    assert family.q and family.k and family.v
    return AttentionParams(_module(layer, family.q), _module(layer, family.k), _module(layer, family.v),
                           _module(layer, family.o), names={"q": family.q, "k": family.k, "v": family.v,
                                                            "o": family.o}, **common)


def mlp_down(layer: nn.Module, config) -> nn.Module:
    """The MLP's output projection of a block (reads the intermediate neurons)."""
    return _module(layer, family_of(config).mlp_down)


def mlp_in_fused(layer: nn.Module, config) -> nn.Module | None:
    """An MLP input projection that stacks [gate; up] along its output rows (Phi-3), or None."""
    path = family_of(config).mlp_in_fused
    return None if path is None else _module(layer, path)


def output_projection(model: nn.Module, layer: int) -> torch.Tensor:
    """W_O of a layer in x @ W orientation: [H * d, D]; rows h*d:(h+1)*d read head h."""
    params = attention_params(decoder_layers(model)[layer], model.config)
    weight = params.o.weight
    return weight if params.o_is_conv1d else weight.t()


def embedding_scale(model: nn.Module) -> float:
    """The constant a family multiplies its token embeddings by (Gemma: sqrt(width); else 1)."""
    return float(getattr(model.get_input_embeddings(), "scalar_embed_scale", 1.0))


def final_norm(model: nn.Module) -> tuple[nn.Module, float] | None:
    """(the norm before the LM head, its offset: it scales by offset + weight), where the table knows it."""
    family = family_of(model.config)
    if family.final_norm is None:
        return None
    return _module(model.base_model, family.final_norm), family.norm_offset


# --------------------------------------------------------------------------- fused layouts
def split_qkv(x: torch.Tensor, layout: str, heads: int, kv_heads: int, head_dim: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused projection's output x [..., out] -> q [..., H, d], k [..., Hkv, d], v [..., Hkv, d] (module doc)."""
    d = head_dim
    if layout == "blocks":
        q, k, v = x.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        return q.unflatten(-1, (heads, d)), k.unflatten(-1, (kv_heads, d)), v.unflatten(-1, (kv_heads, d))
    if layout == "per_head":
        t = x.unflatten(-1, (heads, 3, d))
        return t[..., 0, :], t[..., 1, :], t[..., 2, :]
    if layout == "kv_grouped":
        r = heads // kv_heads
        t = x.unflatten(-1, (kv_heads, r + 2, d))
        return t[..., :r, :].flatten(-3, -2), t[..., r, :], t[..., r + 1, :]
    raise ValueError(f"unknown fused q/k/v layout {layout!r}")


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of split_qkv: q [..., H, d], k/v [..., Hkv, d] -> [..., out]."""
    if layout == "blocks":
        return torch.cat([q.flatten(-2), k.flatten(-2), v.flatten(-2)], dim=-1)
    if layout == "per_head":
        return torch.stack([q, k, v], dim=-2).flatten(-3)
    if layout == "kv_grouped":
        kv = k.shape[-2]
        grouped = q.unflatten(-2, (kv, q.shape[-2] // kv))  # [..., Hkv, r, d]
        return torch.cat([grouped, k.unsqueeze(-2), v.unsqueeze(-2)], dim=-2).flatten(-3)
    raise ValueError(f"unknown fused q/k/v layout {layout!r}")


# --------------------------------------------------------------------------- canonical attention weights
@dataclass
class AttentionWeights:
    """A layer's attention in x @ W orientation, float64: q [D, H d], k/v [D, Hkv d], o [H d, D];
    biases [H d] / [Hkv d] / [D] or None. Column h*d:(h+1)*d of q is head h (GQA: KV head h // r)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    bo: torch.Tensor | None


def _xw(module: nn.Module, conv1d: bool) -> torch.Tensor:
    return module.weight.double() if conv1d else module.weight.double().t()


def read_attention(p: AttentionParams) -> AttentionWeights:
    """The layer's projections in canonical form (float64 copies)."""
    if p.fused_qkv is not None:
        w = _xw(p.fused_qkv, p.o_is_conv1d)  # [D, out]
        q, k, v = (t.flatten(-2) for t in split_qkv(w, p.layout, p.heads, p.kv_heads, p.head_dim))
        b = p.fused_qkv.bias
        if b is None:
            bq = bk = bv = None
        else:
            bq, bk, bv = (t.flatten(-2) for t in split_qkv(b.double(), p.layout, p.heads, p.kv_heads, p.head_dim))
    else:
        q, k, v = (_xw(m, p.o_is_conv1d) for m in (p.q, p.k, p.v))
        bq, bk, bv = (None if m.bias is None else m.bias.double() for m in (p.q, p.k, p.v))
    bo = None if p.o.bias is None else p.o.bias.double()
    return AttentionWeights(q.clone(), k.clone(), v.clone(), _xw(p.o, p.o_is_conv1d).clone(),
                            *(None if b is None else b.clone() for b in (bq, bk, bv, bo)))


def write_attention(p: AttentionParams, a: AttentionWeights) -> set[int]:
    """Write canonical weights into the layer's projections; returns the ids of the tensors written."""

    def put(module: nn.Module, w: torch.Tensor) -> None:  # w in x @ W orientation
        module.weight.copy_(w if p.o_is_conv1d else w.t())

    if p.fused_qkv is not None:
        def heads(x: torch.Tensor, n: int) -> torch.Tensor:
            return x.unflatten(-1, (n, p.head_dim))

        put(p.fused_qkv, merge_qkv(heads(a.q, p.heads), heads(a.k, p.kv_heads), heads(a.v, p.kv_heads), p.layout))
        if p.fused_qkv.bias is not None and a.bq is not None:
            p.fused_qkv.bias.copy_(merge_qkv(heads(a.bq, p.heads), heads(a.bk, p.kv_heads), heads(a.bv, p.kv_heads),
                                             p.layout))
    else:
        for module, w, b in ((p.q, a.q, a.bq), (p.k, a.k, a.bk), (p.v, a.v, a.bv)):
            put(module, w)
            if module.bias is not None and b is not None:
                module.bias.copy_(b)
    put(p.o, a.o)
    if p.o.bias is not None and a.bo is not None:
        p.o.bias.copy_(a.bo)
    return {id(t) for m in p.modules() for t in m.parameters(recurse=False)}


# --------------------------------------------------------------------------- capture
def enable_capture(model: nn.Module) -> None:
    """Switch a loaded model to q/k/v capture (attention/capture.py), the way its family allows:
    the AttentionInterface function for families that call it, projection hooks for Falcon."""
    family = family_of(model.config)
    if family.capture == "interface":
        capture.enable(model)
        return
    if family.capture == "processor":  # diffusers: each block's attention module gets the recording processor
        assert family.q is not None
        processors.enable([_module(block, family.q.rsplit(".", 1)[0]) for block in decoder_layers(model)])
        return
    sites = []
    shape = model_shape(model.config)
    for i, block in enumerate(decoder_layers(model)):
        params = attention_params(block, model.config)
        attn = _module(block, family.qkv.rsplit(".", 1)[0])
        sites.append(capture.ProjectionSite(
            layer=i, attention=attn, projection=params.fused_qkv, split=_falcon_split(attn, params),
            scaling=shape.head_dim ** -0.5, causal=True))
    capture.enable_projections(model, sites)


def _falcon_split(attn: nn.Module, p: AttentionParams) -> Callable[[torch.Tensor, dict], tuple]:
    """FalconAttention's q/k/v as it hands them to SDPA: split the fused output, rotary on q and k."""
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb

    def split(fused: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = (t.transpose(1, 2) for t in split_qkv(fused, p.layout, p.heads, p.kv_heads, p.head_dim))
        cos, sin = kwargs["position_embeddings"]
        q, k = rotate(q, k, cos, sin)  # [B, H, N, d], [B, Hkv, N, d]
        return q, k, v

    return split


# --------------------------------------------------------------------------- deriving a student
def derive_student_config(teacher_config, layer_pairs: list[tuple[int, int]], heads: int, kv_heads: int | None,
                          hidden: int | None, intermediate: int | None):
    """A copy of the teacher's config with fewer layers / heads / width."""
    family = family_of(teacher_config)
    shape = model_shape(teacher_config)
    config = teacher_config.__class__.from_dict(teacher_config.to_dict())
    config.num_hidden_layers = len(layer_pairs)
    config.num_attention_heads = heads
    kv = kv_heads or default_kv_heads(shape, heads)
    fixed = _fixed_kv_heads(family, config, heads)
    if fixed is not None and kv != fixed:
        raise ShdError(f"student.from_teacher.kv_heads: {article(shape.model_type)} {shape.model_type} student with "
                       f"{heads} heads has {fixed} "
                       f"key/value heads (its config has no separate setting); drop kv_heads or set it to {fixed}")
    if family.model_types[0] == "falcon":
        if config.new_decoder_architecture:
            config.num_kv_heads = kv
        elif not config.multi_query:
            config.num_kv_heads = heads  # classic Falcon: one KV head per head
    elif family.kv_field is not None:
        setattr(config, family.kv_field, kv)
    if hidden is not None:
        if getattr(config, "pooler_output_size", None) == shape.hidden:  # ViT/DeiT pooler follows the width
            config.pooler_output_size = hidden
        if getattr(config, "word_embed_proj_dim", None) == shape.hidden:  # OPT embeds at the model width
            config.word_embed_proj_dim = hidden
        config.hidden_size = hidden
    if intermediate is None and hidden is not None and getattr(config, family.intermediate_field, None) is None:
        intermediate = shape.intermediate  # GPT-2's n_inner null means 4 x the width: keep the teacher's MLP width
    if intermediate is not None:
        setattr(config, family.intermediate_field, intermediate)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == shape.layers:
        config.layer_types = [layer_types[t] for _, t in layer_pairs]
    if not family.head_dim_fixed:
        width = config.hidden_size
        if width % heads:
            raise ShdError(
                f"student.from_teacher: hidden size {width} is not divisible by {heads} heads "
                "(set student.from_teacher.hidden_size to a multiple of heads)"
            )
    config.architectures = teacher_config.architectures
    return config


def _fixed_kv_heads(family: Family, config, heads: int) -> int | None:
    """KV heads a student of this family must have (None: free, set through family.kv_field)."""
    if family.kv_field is None:
        return heads
    if family.model_types[0] == "falcon" and not config.new_decoder_architecture:
        return 1 if config.multi_query else heads
    return None


def default_kv_heads(shape: ModelShape, heads: int) -> int:
    """Key/value heads that follow the head groups: GQA teachers give the largest divisor of the
    student's heads that is at most the teacher's KV heads (each student KV head then stands for one
    teacher KV head and its query heads); MHA teachers stay MHA."""
    if shape.kv_heads == shape.heads:
        return heads
    return max(d for d in range(1, min(shape.kv_heads, heads) + 1) if heads % d == 0)
