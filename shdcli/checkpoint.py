"""Crash-safe checkpoints, resume, and who owns an output folder.

A checkpoint is a folder output_dir/checkpoints/step-00000050/ holding
  student.safetensors   the student's weights
  state.safetensors     every other tensor: AdamW moments, RNG states, squeeze-weight sums
  state.json            everything else: step, optimizer/scheduler hyper-state, data position,
                        history/validation so far (tensors referenced by name)
It is built under a hidden temporary name beside its final name, every file fsynced, then renamed
in one step: a folder named step-N is always complete, a crash leaves at worst a hidden `.tmp`
folder, which resume ignores and the next save sweeps away. Nothing is pickled: tensors go to
safetensors, the rest to JSON (tuples and non-string dict keys are tagged so they come back exact).

An FSDP run (the student sharded over the ranks) never gathers the model: its checkpoint holds
  sharded/              student weights and AdamW moments as torch.distributed.checkpoint writes them:
                        one file of shards per rank, plus its .metadata (which DCP pickles)
  state.safetensors, state.json   as above, without the optimizer (it is in sharded/)
Every rank writes its shards into the same temporary folder (output_dir must be shared by the ranks),
rank 0 adds the state files and renames it. One reader takes either layout into any world size: DCP
reshards on load (FSDP 2 ranks -> 1 process, or 1 -> 2), and a single-process checkpoint loads into an
FSDP student as full tensors that each rank slices.

Resuming restores weights, optimizer, scheduler, data position and the python/torch/cuda RNG
states, so on CPU a resumed run ends bit-identical to an uninterrupted one.

output_dir/run.json records the recipe fingerprint of the run that owns the folder; a different
recipe may not write there unless --overwrite, and the same recipe must say --resume or --overwrite.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from shdcli import distributed
from shdcli.errors import ShdError, article
from shdcli.recipe import Recipe
from shdcli.report import fsync_dir, fsync_tree, make_readable, probe_writable, write_failure, write_json_atomic

FORMAT = 1
CHECKPOINTS = "checkpoints"
RUN_INFO = "run.json"
# What `shd distill` writes into output_dir; --overwrite removes exactly these (and hidden leftovers).
RUN_FILES = (RUN_INFO, CHECKPOINTS, "student", "metrics.json", "report.md", "logs", "plots")
_NAME = re.compile(r"^step-(\d{8})$")
_FILES = ("student.safetensors", "state.safetensors", "state.json")
SHARDED = "sharded"  # the DCP folder of an FSDP checkpoint
_SHARDED_FILES = ("state.safetensors", "state.json", f"{SHARDED}/.metadata")


# --------------------------------------------------------------------------- tensors <-> JSON
def encode(obj: Any, tensors: dict[str, torch.Tensor], memo: dict[int, str] | None = None) -> Any:
    """A JSON-able copy of obj with every tensor moved into `tensors` (referenced by key)."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:  # the same tensor object twice is stored once and comes back shared
            memo[id(obj)] = key = f"t{len(tensors)}"
            tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": memo[id(obj)]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, memo) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, tensors, memo) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, memo) for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors, memo), encode(v, tensors, memo)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint {article(type(obj).__name__)} {type(obj).__name__}")


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
        return {k: decode(v, tensors) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------- RNG and data position
def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def position(stream) -> dict:
    """Where the run stands between steps: the data stream's position and every RNG state."""
    return {"data": stream.state_dict(), "rng": rng_state()}


# --------------------------------------------------------------------------- save / find / load
def checkpoint_root(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / CHECKPOINTS


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first; hidden temporary folders are skipped."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_dir() and any(all((entry / f).is_file() for f in files)
                                            for files in (_FILES, _SHARDED_FILES)):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def _remove(folder: Path) -> None:
    """Delete a folder so that it never looks like a complete checkpoint halfway through."""
    trash = folder.parent / f".trash-{folder.name}-{os.getpid()}"
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _sweep(root: Path) -> None:
    """Remove leftovers of interrupted saves and deletions (hidden folders only)."""
    for entry in root.iterdir():
        if entry.name.startswith((".step-", ".trash-")):
            shutil.rmtree(entry, ignore_errors=True)


def save(root: Path, step: int, fingerprint: str, student: torch.nn.Module, optimizer, scheduler,
         where: dict, run: dict, keep: int) -> Path:
    """Write checkpoint step-<step> atomically, then keep only the newest `keep` checkpoints.

    where: position() taken at the moment the checkpoint describes (after `step` steps);
    run: the loop's accumulated metrics (JSON-able plus tensors).
    """
    root.mkdir(parents=True, exist_ok=True)
    _sweep(root)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-"))
    try:
        save_model(student, str(tmp / "student.safetensors"))
        tensors: dict[str, torch.Tensor] = {}
        meta = {
            "format": FORMAT,
            "step": step,
            "fingerprint": fingerprint,
            "optimizer": encode(optimizer.state_dict(), tensors),
            "scheduler": encode(scheduler.state_dict(), tensors),
            "position": encode(where, tensors),
            "run": encode(run, tensors),
        }
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
        make_readable(tmp)
        fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. the last good step after a resume): replace it
            _remove(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in complete_checkpoints(root)[:-keep]:
        _remove(old)
    return final


def save_sharded(root: Path, step: int, fingerprint: str, student: torch.nn.Module, optimizer, scheduler,
                 where: dict, run: dict, keep: int) -> Path:
    """save() for an FSDP student, called by every rank (collective): each writes its own shards of the
    weights and AdamW moments with torch.distributed.checkpoint, rank 0 the rest; then the same atomic
    rename. where and run: rank 0's (data position and RNG are the same on every rank)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    main = dist.get_rank() == 0
    final = root / f"step-{step:08d}"
    name: list[str | None] = [None]
    if main:
        root.mkdir(parents=True, exist_ok=True)
        _sweep(root)
        name[0] = tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-")
    dist.broadcast_object_list(name, src=0)  # one folder for every rank's shards
    tmp = Path(str(name[0]))
    try:
        model_state, optim_state = get_state_dict(student, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / SHARDED))
        if main:
            tensors: dict[str, torch.Tensor] = {}
            meta = {"format": FORMAT, "step": step, "fingerprint": fingerprint, "layout": SHARDED,
                    "world": dist.get_world_size(), "scheduler": encode(scheduler.state_dict(), tensors),
                    "position": encode(where, tensors), "run": encode(run, tensors)}
            save_file(tensors, str(tmp / "state.safetensors"))
            (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
            make_readable(tmp)
            fsync_tree(tmp)
            if final.exists():
                _remove(final)
            os.replace(tmp, final)
            fsync_dir(root)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()  # no rank goes on (or prunes) before the checkpoint is complete
    if main:
        for _, old in complete_checkpoints(root)[:-keep]:
            _remove(old)
    return final


def _load_weights_and_optimizer(folder: Path, meta: dict, tensors: dict, student: torch.nn.Module,
                                optimizer) -> None:
    """The one place weights and optimizer come back, whatever wrote them and whatever reads them."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )

    if meta.get("layout") == SHARDED:  # DCP reshards to this world size (or to one process)
        import torch.distributed.checkpoint as dcp

        model_state, optim_state = get_state_dict(student, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(folder / SHARDED))
        set_state_dict(student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return
    saved_optimizer = _retuple(decode(meta["optimizer"], tensors), optimizer.state_dict())
    if not distributed.is_sharded(student):
        load_model(student, str(folder / "student.safetensors"), strict=True)
        optimizer.load_state_dict(saved_optimizer)
        return
    # A single-process (or DDP) checkpoint into an FSDP student: full tensors, keyed by parameter name,
    # that every rank slices to its shard. safetensors stores tied weights once: give each alias its copy.
    weights = load_file(str(folder / "student.safetensors"))
    names: dict[int, list[str]] = {}
    for name, param in student.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for aliases in names.values():
        known = next((weights[a] for a in aliases if a in weights), None)
        for alias in aliases:
            if known is not None and alias not in weights:
                weights[alias] = known
    set_model_state_dict(student, weights, options=StateDictOptions(full_state_dict=True))
    order = [names[id(p)][0] for group in optimizer.param_groups for p in group["params"]]
    by_name = {"state": {order[i]: value for i, value in saved_optimizer["state"].items()},
               "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                                for group in saved_optimizer["param_groups"]]}
    set_optimizer_state_dict(student, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def load(folder: Path, fingerprint: str, student: torch.nn.Module, optimizer, scheduler, stream) -> dict:
    """Restore weights, optimizer, scheduler, data position and RNG from a checkpoint of either layout
    (single-process / DDP, or FSDP's sharded one) into a student of any world size; return its run dict.
    Under torch.distributed every rank calls it."""
    try:
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        tensors = load_file(str(folder / "state.safetensors"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
    except Exception as exc:
        raise ShdError(
            f"checkpoint {folder} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "delete that folder to resume from the previous checkpoint"
        ) from None
    if meta["fingerprint"] != fingerprint:
        raise ShdError(
            f"checkpoint {folder} belongs to a different recipe; resume with the recipe that wrote it "
            "or pass --overwrite to start over"
        )
    try:
        _load_weights_and_optimizer(folder, meta, tensors, student, optimizer)
        scheduler.load_state_dict(decode(meta["scheduler"], tensors))
    except Exception as exc:
        raise ShdError(
            f"checkpoint {folder} does not fit this student ({str(exc).splitlines()[0]}); "
            "delete that folder or pass --overwrite to start over"
        ) from None
    where = decode(meta["position"], tensors)
    stream.load_state_dict(where["data"])
    set_rng_state(where["rng"])
    run = decode(meta["run"], tensors)
    run["step"] = int(meta["step"])
    return run


def _retuple(saved: dict, current: dict) -> dict:
    """Optimizer hyper-parameters saved as JSON: give back tuples (betas) where the optimizer uses them."""
    for group, now in zip(saved["param_groups"], current["param_groups"]):
        for key, value in now.items():
            if isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
    return saved


# --------------------------------------------------------------------------- output folder ownership
def read_run_info(out_dir: Path) -> dict | None:
    try:
        info = json.loads((out_dir / RUN_INFO).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


def check_output_dir(recipe: Recipe, resume: bool, overwrite: bool) -> Path | None:
    """Decide, before anything is loaded, whether this run may use output_dir. It changes nothing there
    (a probe file is created and removed at once, to find an unwritable folder before the slow setup).

    Returns the checkpoint to resume from (None: start at step 0).
    """
    out_dir = Path(recipe.output_dir)
    if resume and overwrite:
        raise ShdError("--resume and --overwrite contradict each other; pass one of them")
    if out_dir.exists() and not out_dir.is_dir():
        raise ShdError(f"output_dir: {out_dir} is a file; set output_dir to a folder")
    try:
        empty = not out_dir.exists() or not any(out_dir.iterdir())
    except OSError as exc:
        raise ShdError(f"output_dir: cannot read {out_dir} ({exc.strerror}); choose a folder you can write") from None
    code = probe_writable(out_dir)
    if code is not None:
        raise ShdError(write_failure("output_dir", out_dir, code))
    if resume and empty:  # a typo in output_dir must not cost a whole fresh run
        raise ShdError(f"--resume: output_dir {out_dir} holds no run to resume (no {RUN_INFO}, no checkpoint); "
                       "check output_dir, or leave out --resume to start a new run")
    if empty or overwrite:
        return None
    info = read_run_info(out_dir)
    if info is None:
        raise ShdError(
            f"output_dir: {out_dir} is not empty and was not written by shd; choose another output_dir "
            "or pass --overwrite to write into it anyway"
        )
    if info.get("fingerprint") != recipe.fingerprint():
        changed = _changed_keys(info.get("recipe") or {}, _fingerprinted(recipe))
        what = f" (changed: {'; '.join(changed[:4])}{' ...' if len(changed) > 4 else ''})" if changed else ""
        raise ShdError(
            f"output_dir: {out_dir} holds a run of a different recipe{what}; choose another output_dir "
            "or pass --overwrite to replace that run"
        )
    found = latest(checkpoint_root(recipe))
    if not resume:
        where = f"its newest checkpoint is {found.name}" if found else "it has no checkpoint yet"
        raise ShdError(
            f"output_dir: {out_dir} already holds a run of this recipe ({where}); pass --resume to continue it "
            "or --overwrite to start over"
        )
    if found is not None:
        step = int(_NAME.match(found.name).group(1))
        if step > recipe.train.max_steps:
            raise ShdError(
                f"train.max_steps: {recipe.train.max_steps} is below the newest checkpoint's step {step}; "
                f"set train.max_steps >= {step} to resume"
            )
    return found


def claim_output_dir(recipe: Recipe, overwrite: bool) -> None:
    """After the run is set up: clear what an earlier run wrote (--overwrite) and record this recipe."""
    out_dir = Path(recipe.output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShdError(f"output_dir: cannot create {out_dir} ({exc.strerror}); choose a writable folder") from None
    if overwrite:
        for entry in list(out_dir.iterdir()):
            if entry.name in RUN_FILES or entry.name.startswith(tuple(f".{name}." for name in RUN_FILES)):
                if entry.is_dir():
                    _remove(entry)
                else:
                    entry.unlink()
    if (out_dir / RUN_INFO).exists():
        return
    write_json_atomic(out_dir / RUN_INFO, {"fingerprint": recipe.fingerprint(), "recipe": _fingerprinted(recipe)})


# What the output phase writes (train.write_outputs); a run stopped in it removes them, keeping its checkpoints.
OUTPUT_FILES = ("student", "metrics.json", "report.md", "plots")


def remove_outputs(out_dir: Path) -> None:
    """Remove the outputs of an unfinished output phase, folders first renamed out of sight."""
    for name in OUTPUT_FILES:
        entry = out_dir / name
        if entry.is_dir():
            _remove(entry)
        elif entry.exists():
            entry.unlink()


def _fingerprinted(recipe: Recipe) -> dict:
    """The resolved recipe as the fingerprint sees it (for telling the user what changed)."""
    data = recipe.resolved()
    data.pop("output_dir", None)
    return data


# --------------------------------------------------------------------------- stopping on signals
class Interrupted(Exception):
    """The run stopped on SIGINT/SIGTERM after saving a checkpoint (not an error)."""

    def __init__(self, signum: int, step: int, folder: Path) -> None:
        self.signum, self.step, self.folder = signum, step, folder
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved to {folder}")


def left_after_interrupt(recipe: Recipe) -> tuple[str, bool]:
    """What an interrupted `shd distill` of recipe left in output_dir (a sentence) and whether --resume goes on
    from it. Read from the disk, not from the phase that was interrupted: checkpoints and the other outputs
    are written atomically, so what is there is whole."""
    out_dir = Path(recipe.output_dir)
    info = read_run_info(out_dir) or {}
    if info.get("fingerprint") != recipe.fingerprint():
        return "nothing was saved", False
    found = latest(checkpoint_root(recipe))
    if found is not None:
        return f"checkpoint saved to {found}", True
    return f"{out_dir} holds this run's settings but no checkpoint yet (it restarts at step 0)", True


class StopOnSignal:
    """While active, SIGINT/SIGTERM only set `signum`; the loop saves at the end of the step and stops.

    A second signal gets the default behaviour back (Ctrl-C twice aborts at once). A signal the process
    ignores (SIGINT in a job a non-interactive shell started with `&`) stays ignored.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                    "(send it again to stop at once)\n".encode())

    def __enter__(self) -> StopOnSignal:
        try:
            for sig in self.SIGNALS:
                if signal.getsignal(sig) != signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals stay as they were
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        if self.signum is None:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
