"""Memory per rank of a distillation run, on paper, from the model configs and the dtypes this code picks.

README's "Memory per GPU" table is generated from `estimate` (benchmarks/memory_table.py; a test keeps the
two equal). Parameter counts come from the models themselves, built on the meta device. The dtypes and
placements are the code's own: the teacher in teacher.teacher_dtype on CUDA (bf16 by default), replicated
on every rank; the student trained in float32 master weights with AdamW (weights 4 + gradients 4 + m, v 8 =
16 B per trainable parameter), whole on every rank under DDP, split W ways under FSDP2; a LoRA student's
frozen base in float32 (4 B per parameter) plus 16 B per adapter parameter. Host RAM is what setup holds
per rank before the models move to the GPU (students/build.load_teacher, distributed.broadcast_replica,
distributed.receive_shards): one teacher in its dtype on every rank; a given student in float32 on rank 0
and, under DDP, on every rank (FSDP ranks != 0 receive only their shards, on the GPU); a derived student on
every rank.

Activations (no activation checkpointing, SDPA: no N x N scores stored) ~ 34 B N d bytes per student layer
(Korthikanti et al. 2022 without the 5 a N^2 / d term). Logits: logit_impl naive holds B N V x (2 bf16 + 4
float32 log-softmax + 4 its gradient) bytes; fused holds one chunk (distill.chunk_memory_mb) plus the LM
head's float32 gradient V d x 4. SHD records: the teacher's q, k, v of every mapped layer, 3 B N d_t in its
dtype (the lean SHD loss adds one row chunk of maps at a time). FSDP buffers: the all-gathered block and the
prefetched next one in the compute dtype plus one unsharded float32 gradient block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shdcli.models.families import decoder_layers, model_shape
from shdcli.models.lora import apply_lora
from shdcli.models.mapping import layer_pairs
from shdcli.models.sources import meta_model
from shdcli.recipe import Recipe
from shdcli.tasks.base import CAUSAL_LM
from shdcli.tasks.registry import get as get_task
from shdcli.teacher import teacher_dtype

GB = 1e9
ADAMW_BYTES = 16  # float32 weight 4 + gradient 4 + AdamW m 4 + v 4, per trainable parameter
ACTIVATION_BYTES = 34  # per token per width unit per layer (Korthikanti et al. 2022, SDPA: no scores kept)


@dataclass(frozen=True)
class Memory:
    """Bytes per rank of one run."""

    teacher: int
    student_states: int
    activations: int
    logits: int
    shd_records: int
    fsdp_buffers: int
    host_rank0: int  # setup, before the models move to the GPU
    host_other: int

    @property
    def device(self) -> int:
        return (self.teacher + self.student_states + self.activations + self.logits + self.shd_records
                + self.fsdp_buffers)


def _params(model: nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable)


def estimate(recipe: Recipe, teacher_config, student_config, world: int) -> Memory:
    """Memory per rank of `recipe` on `world` CUDA ranks for a teacher and a given student of these configs."""
    auto = get_task(CAUSAL_LM).auto_class()
    t_dtype = teacher_dtype(recipe, torch.device("cuda"))
    t_bytes = torch.finfo(t_dtype).bits // 8
    compute = 2 if recipe.train.dtype == "bfloat16" else 4
    teacher = meta_model(teacher_config, auto, t_dtype)
    student = meta_model(student_config, auto, torch.float32)
    if recipe.student.lora is not None:
        student = apply_lora(student, recipe.student.lora)
    t_shape, s_shape = model_shape(teacher_config), model_shape(student_config)
    sharded = recipe.train.strategy == "fsdp" and world > 1
    trainable, frozen = _params(student, True), _params(student, False)
    states = trainable * ADAMW_BYTES + frozen * 4
    b, n, d, v = recipe.data.batch_size, recipe.data.seq_len, s_shape.hidden, s_shape.vocab
    if recipe.distill.logit_impl == "naive":
        logits = b * n * v * (2 + 4 + 4)
    else:
        logits = recipe.distill.chunk_memory_mb * 2**20 + v * d * 4
    mapped = len(layer_pairs(t_shape.layers, s_shape.layers, recipe.distill.layers)) if recipe.distill.shd else 0
    q_width, kv_width = t_shape.heads * t_shape.head_dim, t_shape.kv_heads * t_shape.head_dim
    records = mapped * b * n * (q_width + 2 * kv_width) * t_bytes
    buffers = 0
    if sharded:
        block = max(_params(layer) for layer in decoder_layers(student))
        buffers = block * (2 * compute + 4)
    student_host = _params(student) * 4
    return Memory(
        teacher=_params(teacher) * t_bytes,
        student_states=states // world if sharded else states,
        activations=ACTIVATION_BYTES * b * n * d * s_shape.layers,
        logits=logits,
        shd_records=records,
        fsdp_buffers=buffers,
        host_rank0=_params(teacher) * t_bytes + student_host,
        host_other=_params(teacher) * t_bytes + (0 if sharded else student_host),
    )


def render_table(rows: list[tuple[str, Memory]]) -> str:
    """README's markdown table: one row per (run, Memory), GB (1e9 bytes) per rank."""
    head = ("| run (B per GPU, N) | teacher | student states | activations | logits | SHD records | FSDP buffers "
            "| **GPU total** | host RAM at setup, rank 0 / others |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for name, m in rows:
        cells = [m.teacher, m.student_states, m.activations, m.logits, m.shd_records, m.fsdp_buffers]
        values = " | ".join(f"{c / GB:.1f}" for c in cells)
        lines.append(f"| {name} | {values} | **{m.device / GB:.1f} GB** | "
                     f"{m.host_rank0 / GB:.1f} / {m.host_other / GB:.1f} GB |")
    return "\n".join(lines)
