"""Unwritable or full destinations: `shd distill`'s output_dir and the --out of `shd eval`, `shd inspect-heads`
and `shd export` fail with exit 2 and one line naming the field, the path and the fix (free space or another
folder, then --resume), before any slow work where that can be known, and leave nothing half-written.

A full disk is injected (ENOSPC from the writer: safetensors, shutil, fsync); a read-only folder is made with
chmod 555 where that binds, and as root (whom mode bits do not stop) by refusing writes under it in os.open.
/proc is a real folder nobody can create files in."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import yaml
from safetensors import SafetensorError

from shdcli import checkpoint, report
from shdcli.errors import ShdError
from tests.test_errors import assert_one_line_error, shd

FULL = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" '
        '})')  # what safetensors raises on a full disk


def write_recipe(tmp: Path, models: dict[str, Path], text: Path, out: Path, **train) -> str:
    recipe = {
        "teacher": str(models["gpt2"]),
        "student": {"from_teacher": {"layers": 2, "heads": 3}},
        "data": {"path": str(text), "seq_len": 32, "batch_size": 4, "val_batches": 1},
        "train": {"max_steps": 4, "save_every": 2, "eval_every": 4, "device": "cpu", "threads": 1, **train},
        "output_dir": str(out),
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def read_only(folder: Path, monkeypatch) -> None:
    """Make folder refuse new files: chmod for a normal user; for root, os.open and os.mkdir refuse
    creating anything under it (tempfile goes through both)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        return
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path) -> bool:
        return Path(os.fsdecode(path)).absolute().is_relative_to(folder.absolute())

    def refusing_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and inside(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    def refusing_mkdir(path, *args, **kwargs):
        if inside(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr(os, "mkdir", refusing_mkdir)


def no_leftovers(folder: Path) -> None:
    assert not [p for p in folder.rglob(".*")], "hidden temporaries left behind"


# --------------------------------------------------------------------------- output_dir
def test_read_only_output_dir_fails_before_the_teacher_loads(tiny_models, tiny_text, tmp_path, monkeypatch, capsys):
    import shdcli.train as train

    out = tmp_path / "ro"
    recipe = write_recipe(tmp_path, tiny_models, tiny_text, out)
    read_only(out, monkeypatch)

    def too_late(*args, **kwargs):
        raise AssertionError("the teacher was loaded before output_dir was found unwritable")

    monkeypatch.setattr(train, "load_teacher", too_late)
    line = assert_one_line_error(*shd(capsys, "distill", recipe)[::2], (
        f"output_dir: cannot write {out} (permission denied); choose a folder you can write",))
    print(f"\n[read-only output_dir] {line}")


def test_disk_full_during_a_checkpoint_keeps_the_last_one_and_resumes(tiny_models, tiny_text, tmp_path, monkeypatch,
                                                                      capsys):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_models, tiny_text, out)
    real, calls = checkpoint.save_file, {"n": 0}

    def fills_up(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise SafetensorError(FULL)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fills_up)
    line = assert_one_line_error(*shd(capsys, "distill", recipe)[::2], (
        f"output_dir: cannot write {out} (no space left on device, ", " MiB free there); free space on that disk "
        "or choose another folder, then run again with --resume",))
    print(f"\n[disk full, checkpoint] {line}")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert not (out / "student").exists()
    no_leftovers(out)
    monkeypatch.undo()
    code, _, err = shd(capsys, "distill", recipe, "--resume")
    assert code == 0, err


def test_disk_full_writing_the_student_leaves_no_outputs(tiny_models, tiny_text, tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils as modeling_utils

    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_models, tiny_text, out)

    def full(*args, **kwargs):
        raise SafetensorError(FULL)

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    assert_one_line_error(*shd(capsys, "distill", recipe)[::2], (
        f"output_dir: cannot write {out} (no space left on device", "then run again with --resume"))
    for name in checkpoint.OUTPUT_FILES:
        assert not (out / name).exists(), name
    assert checkpoint.latest(out / "checkpoints").name == "step-00000004"
    no_leftovers(out)


def test_atomic_writer_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    report.write_json_atomic(target, {"old": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(report.os, "fsync", full)
    with pytest.raises(ShdError) as err, report.destination("output_dir", tmp_path, ", then run again"):
        report.write_json_atomic(target, {"new": 2})
    monkeypatch.undo()
    assert str(err.value).startswith(f"output_dir: cannot write {tmp_path} (no space left on device")
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# --------------------------------------------------------------------------- --out of the other commands
@pytest.mark.parametrize("command", [
    ["export", "{model}", "--format", "safetensors", "--out", "/proc/shd-student"],
    ["eval", "{model}", "--no-speed", "--out", "/proc/shd-eval.json"],
    ["inspect-heads", "{model}", "--samples", "2", "--out", "/proc/shd-heads"],
])
def test_out_where_nothing_can_be_written_is_one_line(command, tiny_models, capsys):
    args = [a.format(model=tiny_models["gpt2"]) for a in command]
    line = assert_one_line_error(*shd(capsys, *args)[::2], (f"--out: cannot write {args[-1]} (",
                                                            "choose a folder you can write"))
    print(f"\n[{command[0]} --out /proc] {line}")


def test_export_copy_onto_a_full_disk_is_one_short_line(tiny_models, tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "sendfile", full)  # shutil.copyfile's fast path on Linux; it re-raises ENOSPC
    out = tmp_path / "copy"
    line = assert_one_line_error(*shd(capsys, "export", str(tiny_models["gpt2"]), "--format", "safetensors",
                                      "--out", str(out))[::2],
                                 (f"--out: cannot write {out} (no space left on device", "free space"))
    assert len(line) < 300, line  # not shutil.Error's list of every file
    assert not out.exists()
    no_leftovers(tmp_path)


def test_read_only_out_of_export_fails_before_reading_the_student(tiny_models, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "ro"
    read_only(folder, monkeypatch)
    out = folder / "copy"
    assert_one_line_error(*shd(capsys, "export", str(tiny_models["gpt2"]), "--format", "safetensors", "--out",
                               str(out))[::2], (f"--out: cannot write {out} (permission denied)",))
