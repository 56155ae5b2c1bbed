"""Byte-identical check for refactors: tiny end-to-end `shd distill` runs (Llama with fused logits, GPT-2 with
naive logits, BERT, ViT) with an old checkout and a new one; compares metrics.json (timings aside) and
the student weights.

    python scripts/identical_runs.py OLD_CHECKOUT NEW_CHECKOUT WORK_DIR
"""
import json
import subprocess
import sys
from pathlib import Path

old, new, work = map(Path, sys.argv[1:4])
sys.path.insert(0, str(new))
from shdcli.demo import make_teacher  # noqa: E402
from tests.tiny import make_tiny, write_text  # noqa: E402

work.mkdir(parents=True, exist_ok=True)
text = write_text(work / "text.txt")
SKIP = ("time", "_s", "latency", "tokens_per_s", "speedup", "disk", "student_dir", "output_dir")


def strip(x, key=""):
    if isinstance(x, dict):
        return {k: strip(v, k) for k, v in x.items() if not any(s in k for s in SKIP)}
    if isinstance(x, list):
        return [strip(v, key) for v in x]
    return x


cases = {
    "llama": ({"heads": 2, "layers": 2, "params": None}, {"logit": 1.0}),
    "gpt2": ({"heads": 3, "layers": 2}, {"logit": 1.0, "logit_impl": "naive"}),
    "bert": ({"heads": 3, "layers": 2, "hidden_size": 24}, {"logit": 0.0}),
}
cases["vit"] = ({"heads": 3, "layers": 2}, {"logit": 1.0})
bad = 0
for kind, (ft, distill) in cases.items():
    if kind == "vit":
        teacher = work / "teacher-vit"
        if not teacher.exists():
            make_teacher(teacher, hidden=24, heads=6, layers=3, intermediate=48, image_size=8, epochs=1,
                         log=lambda *_: None)
    else:
        teacher = make_tiny(kind, work / f"teacher-{kind}", layers=4, heads=6, kv_heads=2 if kind == "llama" else 6)
    ft = {k: v for k, v in ft.items() if v is not None}
    outs = {}
    for label, root in (("old", old), ("new", new)):
        out = work / f"{kind}-{label}"
        data = ({"path": "builtin:digits", "batch_size": 8, "val_batches": 1, "val_fraction": 0.25} if kind == "vit"
                else {"path": str(text), "seq_len": 32, "batch_size": 4, "val_batches": 1,
                      "ood_eval": "builtin:sentences"})
        recipe = {"teacher": str(teacher), "student": {"from_teacher": ft}, "data": data,
                  "distill": {"calibration_batches": 2, **distill},
                  "train": {"max_steps": 3, "eval_every": 2, "save_every": 2, "device": "cpu", "seed": 0},
                  "output_dir": str(out)}
        path = work / f"{kind}-{label}.json"
        path.write_text(json.dumps(recipe))
        r = subprocess.run([sys.executable, "-m", "shdcli", "distill", str(path), "--overwrite"], cwd=root,
                           capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin",
                                                                "HOME": str(Path.home()), "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, (label, r.stderr[-2000:])
        outs[label] = out
    a = strip(json.loads((outs["old"] / "metrics.json").read_text()))
    b = strip(json.loads((outs["new"] / "metrics.json").read_text()))
    same_metrics = a == b
    same_weights = (outs["old"] / "student" / "model.safetensors").read_bytes() == \
        (outs["new"] / "student" / "model.safetensors").read_bytes()
    same_report = all((outs["old"] / f).read_text().count("\n") == (outs["new"] / f).read_text().count("\n")
                      for f in ("report.md",))
    print(f"{kind}: metrics (timings aside) identical={same_metrics}, student weights byte-identical={same_weights},"
          f" report lines equal={same_report}")
    if not same_metrics:
        for k in a:
            if a.get(k) != b.get(k):
                print("  differs:", k, str(a.get(k))[:300], "|", str(b.get(k))[:300])
        bad += 1
    bad += not same_weights
sys.exit(1 if bad else 0)
