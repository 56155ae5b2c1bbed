"""Data-parallel training on torch.distributed: torchrun environment, DDP / FSDP2 student, rank-0 I/O.

`torchrun --nproc_per_node N -m shdcli distill recipe.yaml` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK (and MASTER_ADDR/PORT) set; `init()` joins them into one process group (nccl on CUDA,
gloo on CPU). Without that environment everything here is a no-op and a run is a plain process.

Layout of a run with world W and data.batch_size B:
  - rank 0 alone reads the weight files: the other ranks build the teacher (and a given student) on the
    meta device and receive rank 0's tensors (`broadcast_replica`; an FSDP student: `receive_shards`);
  - every rank holds the whole teacher in inference mode (no gradients, nothing to synchronise);
  - the student is wrapped in DDP (a full replica per rank, gradients all-reduced in backward) or
    sharded with FSDP2 `fully_shard` (parameters, gradients and Adam states split W ways);
  - each rank reads its own B rows of every global batch of B * W rows (data.BatchStream(rank, world)),
    so W ranks see exactly the batches one process with batch_size B * W would see;
  - logged losses are all-reduced means, so the loss curve matches the single-process one;
  - only rank 0 prints and writes files.

The SHD loss is built from q/k captured inside the student's forward; they are part of the autograd
graph of the wrapped forward, so DDP's gradient hooks and FSDP's resharding see them like any output.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from shdcli.errors import ShdError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


_INFO = DistInfo()
_OWNED = False  # whether init() created the process group (and so should destroy it)


def env_info() -> DistInfo:
    """Rank/world from the torchrun environment (no process group needed)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    try:
        return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ShdError("RANK/WORLD_SIZE/LOCAL_RANK: not integers; launch with torchrun or unset them") from None


def info() -> DistInfo:
    return _INFO


def init(device_name: str) -> DistInfo:
    """Join the torchrun process group if the environment asks for one. Idempotent.

    device_name is train.device (auto | cpu | cuda): CUDA ranks use nccl and GPU LOCAL_RANK, CPU ranks gloo.
    """
    global _INFO, _OWNED
    env = env_info()
    if not env.enabled:
        _INFO = env
        return _INFO
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ShdError("train.device: cuda was asked for but no CUDA GPU is visible; set train.device=cpu")
        if env.local_rank >= torch.cuda.device_count():
            raise ShdError(
                f"LOCAL_RANK {env.local_rank}: only {torch.cuda.device_count()} GPUs are visible; "
                "launch torchrun with --nproc_per_node at most the number of GPUs"
            )
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": torch.device("cuda", env.local_rank)} if use_cuda else {}
        dist.init_process_group(backend, rank=env.rank, world_size=env.world, **kwargs)
        _OWNED = True
    _INFO = DistInfo(dist.get_rank(), dist.get_world_size(), env.local_rank)
    return _INFO


def shutdown(clean: bool = True) -> None:
    """Destroy the process group init() created; clean: after a final barrier, so no rank exits early."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
    _OWNED = False


def local_device(device: torch.device) -> torch.device:
    """The device of this rank: cuda -> cuda:LOCAL_RANK."""
    if device.type == "cuda" and _INFO.enabled:
        return torch.device("cuda", _INFO.local_rank)
    return device


def barrier() -> None:
    if _INFO.enabled:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. tokenise and fill the cache), then the others (cache hits)."""
    if _INFO.enabled and not _INFO.is_main:
        dist.barrier()
    try:
        yield
    finally:
        if _INFO.enabled and _INFO.is_main:
            dist.barrier()


def all_reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum of each value over ranks (one all-reduce of a float64 vector); identity when not distributed."""
    if not _INFO.enabled:
        return values
    names = sorted(values)
    # nccl reduces CUDA tensors only, gloo CPU tensors.
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=where)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return dict(zip(names, buf.cpu().tolist()))


def rank_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's contiguous share of the rows of a global batch (validation is split like training)."""
    if not _INFO.enabled:
        return batch
    return {k: v.tensor_split(_INFO.world)[_INFO.rank] for k, v in batch.items()}


