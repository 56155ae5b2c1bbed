"""Ctrl-C at any phase of `shd distill` (setup, step-0 evaluation, a second one in the loop, the final
evaluation) and in the other commands: exit 130, one line saying what was saved and how to go on, and
the run's outputs whole or absent. Real SIGINTs: sent to this process (in-process runs) or to a
`python -m shdcli` subprocess while it is still importing torch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shdcli import checkpoint
from tests.conftest import ROOT
from tests.test_errors import shd

pytestmark = pytest.mark.usefixtures("default_sigint")


def write_recipe(tmp: Path, models: dict[str, Path], text: Path, **train) -> Path:
    recipe = {
        "teacher": str(models["gpt2"]),
        "student": {"from_teacher": {"layers": 2, "heads": 3}},
        "data": {"path": str(text), "seq_len": 32, "batch_size": 4, "val_batches": 1},
        "train": {"max_steps": 4, "save_every": 2, "eval_every": 4, "device": "cpu", "threads": 1, **train},
        "output_dir": str(tmp / "out"),
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def ctrl_c(times: int = 1) -> None:
    """What a user's Ctrl-C does: SIGINT to this process (Python runs the handler right after os.kill)."""
    for _ in range(times):
        os.kill(os.getpid(), signal.SIGINT)


def one_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 130, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return " ".join(err.split())


def assert_no_outputs(out: Path) -> None:
    for name in checkpoint.OUTPUT_FILES:
        assert not (out / name).exists(), f"{name} left by an interrupted run"
    assert not [p for p in out.rglob(".*")], "hidden temporaries left behind"


def interrupt_in(monkeypatch, module, name: str, after: int = 0, times: int = 1) -> None:
    """Send SIGINT when module.name is called for the (after+1)-th time."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == after + 1:
            ctrl_c(times)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def test_ctrl_c_during_setup_saves_nothing_and_says_start_again(tiny_models, tiny_text, tmp_path, monkeypatch,
                                                                 capsys):
    import shdcli.train as train

    recipe = write_recipe(tmp_path, tiny_models, tiny_text)
    interrupt_in(monkeypatch, train, "load_teacher")
    line = one_line(*shd(capsys, "distill", str(recipe))[::2])
    assert f"stopped by SIGINT; nothing was saved; start again with: shd distill {recipe}" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_ctrl_c_in_step0_evaluation_then_resume_starts_at_step_0(tiny_models, tiny_text, tmp_path, monkeypatch,
                                                                   capsys):
    import shdcli.train as train

    recipe = write_recipe(tmp_path, tiny_models, tiny_text)
    interrupt_in(monkeypatch, train, "validate")
    line = one_line(*shd(capsys, "distill", str(recipe))[::2])
    assert "no checkpoint yet" in line and f"continue with: shd distill {recipe} --resume" in line
    assert_no_outputs(tmp_path / "out")
    monkeypatch.undo()
    code, out, err = shd(capsys, "distill", str(recipe), "--resume")
    assert code == 0, err
    assert (tmp_path / "out" / "student" / "README.md").is_file()


def test_second_ctrl_c_in_the_loop_stops_at_once_with_the_last_checkpoint(tiny_models, tiny_text, tmp_path,
                                                                           monkeypatch, capsys):
    import shdcli.train as train

    recipe = write_recipe(tmp_path, tiny_models, tiny_text)
    interrupt_in(monkeypatch, train, "train_step", after=2, times=2)  # in step 3, after step 2's checkpoint
    line = one_line(*shd(capsys, "distill", str(recipe))[::2])
    saved = tmp_path / "out" / "checkpoints" / "step-00000002"
    assert f"checkpoint saved to {saved}; continue with: shd distill {recipe} --resume" in line
    assert_no_outputs(tmp_path / "out")


def test_ctrl_c_in_final_evaluation_leaves_no_half_outputs_and_resume_finishes(tiny_models, tiny_text, tmp_path,
                                                                                monkeypatch, capsys):
    import shdcli.train as train

    recipe = write_recipe(tmp_path, tiny_models, tiny_text)
    interrupt_in(monkeypatch, train, "final_evaluation", after=1)  # the first call scores the student at init
    line = one_line(*shd(capsys, "distill", str(recipe))[::2])
    out = tmp_path / "out"
    assert f"checkpoint saved to {out / 'checkpoints' / 'step-00000004'}" in line and "--resume" in line
    assert_no_outputs(out)  # the student folder was written before the evaluation: removed again
    monkeypatch.undo()
    code, stdout, err = shd(capsys, "distill", str(recipe), "--resume")
    assert code == 0, err
    for name in ("student/README.md", "student/model.safetensors", "metrics.json", "report.md"):
        assert (out / name).is_file(), name


def test_ctrl_c_in_another_command_exits_130(tiny_models, tmp_path, monkeypatch, capsys):
    from shdcli import export

    interrupt_in(monkeypatch, export, "copy_folder")
    line = one_line(*shd(capsys, "export", str(tiny_models["gpt2"]), "--format", "safetensors", "--out",
                         str(tmp_path / "copy"))[::2])
    assert "stopped by SIGINT" in line and "run the command again" in line
    assert not (tmp_path / "copy").exists()


def test_ctrl_c_while_importing_exits_130_with_one_line(tiny_models, tiny_text, tmp_path):
    recipe = write_recipe(tmp_path, tiny_models, tiny_text)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "shdcli", "distill", str(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(0.5)  # importing torch and transformers takes over a second
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    line = one_line(proc.returncode, err)
    assert "stopped by SIGINT" in line


def test_an_inherited_ignored_sigint_stays_ignored_while_starting_and_training():
    """A job a non-interactive shell starts with `&` inherits SIGINT ignored: shd re-arms it neither while
    importing nor while training (SIGTERM still stops a run with a checkpoint)."""
    probe = ("import signal, shdcli.__main__\n"
             "from shdcli.checkpoint import StopOnSignal\n"
             "ignored = lambda sig: signal.getsignal(sig) == signal.SIG_IGN\n"
             "with StopOnSignal():\n"
             "    print(ignored(signal.SIGINT), ignored(signal.SIGTERM))\n"
             "print(ignored(signal.SIGINT))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def probe_with(disposition) -> list[str]:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert probe_with(signal.SIG_IGN) == ["True", "False", "True"]
    assert probe_with(signal.SIG_DFL) == ["False", "False", "False"]


def test_stop_on_signal_does_not_catch_an_ignored_sigint():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with checkpoint.StopOnSignal() as stop:
            ctrl_c()
            assert stop.signum is None
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
