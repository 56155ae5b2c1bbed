"""Data-parallel training on torch.distributed: torchrun environment, DDP / FSDP2 student, rank-0 I/O.

`torchrun --nproc_per_node N -m shdcli distill recipe.yaml` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK (and MASTER_ADDR/PORT) set; `init()` joins them into one process group (nccl on CUDA,
gloo on CPU). Without that environment everything here is a no-op and a run is a plain process.

Layout of a run with world W and data.batch_size B:
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


# --------------------------------------------------------------------------- wrapping the student
def _fsdp():
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    return FSDPModule, MixedPrecisionPolicy, fully_shard


def wrap_student(model: nn.Module, strategy: str, device: torch.device, amp_dtype: torch.dtype | None,
                 encoder: bool, blocks: list[nn.Module] | None = None) -> nn.Module:
    """DDP replica or FSDP2-sharded student; the model itself when not distributed.

    blocks: the model's transformer blocks (models.families.decoder_layers), FSDP's wrapping units.

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
        for layer in blocks:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
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
    """A plain, unsharded copy of the student on rank 0 (None on other ranks). Collective under FSDP.

    DDP replicas are identical, so rank 0's module is the student. FSDP2 parameters are DTensor
    shards: gather the full state dict to rank 0's CPU and load it into a fresh model of the same class.
    """
    if not is_sharded(model):
        return unwrap(model) if _INFO.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    FSDPModule, _, _ = _fsdp()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not _INFO.is_main:
        return None
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    plain = cls(model.config)  # on CPU: non-persistent buffers (rotary inv_freq) are built as usual
    result = plain.load_state_dict(state, strict=False)
    if result.missing_keys:  # pragma: no cover - a family whose state dict does not name every parameter
        raise ShdError(f"train.strategy=fsdp: the gathered student lacks {result.missing_keys[:3]}; use ddp")
    return plain
