"""Peak RSS of a whole `shd distill` run, by phase (issue 17): where the peak is.

Runs `shd distill <args>` in this process and prints the kernel's peak RSS (VmHWM) after setup
(models and data loaded), after the step-0 validation, after training (steps and validations) and
after the final evaluation. Run it under `/usr/bin/time -v` for the whole run's maximum RSS:

  /usr/bin/time -v python benchmarks/distill_rss.py recipes/smollm2_9to3.yaml --set data.seq_len=2048 \\
      --set data.batch_size=1 --set train.max_steps=8 --set distill.shd=0 --set train.threads=1 \\
      --set train.eval_every=100 --set data.val_batches=2 --set output_dir=/tmp/rss --overwrite
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import shdcli.train as train  # noqa: E402
from shdcli.cli import app  # noqa: E402


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def main() -> None:
    real_validate, real_step, real_final = train.validate, train.train_step, train._final_eval
    seen = {"validate": False, "step": False}

    def validate(*args, **kwargs):
        if not seen["validate"]:
            print(f"[rss] after setup (models, data): peak {peak_mib():.0f} MiB", flush=True)
            seen["validate"] = True
        return real_validate(*args, **kwargs)

    def step(*args, **kwargs):
        if not seen["step"]:
            print(f"[rss] after the step-0 validation: peak {peak_mib():.0f} MiB", flush=True)
            seen["step"] = True
        return real_step(*args, **kwargs)

    def final(*args, **kwargs):
        print(f"[rss] after training (steps and validations): peak {peak_mib():.0f} MiB", flush=True)
        t0 = time.perf_counter()
        out = real_final(*args, **kwargs)
        print(f"[rss] after the final evaluation ({time.perf_counter() - t0:.0f} s): peak {peak_mib():.0f} MiB",
              flush=True)
        return out

    train.validate, train.train_step, train._final_eval = validate, step, final
    sys.argv = ["shd", "distill", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()
