"""Peak memory of `shd distill`'s setup in one process (or each torchrun rank), for tests/test_loading.py.

  python tests/setup_memory.py RECIPE            (or: torchrun --nproc_per_node 2 tests/setup_memory.py RECIPE)

prints one JSON line per rank: the kernel's peak RSS (VmHWM, what ru_maxrss reports) above the RSS before
the teacher loads, after the teacher's load (students/build.load_teacher, as train.prepare calls it) and
after the whole setup (train.prepare), with the bytes of the teacher's weights, of this rank's share of the
student and of the whole student. Before the baseline the teacher's model class is built once on the meta
device (imports of the modeling code, the tokenizer: a fixed cost, not a copy of the weights).
The peak counts the pages of the mmapped safetensors files a rank reads.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from shdcli import offline  # noqa: E402

offline()

from rich.console import Console  # noqa: E402

from shdcli import distributed  # noqa: E402
from shdcli.models.sources import resolve_source  # noqa: E402
from shdcli.recipe import load_recipe  # noqa: E402
from shdcli.students.build import load_teacher  # noqa: E402
from shdcli.tasks.registry import load_model  # noqa: E402
from shdcli.teacher import teacher_dtype  # noqa: E402
from shdcli.train import pick_device, prepare  # noqa: E402


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak() -> None:
    """The kernel's peak RSS (VmHWM) back to the current RSS (Linux: /proc/self/clear_refs, 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def tensor_bytes(tensors) -> int:
    # FSDP2 parameters are DTensors: this rank's shard is its local tensor
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def main(path: str) -> None:
    recipe = load_recipe(path)
    info = distributed.init(recipe.train.device)
    device = distributed.local_device(pick_device(recipe.train.device))
    folder = resolve_source(recipe.teacher.path, "teacher.path")
    load_model(folder, "teacher.path", weights=False)  # warm-up: imports and tokenizer, no weights
    gc.collect()
    base = status("VmRSS")
    reset_peak()
    loaded = load_teacher(recipe, teacher_dtype(recipe, device))[:3]
    load_peak = status("VmHWM") - base
    setup = prepare(recipe, Console(quiet=True), loaded)
    setup_peak = status("VmHWM") - base
    student = distributed.unwrap(setup.student)
    print(json.dumps({
        "rank": info.rank, "load_peak": load_peak, "setup_peak": setup_peak,
        "teacher_bytes": tensor_bytes(setup.teacher.parameters()),
        "teacher_dtype": str(next(setup.teacher.parameters()).dtype),
        "student_local_bytes": tensor_bytes(student.parameters()),
        "student_bytes": sum(p.numel() * 4 for p in student.parameters()),  # float32 master weights, whole
    }), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
