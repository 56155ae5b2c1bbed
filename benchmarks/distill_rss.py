"""Peak RSS of a whole `shd distill` run, by phase (issue 17): where the peak is.

Runs `shd distill <args>` in this process (train.run_distillation with a callback) and prints the
kernel's peak RSS (VmHWM) after setup (models and data loaded), after the step-0 validation, after
training (steps and validations) and after the final evaluation and outputs. Run it under
`/usr/bin/time -v` for the whole run's maximum RSS:

  /usr/bin/time -v python benchmarks/distill_rss.py recipes/smollm2_9to3.yaml --set data.seq_len=2048 \\
      --set data.batch_size=1 --set train.max_steps=8 --set distill.shd=0 --set train.threads=1 \\
      --set train.eval_every=100 --set data.val_batches=2 --set output_dir=/tmp/rss --overwrite
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from shdcli import offline  # noqa: E402

offline()

from rich.console import Console  # noqa: E402

from shdcli.callbacks import Callback  # noqa: E402
from shdcli.recipe import load_recipe  # noqa: E402
from shdcli.train import run_distillation  # noqa: E402


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


class RssPhases(Callback):
    """Prints the peak RSS as the run passes each phase (train.run_distillation's callbacks)."""

    def __init__(self) -> None:
        self.max_steps, self.t_train_end = 0, 0.0

    def on_start(self, recipe, state) -> None:
        self.max_steps = recipe.train.max_steps
        print(f"[rss] after setup (models, data): peak {peak_mib():.0f} MiB", flush=True)

    def on_validation(self, state, record) -> None:
        if record["step"] == 0:
            print(f"[rss] after the step-0 validation: peak {peak_mib():.0f} MiB", flush=True)
        elif record["step"] == self.max_steps:
            print(f"[rss] after training (steps and validations): peak {peak_mib():.0f} MiB", flush=True)
            self.t_train_end = time.perf_counter()

    def on_end(self, metrics) -> None:
        print(f"[rss] after the final evaluation and outputs ({time.perf_counter() - self.t_train_end:.0f} s): "
              f"peak {peak_mib():.0f} MiB", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    run_distillation(recipe, Console(), resume=args.resume, overwrite=args.overwrite, callbacks=[RssPhases()])


if __name__ == "__main__":
    main()
