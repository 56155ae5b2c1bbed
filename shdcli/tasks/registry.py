"""The task kinds shd knows, by name, and loading a model as the task it is.

Adding a kind (e.g. a seq2seq model) means one new module in tasks/ with a class that follows
tasks.base.Task, and one line in TASKS; nothing else changes (docs/METHOD.md shows a skeleton).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shdcli.errors import ShdError
from shdcli.models.families import family_of
from shdcli.models.sources import check_weight_files, load_weights, meta_model, read_config
from shdcli.tasks.base import ENCODER, Task
from shdcli.tasks.causal_lm import CausalLM
from shdcli.tasks.diffusion import Diffusion
from shdcli.tasks.encoder import Encoder, head_of
from shdcli.tasks.image import ImageClassification
from shdcli.tasks.text_classification import SequenceClassification

# In detection order: the first task whose matches(config) is true is a model's task (encoder last: the
# fallback for bare backbones; a head no task distils matches none and is refused by task_of).
TASKS: dict[str, Task] = {t.name: t for t in (ImageClassification(), CausalLM(), SequenceClassification(),
                                              Diffusion(), Encoder())}


def get(name: str) -> Task:
    """The task object of a task name (a recipe's `task:` or a Setup's `task`)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ShdError(f"task: {name!r} is not a task; use one of {', '.join(TASKS)}") from None


def task_of(config, field: str = "teacher.path", backbone_ok: bool = False) -> str:
    """The name of the task an HF config describes (architectures, else model_type). A head no task
    distils (masked LM, token classification, question answering ...) is refused, so it is never
    dropped in silence; `backbone_ok` reads such a model as its encoder backbone instead (what
    `shd inspect-heads` looks at: the attention, not the head)."""
    found = next((t.name for t in TASKS.values() if t.matches(config)), None)
    if found is not None:
        return found
    if backbone_ok:
        return ENCODER
    raise ShdError(f"{field}: {head_of(config)} has a task head shd cannot distil (it distils causal LMs, "
                   "*ForSequenceClassification, *ForImageClassification and bare encoders); set task: encoder "
                   "to distil its backbone on purpose (the student is saved without the head)")


def load_model(
    folder: Path,
    field: str,
    task: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    backbone_ok: bool = False,
    dtype: torch.dtype = torch.float32,
    weights: bool = True,
) -> tuple[nn.Module, object | None, str]:
    """Load (model, tokenizer or image processor or None, task name) from an HF folder; safetensors
    only unless allow_pickle. A head no task distils is refused unless `task` names one or backbone_ok
    (task_of). The model comes in `dtype`; weights=False builds it on the meta device without reading its
    weights (a torchrun rank that receives them from rank 0)."""
    has_safetensors = check_weight_files(folder, field, allow_pickle)
    config = folder_config(folder, field) or read_config(folder, field, trust_remote_code)
    family_of(config, field)  # a family the table does not know is refused here, before loading weights
    kind = get(task or task_of(config, field, backbone_ok))
    if weights:
        model = load_weights(folder, field, kind.auto_class(), has_safetensors, allow_pickle, trust_remote_code,
                             dtype)
    else:
        model = meta_model(config, kind.auto_class(), dtype, trust_remote_code)
    return model, kind.load_preprocessor(folder, model.config, field, trust_remote_code), kind.name


def folder_config(folder: Path, field: str):
    """The config of a folder a task reads itself rather than through transformers' AutoConfig (a diffusers
    DiT: tasks/diffusion.py), else None."""
    return next((c for t in TASKS.values() if (c := t.folder_config(folder, field)) is not None), None)


def build_model(config, task: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A freshly initialised model of `config` for `task`, in `dtype`."""
    return get(task).auto_class().from_config(config, dtype=dtype)
