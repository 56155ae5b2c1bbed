"""Atomic file writes and the human-readable run report."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shdcli.errors import ShdError

# errno values that mean "the destination cannot take the file": the user frees space or picks another folder.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target.

    A crash at any moment leaves either the old complete file or the new complete file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        make_readable(Path(tmp))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(path: Path) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give outputs the permissions a plain open() would."""
    mask = _umask()
    for entry in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside folder durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under folder, then the folders themselves (before renaming it into place)."""
    for entry in sorted(Path(folder).rglob("*"), key=lambda p: -len(p.parts)):
        if entry.is_file():
            with open(entry, "rb") as handle:
                os.fsync(handle.fileno())
        else:
            fsync_dir(entry)
    fsync_dir(Path(folder))


def write_folder_atomic(target: Path, fill: Callable[[Path], None]) -> None:
    """Build a folder with fill(tmp) under a temporary name beside target, fsync it, then rename it
    over target: readers see the old complete folder or the new complete one, never a mix."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        fill(tmp)
        make_readable(tmp)
        fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_errno(exc: BaseException) -> int | None:
    """The errno of a failed write, also where a library wrapped the OSError in its own exception
    (safetensors' SafetensorError says `code: 28`, shutil.copytree's Error lists `[Errno 28] ...`)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    if type(exc).__name__ == "SafetensorError" or isinstance(exc, shutil.Error):
        found = re.search(r"code: (\d+)|\[Errno (\d+)\]", str(exc))
        if found:
            return int(found.group(1) or found.group(2))
    return None


def free_bytes(path: Path) -> int | None:
    """Free space on the filesystem that holds path (its nearest existing folder); None if unknown."""
    path = Path(path).absolute()
    for folder in [path, *path.parents]:
        if folder.exists():
            with contextlib.suppress(OSError):
                return shutil.disk_usage(folder).free
            return None
    return None


def write_failure(field: str, path: Path, code: int, then: str = "") -> str:
    """One line for a destination that refused a write: the field, the path, why, and the fix."""
    reason = os.strerror(code).lower()
    if code in NO_SPACE:
        free = free_bytes(path)
        room = f", {free / 2**20:.1f} MiB free there" if free is not None else ""
        fix = "free space on that disk or choose another folder"
    else:
        room, fix = "", "choose a folder you can write"
    return f"{field}: cannot write {path} ({reason}{room}); {fix}{then}"


@contextlib.contextmanager
def destination(field: str, path: Path, then: str = "") -> Iterator[None]:
    """Turn a write that fails for lack of space or permission under `path` into one ShdError line naming
    `field` (output_dir, --out) and the fix; `then` says how to go on (e.g. `, then run again with --resume`).
    The writers inside are atomic, so nothing half-written is left behind."""
    try:
        yield
    except Exception as exc:
        code = write_errno(exc)
        if code is None or isinstance(exc, ShdError):
            raise
        raise ShdError(write_failure(field, path, code, then)) from None


def probe_writable(folder: Path) -> int | None:
    """Whether files can be created in folder, or in its nearest existing parent when it does not exist yet
    (it is created later): None if so, else the errno. Runs before any slow work so that a read-only or
    foreign folder fails at once, not after the models are loaded."""
    folder = Path(folder).absolute()
    target = next((f for f in [folder, *folder.parents] if f.exists()), None)
    if target is None or not target.is_dir():
        return errno.ENOTDIR
    try:
        fd, name = tempfile.mkstemp(dir=target, prefix=".shd-probe-")
    except OSError as exc:
        return exc.errno if exc.errno is not None else errno.EACCES
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return None


def looks_utf16(raw: bytes) -> bool:
    """Whether bytes read as text are UTF-16 (Windows editors and PowerShell's `>` write it): a byte-order
    mark, or mostly-ASCII text with a NUL in every other byte. Said apart from binary data so that the
    message can say how to convert it."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return True
    sample = raw[:4096]
    half = len(sample) // 2
    return half >= 2 and max(sample[1::2].count(0), sample[0::2].count(0)) >= 0.9 * half


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def shd_gradient_section(history: list[dict], distill: dict, balance: str) -> list[str]:
    """How SHD's gradient related to the task + logit gradient over the run (the steps that measured it,
    train.grad_norms_every): mean cosine and norm ratio per third of training, and what balance (the mode the
    run used, distill.balance auto resolved) did."""
    measured = [h for h in history if "grad_cos_shd" in h]
    if not measured:
        return []
    thirds = [measured[i * len(measured) // 3:(i + 1) * len(measured) // 3] for i in range(3)]
    rows = []
    for name, part in zip(("first third", "middle third", "last third"), thirds):
        if part:
            rows.append([name, f"{part[0]['step']}-{part[-1]['step']}", len(part),
                         sum(h["grad_cos_shd"] for h in part) / len(part),
                         sum(h.get("grad_ratio_shd", 0.0) for h in part) / len(part)])
    mean_cos = sum(h["grad_cos_shd"] for h in measured) / len(measured)
    out = ["", "## SHD and the task", "",
           f"Cosine between the SHD gradient and the task + logit gradient on the student's parameters, and the "
           f"norm of the SHD gradient as applied over the task + logit one (balance `{balance}`).", "",
           markdown_table(["training", "steps", "measured", "cos(g_shd, g_task+logit)", "norm ratio"], rows), ""]
    if balance == "agreement" and "shd_coef" in history[-1]:
        out.append(f"balance agreement: running cosine {history[-1].get('shd_agreement', 0.0):.3f} at the end; "
                   f"SHD's weight then {history[-1]['shd_coef']:.3g} (distill.shd {distill['shd']:g}).")
    elif mean_cos < 0.05:
        out.append(f"Mean cosine {mean_cos:.3f}: SHD's gradient is nearly orthogonal to the task's here, the setting "
                   "where it has cost quality in our studies; distill.balance=agreement lets it fade.")
    return out


def render_report(metrics: dict, plots: list[tuple[str, str]] | None = None, plot_note: str | None = None) -> str:
    """report.md: what was distilled into what, how the losses moved, and where the student is.
    plots: (caption, path relative to report.md) of the run's pictures (plots.write_run_plots); plot_note:
    why there are none."""
    plan = metrics["plan"]
    t, s = plan["teacher"], plan["student"]
    out = [
        "# SHD distillation report",
        "",
        f"- teacher: `{metrics['recipe']['teacher']['path']}` ({t['model_type']}, {t['layers']} layers x "
        f"{t['heads']} heads, {metrics['sizes']['teacher_params']:,} parameters)",
        f"- student: {s['layers']} layers x {s['heads']} heads (kv {s['kv_heads']}), "
        f"{metrics['sizes']['student_params']:,} parameters, written to `{metrics['student_dir']}`",
        f"- steps: {metrics['steps_done']} of {metrics['recipe']['train']['max_steps']}, "
        f"{metrics['timings']['train_s']:.1f} s training, {metrics['timings']['tokens_per_s']:.0f} tokens/s",
        f"- SHD: alpha `{metrics['recipe']['distill']['alpha']}`, loss `{metrics['recipe']['distill']['attn_loss']}`, "
        f"grouping `{plan['grouping']}`, temperature {metrics['recipe']['distill']['temperature']}",
        "",
        "## Validation",
        "",
    ]
    val = metrics.get("validation", [])
    if val:
        keys = [k for k in val[0] if k != "step" and isinstance(val[0][k], int | float)]  # per-layer: a plot
        out.append(markdown_table(["step", *keys], [[v["step"], *[v.get(k, "") for k in keys]] for v in val]))
    final, init = metrics.get("final_eval") or {}, metrics.get("init_eval") or {}
    if final:
        # One row per metric: the teacher, the student as derived (step 0) and after training.
        names = [k for k in final if not k.startswith("teacher_")]
        names += [k for k in init if not k.startswith("teacher_") and k not in final]
        rows = [[k, final.get(f"teacher_{k}", init.get(f"teacher_{k}", "")), init.get(k, ""), final.get(k, "")]
                for k in names]
        for name, why in (metrics.get("not_measured") or {}).items():
            rows.append([f"{name} (ood_*)", "not measured", "not measured", f"not measured ({why})"])
        out += ["", "## Final evaluation", "",
                markdown_table(["metric", "teacher", "student at init", "student (final)"], rows)]
    used = (metrics.get("balance") or {}).get("mode") or metrics["recipe"]["distill"]["balance"]
    out += shd_gradient_section(metrics.get("history", []), metrics["recipe"]["distill"], used)
    if (metrics.get("balance") or {}).get("why"):
        out += ["", metrics["balance"]["why"] + "."]
    if plots or plot_note:
        out += ["", "## Plots", ""]
        out += [f"![{caption}]({path})\n" for caption, path in plots or []]
        if plot_note:
            out.append(f"No plots: {plot_note}.")
    out += ["", "## Layer and head plan", ""]
    rows = []
    for (si, ti), groups in zip(plan["layers"], plan["groups"]):
        stats = metrics.get("alphas", {}).get(str(si), [])
        desc = []
        for j, g in enumerate(groups):
            w = stats[j]["mean"] if j < len(stats) else None
            weights = "" if w is None else " w=" + ",".join(f"{x:.2f}" for x in w)
            desc.append(f"{j}<-{{{','.join(map(str, g))}}}{weights}")
        rows.append([si, ti, "; ".join(desc)])
    out.append(markdown_table(["student layer", "teacher layer", "head groups (mean weights)"], rows))
    return "\n".join(out) + "\n"
