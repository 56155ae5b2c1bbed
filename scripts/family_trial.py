"""The ten-family trial of issue 15: tiny random teachers of ten families, saved as HF folders, through
`shd distill` with `from_teacher: {layers: 2, heads: 3, init: teacher}` and 3 steps, as a new user would.

    python scripts/family_trial.py [--out DIR] [--families qwen2,opt,...]

Prints one line per family: the exit code and, for a failure, the last line of stderr. Exit code 0 when
every family exits 0 (or 2 with a one-line reason, for a family shd refuses).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers.utils import logging as hf_logging  # noqa: E402

from tests.tiny import FAMILY_KINDS, save_family, write_image_npz, write_text  # noqa: E402

hf_logging.disable_progress_bar()

TRIAL = ["qwen2", "qwen3", "mistral", "opt", "roberta", "electra", "gpt_neox", "phi3", "distilbert", "gemma2"]


def run_one(name: str, root: Path, text: Path) -> tuple[int, float, str]:
    teacher = save_family(name, root / name / "teacher", layers=4)
    recipe = {
        "teacher": str(teacher),
        "student": {"from_teacher": {"layers": 2, "heads": 3, "init": "teacher"}},
        "data": {"path": str(write_image_npz(root / name / "d.npz") if FAMILY_KINDS[name] == "image" else text),
                 "seq_len": 32, "batch_size": 4, "val_batches": 1},
        "train": {"max_steps": 3, "eval_every": 3, "warmup_steps": 1, "device": "cpu"},
        "output_dir": str(root / name / "run"),
    }
    path = root / name / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "shdcli", "distill", str(path)], capture_output=True, text=True,
                          env=env)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return done.returncode, time.perf_counter() - start, lines[-1] if lines and done.returncode else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where the folders go (default: a temporary one)")
    parser.add_argument("--families", default=",".join(TRIAL))
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="shd-trial-"))
    root.mkdir(parents=True, exist_ok=True)
    text = write_text(root / "train.txt")
    ok = True
    for name in args.families.split(","):
        code, seconds, reason = run_one(name, root, text)
        ok &= code == 0 or (code == 2 and reason.startswith("error: "))
        print(f"{name:12s} exit {code}  {seconds:5.1f} s  {reason}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
