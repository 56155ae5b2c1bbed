"""Shared fixtures: tiny random model folders (built once per session) and an isolated cache."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from shdcli import offline  # noqa: E402

offline()
# Tiny models are many small ops: one thread per process is faster than oversubscribing 2 cores
# (also inherited by the CLI subprocesses the tests start).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.tiny import make_tiny, write_text  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny")
    return {kind: make_tiny(kind, base / kind) for kind in ("bert", "gpt2", "llama")}


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("text") / "train.txt")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Tokenised data and converted models are cached per test session, never in the user's home.
    monkeypatch.setenv("SHD_CACHE", str(tmp_path_factory.getbasetemp() / "shd-cache"))


@pytest.fixture
def default_sigint():
    """Python's default SIGINT handler, unblocked, for tests that send SIGINT to this very process: a suite
    started with `&` by a non-interactive shell inherits SIGINT ignored, and shd leaves an ignored SIGINT
    ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    yield
    signal.signal(signal.SIGINT, previous)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600):
    """Run `python -m shdcli ...` in a subprocess (this checkout's code), return CompletedProcess."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "shdcli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def run_main(monkeypatch, capture, *args: str) -> tuple[int, str, str]:
    """The CLI's own main() in this process (no interpreter start-up): (exit code, stdout, stderr).

    `capture` is pytest's capsys or capfd fixture; a wide terminal keeps rich tables on one line.
    """
    from shdcli import cli

    monkeypatch.setattr(sys, "argv", ["shd", *args])
    monkeypatch.setenv("COLUMNS", "250")
    capture.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capture.readouterr()
    return code, out, err