def reduce_metrics(parts: dict[str, float], tokens: int, device: torch.device) -> tuple[dict[str, float], int]:
    """Mean of per-rank loss parts and sum of tokens over ranks (one all-reduce).

    With equal rows per rank (packed causal-LM blocks) the mean of per-rank means is the loss of the
    global batch. Padded encoder batches weight ranks equally, as DDP's gradient averaging does.
    """
    if not _INFO.enabled:
        return parts, tokens
    sums = all_reduce_sum({**{f"part/{k}": v for k, v in parts.items()}, "tokens": float(tokens)}, device)
    return {k: sums[f"part/{k}"] / _INFO.world for k in parts}, int(round(sums["tokens"]))


def average_grads(grads: list[torch.Tensor | None], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Mean over ranks of one loss part's gradients (one all-reduce of a flat buffer); identity when not
    distributed. Per-part balancing (balance.py) takes gradients with torch.autograd.grad, which DDP's
    hooks never see, so each part is averaged here. None (a parameter this rank's graph did not reach)
    becomes zeros: every rank must put the same buffer into the collective. like: the parameters."""
    if not _INFO.enabled:
        return grads
    full = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like)]
    flat = torch.cat([g.reshape(-1) for g in full])
    where = flat.device if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = flat.to(where)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf = (buf / _INFO.world).to(flat.device)
    return [chunk.view_as(g) for chunk, g in zip(buf.split([g.numel() for g in full]), full)]


def as_float(value: torch.Tensor) -> float:
    """A scalar tensor (possibly an FSDP2 DTensor, e.g. the total grad norm) as a Python float."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


# --------------------------------------------------------------------------- weights from rank 0
def from_rank0() -> bool:
    """Whether this rank builds its models on the meta device and receives rank 0's weights (rank != 0 under
    torchrun): only rank 0 reads the weight files, so host RAM per rank stays one copy of each model."""
    return _INFO.enabled and not _INFO.is_main


def _comm_device() -> torch.device:
    """Where a broadcast buffer must live: nccl moves CUDA tensors only, gloo CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters then buffers, tied ones once. Non-persistent buffers (rotary tables) are included: they
    are in no state dict, and a meta-built model's are empty."""
    return [*model.named_parameters(), *model.named_buffers()]


def _check_same_tensors(model: nn.Module) -> None:
    """Every rank's model names the same tensors in the same order as rank 0's (a mismatch would
    otherwise hang or garble the broadcasts below)."""
    names = [[(name, tuple(t.shape), str(t.dtype)) for name, t in _tensors(model)] if _INFO.is_main else None]
    dist.broadcast_object_list(names, src=0)
    mine = [(name, tuple(t.shape), str(t.dtype)) for name, t in _tensors(model)]
    if mine != names[0]:
        raise RuntimeError(f"rank {_INFO.rank}: its meta-built model differs from rank 0's loaded model "
                           f"({len(mine)} vs {len(names[0])} tensors)")


def _broadcast_tensors(named: list[tuple[str, torch.Tensor]]) -> None:
    """rank 0's values into every rank's tensors, one tensor at a time (a CUDA staging copy under nccl)."""
    where = _comm_device()
    for _, tensor in named:
        buf = tensor.detach().to(where)  # the tensor itself when it already lives there
        dist.broadcast(buf, src=0)
        if buf.data_ptr() != tensor.data_ptr():
            tensor.detach().copy_(buf)


def broadcast_replica(model: nn.Module) -> nn.Module:
    """rank 0's `model` on every rank, on the CPU (a no-op without torchrun). Rank 0 loaded it; the others
    built it on the meta device (from_rank0): they allocate it uninitialised, re-tie shared weights (to_empty
    gives every module its own tensor) and receive rank 0's parameters and buffers one at a time. Collective."""
    if not _INFO.enabled:
        return model
    if not _INFO.is_main:
        model.to_empty(device="cpu")
        if hasattr(model, "tie_weights"):  # transformers models: input and output embeddings shared again
            model.tie_weights()
    _check_same_tensors(model)
    with torch.no_grad():
        _broadcast_tensors(_tensors(model))
    return model


def receive_shards(model: nn.Module, full: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """rank 0's full state dict (`full`, None on the other ranks) into every rank's FSDP2 shards, one tensor
    at a time (torch.distributed.checkpoint's set_model_state_dict with broadcast_from_rank0): a rank never
    holds the whole model. The other ranks sharded a meta-built model: allocate their shards on `device`
    first. Buffers are not sharded and not all in the state dict: broadcast whole. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not _INFO.is_main:
        model.to_empty(device=device)
    set_model_state_dict(model, full if _INFO.is_main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        _broadcast_tensors(list(model.named_buffers()))


# --------------------------------------------------------------------------- wrapping the student
def _fsdp():
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    return FSDPModule, MixedPrecisionPolicy, fully_shard


def wrap_student(model: nn.Module, strategy: str, device: torch.device, amp_dtype: torch.dtype | None,
                 encoder: bool, blocks: list[nn.Module] | None = None, from_rank0: bool = False) -> nn.Module:
    """DDP replica or FSDP2-sharded student; the model itself when not distributed.

    blocks: the model's transformer blocks (models.families.decoder_layers), FSDP's wrapping units.
    from_rank0 (FSDP): only rank 0 loaded the student (on its CPU); the other ranks built it on the meta
    device. Sharding moves rank 0's blocks to `device` one unit at a time; then its full tensors, kept
    until here, are broadcast into every rank's shards (receive_shards) and freed.

    encoder: encoder students (BertModel) carry a pooler that the embedding loss never reads, so
    DDP must look for unused parameters; causal LMs use every parameter in every step.
    """
    if not _INFO.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=encoder)
    if strategy == "fsdp":
        _, MixedPrecisionPolicy, fully_shard = _fsdp()
        kwargs = {}
        if amp_dtype is not None:
            # bf16 compute and all-gathers, fp32 master weights, fp32 gradient reduction. gloo all-gathers bf16
            # as nccl does, so CPU ranks run the same policy (tests/test_bf16.py checks it against fp32).
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
        # One FSDP unit per transformer block (all-gathered just before it runs), then the root
        # (embeddings, final norm, head). Shared (tied) embeddings stay in the root unit.
        if blocks is None:
            raise ValueError("wrap_student: train.strategy=fsdp needs the model's transformer blocks")
        # rank 0's full tensors (references, not a copy): sharding replaces the module's parameters
        full = dict(model.state_dict()) if from_rank0 and _INFO.is_main else None
        for layer in blocks:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        if from_rank0:
            receive_shards(model, full, device)
        return model
    raise ShdError(f"train.strategy: unknown {strategy!r}; choose ddp or fsdp")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under a DDP wrapper (FSDP2 shards in place, there is no wrapper)."""
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) \
        else model


def is_sharded(model: nn.Module) -> bool:
    if not _INFO.enabled:
        return False
    FSDPModule, _, _ = _fsdp()
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on the first grad_accum - 1 micro-steps (they only accumulate)."""
    if not _INFO.enabled or enabled:
        if is_sharded(model):
            model.set_requires_gradient_sync(True)
        yield
        return
    if is_sharded(model):
        model.set_requires_gradient_sync(False)
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


def allocate_unsharded(model: nn.Module) -> None:
    """Make FSDP2 allocate every unit's unsharded parameters now, outside torch.inference_mode. It does so
    at a unit's first all-gather; were that the final evaluation's forward (a run resumed from its last
    checkpoint), they would be inference tensors that every later all-gather fails to copy into."""
    if not is_sharded(model):
        return
    FSDPModule, _, _ = _fsdp()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()
            module.reshard()


def model_for_saving(model: nn.Module) -> nn.Module | None:
    """The plain student on rank 0 (None on other ranks, and under FSDP: its shards are streamed to the
    folder by models.sources.save_sharded_model_folder, never gathered whole). DDP replicas are identical,
    so rank 0's module is the student."""
    if is_sharded(model) or not _INFO.is_main:
        return None
    return unwrap(model)
