"""Step time and peak memory of SHD training next to its baselines (issue 5).

Modes, all measured in one run on the same random Llama-style teacher/student and the same batch:
  student  student forward/backward + AdamW on the next-token loss alone (no teacher)
  floor    teacher forward (inference_mode, captured) + student forward/backward, task loss only
  kd       floor + logit KD
  lean     kd + SHD, distill.impl=lean (row chunks, fused student loss)
  naive    kd + SHD, distill.impl=naive (all maps materialised: the reference)
The SHD modes run the real training code (train.step_losses) on a Setup built in memory. These modes
use the full-logit path (distill.logit_impl=naive), as before issue 17.

`--logits` (issue 17) compares against the floor instead, with the fused LM head + CE + logit KD:
  floor, kd, lean               as above (full logits: distill.logit_impl=naive)
  floor_fused, kd_fused, lean_fused   the same with distill.logit_impl=fused (no [B, N, V] logits)
`--model` picks the models: full (the config below), vocab262k (the same at a Gemma-3-sized vocabulary
of 262,144), smollm2 (the real SmolLM2-135M teacher and the recipe's 6-layer student).

Times: rounds interleave the modes (one step of each per round) so that load from other processes
hits them alike; the median per mode is reported and only ratios taken within this run are compared.
Memory: one subprocess per sequence length with glibc's mmap threshold pinned low, so freed blocks
go back to the OS and VmHWM (reset through /proc/self/clear_refs before each step) is the true peak;
"extra" memory of a mode is its peak minus the logit-KD peak. On CUDA: torch.cuda.max_memory_allocated.

  python benchmarks/perf.py            # full table (a few minutes on a 2-core CPU)
  python benchmarks/perf.py --quick    # seconds: tiny sizes, asserts lean == naive (loss and grads)
  python benchmarks/perf.py --logits --model smollm2 --seqs 512 --no-memory   # issue 17's step-time ratios
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from shdcli import offline  # noqa: E402

offline()

import torch  # noqa: E402

MODES = ("student", "floor", "kd", "lean", "naive")
LOGIT_MODES = ("floor", "floor_fused", "kd", "kd_fused", "lean", "lean_fused")


@dataclass
class Config:
    """A Llama-style teacher and a student derived from it (fewer layers and heads)."""

    t_layers: int = 4
    t_heads: int = 8
    t_kv: int = 4
    hidden: int = 256
    intermediate: int = 688
    vocab: int = 8192
    s_layers: int = 2
    s_heads: int = 4
    s_kv: int = 2

    def describe(self) -> str:
        return (f"teacher {self.t_layers}L {self.t_heads}H (kv {self.t_kv}) width {self.hidden}, "
                f"student {self.s_layers}L {self.s_heads}H (kv {self.s_kv}), head_dim {self.hidden // self.t_heads}, "
                f"vocab {self.vocab}")


@dataclass
class Real:
    """A real teacher from a recipe (its student derived as the recipe says)."""

    recipe: str
    vocab: int

    def describe(self) -> str:
        return f"{self.recipe} (teacher and student as the recipe derives them), vocab {self.vocab}"


FULL = Config()
QUICK = Config(t_layers=2, t_heads=6, t_kv=2, hidden=48, intermediate=96, vocab=256, s_layers=2, s_heads=3, s_kv=1)
# Gemma-3's vocabulary on a narrow model (the logits, not the width, are what is measured; no Gemma-3 weights here).
WIDE_VOCAB = Config(t_layers=2, t_heads=4, t_kv=2, hidden=64, intermediate=128, vocab=262144, s_layers=2, s_heads=2,
                    s_kv=1)
CONFIGS = {"full": FULL, "quick": QUICK, "vocab262k": WIDE_VOCAB,
           "smollm2": Real("recipes/smollm2_9to3.yaml", 49152)}


def build_real(cfg: Real, seq_len: int, device: torch.device):
    """train.prepare on the recipe (real teacher, derived student), with logit KD and SHD on. The student
    keeps the recipe's shape but is cut with `prune: uniform`: which layers and channels it keeps does
    not change a step's cost, and the importance search at N = 512-2048 would take longer than the
    measurement (the shape rule does not depend on the pruning mode)."""
    from rich.console import Console

    from shdcli.recipe import load_recipe
    from shdcli.train import prepare

    recipe = load_recipe(ROOT / cfg.recipe, [f"data.seq_len={seq_len}", "distill.logit=1.0", "distill.shd=1.0",
                                             "student.from_teacher.prune=uniform",
                                             f"train.device={device.type}", f"train.threads={torch.get_num_threads()}"])
    setup = prepare(recipe, Console(quiet=True))
    assert setup.student.config.vocab_size == cfg.vocab, setup.student.config.vocab_size
    return setup


def build(cfg: Config | Real, seq_len: int, device: torch.device, seed: int = 0):
    """A train.Setup in memory (no files): random teacher, derived random student, SHD plan, bases."""
    if isinstance(cfg, Real):
        return build_real(cfg, seq_len, device)
    from transformers import LlamaConfig, LlamaForCausalLM

    from shdcli.attention import capture
    from shdcli.models.families import derive_student_config, model_shape
    from shdcli.models.mapping import feature_bases, make_plan
    from shdcli.recipe import validate_recipe
    from shdcli.students.derive import build_student
    from shdcli.tasks.base import CAUSAL_LM
    from shdcli.train import Setup

    torch.manual_seed(seed)
    t_config = LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.t_layers, num_attention_heads=cfg.t_heads,
        num_key_value_heads=cfg.t_kv, intermediate_size=cfg.intermediate, head_dim=cfg.hidden // cfg.t_heads,
        max_position_embeddings=max(seq_len, 128), architectures=["LlamaForCausalLM"],
    )
    teacher = LlamaForCausalLM(t_config)
    pairs = [(i, -(-(i + 1) * cfg.t_layers // cfg.s_layers) - 1) for i in range(cfg.s_layers)]
    s_config = derive_student_config(t_config, pairs, cfg.s_heads, cfg.s_kv, None, None)
    student = build_student(teacher, s_config, CAUSAL_LM)
    recipe = validate_recipe({
        "teacher": "memory", "student": {"from_teacher": {}}, "data": {"path": "memory", "seq_len": seq_len},
        "distill": {"logit": 1.0, "shd": 1.0},
    })
    plan = make_plan(model_shape(t_config), model_shape(s_config), "auto", "balanced")
    for model in (teacher, student):
        capture.enable(model)
    teacher.eval().requires_grad_(False)
    teacher.to(device)
    student.to(device).train()
    return Setup(recipe, device, None, teacher, student, None, CAUSAL_LM, plan, feature_bases(teacher, plan),
                 None, [], True)


def make_batch(cfg: Config, batch: int, seq_len: int, device: torch.device, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab, (batch, seq_len), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def configure(setup, mode: str) -> None:
    d = setup.recipe.distill
    base = mode.removesuffix("_fused")
    d.logit = 0.0 if base in ("student", "floor") else 1.0
    d.shd = 1.0 if base in ("lean", "naive") else 0.0
    if base in ("lean", "naive"):
        d.impl = base
    d.logit_impl = "fused" if mode.endswith("_fused") else "naive"
    setup.use_logit = d.logit > 0


def train_step(setup, mode: str, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
    """One optimiser step in `mode`; returns the loss."""
    from shdcli.attention.losses import causal_lm_loss
    from shdcli.train import step_losses

    configure(setup, mode)
    optimizer.zero_grad(set_to_none=True)
    if mode == "student":
        loss = causal_lm_loss(setup.student(**batch).logits, batch["input_ids"], batch["attention_mask"])
    else:
        loss, _, _ = step_losses(setup, batch)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_modes(cfg: Config, seq_len: int, batch_size: int, modes, rounds: int, device: torch.device) -> dict:
    """Median seconds per step and mode, modes interleaved round by round: {mode: {"cpu": s, "wall": s}}.

    cpu is this process's CPU time (what a step costs, whatever else runs on the machine); wall is
    elapsed time. On CUDA both are wall time after synchronising.
    """
    setup = build(cfg, seq_len, device)
    batch = make_batch(cfg, batch_size, seq_len, device)
    optimizer = torch.optim.AdamW(setup.student.parameters(), lr=1e-5)
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    wall: dict[str, list[float]] = {m: [] for m in modes}
    for m in modes:  # warm-up: lazy initialisation, optimizer state
        train_step(setup, m, batch, optimizer)
    for _ in range(rounds):
        for m in modes:
            sync(device)
            c0, w0 = time.process_time(), time.perf_counter()
            train_step(setup, m, batch, optimizer)
            sync(device)
            w1 = time.perf_counter()
            wall[m].append(w1 - w0)
            cpu[m].append(w1 - w0 if device.type == "cuda" else time.process_time() - c0)
    return {m: {"cpu": statistics.median(cpu[m]), "wall": statistics.median(wall[m])} for m in modes}


# --------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMeter:
    """Peak bytes above the level at `start` (VmHWM after /proc/self/clear_refs on CPU; CUDA allocator peak)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            self.before = _status_kb("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.before
        return _status_kb("VmHWM") * 1024 - self.before


def memory_modes(cfg: Config, seq_len: int, batch_size: int, modes, device: torch.device) -> dict:
    """Peak bytes above the pre-step level, per mode (run in a fresh process, see module doc); for the SHD
    modes also "<impl>_loss": the peak of the SHD loss alone (forward + backward to the student's q, k),
    above the captured records, which is what the implementation itself costs."""
    from shdcli.attention.losses import shd_loss

    setup = build(cfg, seq_len, device)
    batch = make_batch(cfg, batch_size, seq_len, device)
    optimizer = torch.optim.AdamW(setup.student.parameters(), lr=1e-5)
    meter = PeakMeter(device)
    train_step(setup, "floor", batch, optimizer)  # optimizer state, teacher and student lazy buffers first
    out = {}
    for m in modes:
        optimizer.zero_grad(set_to_none=True)
        meter.start()
        train_step(setup, m, batch, optimizer)
        out[m] = meter.peak()
    optimizer.zero_grad(set_to_none=True)
    for impl in [m for m in modes if m in ("lean", "naive")]:
        _, t_records = setup.teacher_forward(batch)
        with setup.student_recorder.active():
            setup.student(**batch)
            s_records = dict(setup.student_recorder.records)
        inputs = [t for r in s_records.values() for t in (r.query, r.key)]
        meter.start()
        res = shd_loss(t_records, s_records, setup.plan.pairs, setup.plan.groups, setup.bases,
                       batch["attention_mask"].bool(), impl=impl)
        torch.autograd.grad(res.loss, inputs)
        out[f"{impl}_loss"] = meter.peak()
        del res, inputs, t_records, s_records
    return out


def memory_in_subprocess(cfg_name: str, sizes: list[tuple[int, int]], modes, device: str) -> dict:
    """{N: {mode: bytes}} measured by a fresh `perf.py --child-memory` process (see module doc)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TOP_PAD_": "0", "PYTHONPATH": str(ROOT)}
    spec = ",".join(f"{n}:{b}" for n, b in sizes)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-memory", cfg_name, spec, ",".join(modes),
           "--device", device, "--threads", str(torch.get_num_threads())]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"memory measurement failed for {spec}:\n{res.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}


# --------------------------------------------------------------------------- equivalence
def check_equivalence(cfg: Config, seq_len: int, batch_size: int, device: torch.device,
                      chunks=(0, 1, 5), rtol: float = 1e-4) -> int:
    """Assert that distill.impl lean and naive give the same SHD loss and student gradients (fp32) through
    train.step_losses, on a packed batch and on right- and left-padded batches. Returns the cases checked.

    Gradient entries are compared with rtol and, for entries near zero, atol = 1e-5 x the tensor's largest
    entry: a float32 sum over thousands of terms in a different order is not closer than that."""
    setup = build(cfg, seq_len, device)
    # HF's init (std 0.02) gives near-uniform attention, where the KL gradient p - t is a small difference of
    # near-equal numbers and float32 rounding dominates it in either path. Sharper maps make a fair test.
    with torch.no_grad():
        for model in (setup.teacher, setup.student):
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(6.0)
                layer.self_attn.k_proj.weight.mul_(6.0)
    d = setup.recipe.distill
    d.task, d.logit, d.shd = 0.0, 0.0, 1.0
    setup.use_logit = False
    packed = make_batch(cfg, batch_size, seq_len, device)
    right = {k: v.clone() for k, v in packed.items()}
    right["attention_mask"][0, seq_len * 2 // 3:] = 0
    left = {k: v.clone() for k, v in packed.items()}
    left["attention_mask"][-1, :seq_len // 3] = 0
    cases = 0
    for name, batch in (("packed", packed), ("right-padded", right), ("left-padded", left)):
        results = {}
        for impl, chunk in [("naive", 0)] + [("lean", c) for c in chunks]:
            d.impl, d.chunk_rows = impl, chunk
            setup.student.zero_grad(set_to_none=True)
            total, parts, _ = step_losses_of(setup, batch)
            total.backward()
            grads = [p.grad.detach().clone() for p in setup.student.parameters() if p.grad is not None]
            results[(impl, chunk)] = (parts["shd"], grads)
        ref_loss, ref_grads = results[("naive", 0)]
        for (impl, chunk), (loss, grads) in results.items():
            where = f"{name}, impl={impl}, chunk_rows={chunk}"
            torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0.0, msg=lambda m, w=where: f"loss, {w}: {m}")
            assert len(grads) == len(ref_grads) > 0, where
            for g, ref in zip(grads, ref_grads):
                scale = float(ref.abs().max())
                torch.testing.assert_close(g, ref, rtol=rtol, atol=1e-5 * scale,
                                           msg=lambda m, w=where: f"student gradient, {w}: {m}")
            cases += 1
    return cases


def step_losses_of(setup, batch):
    from shdcli.train import step_losses

    return step_losses(setup, batch)


# --------------------------------------------------------------------------- report
def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def tables(times: dict, mems: dict, sizes: dict, modes, clock: str) -> str:
    """Markdown tables of step-time ratios (to logit KD) and peak memory, plus the SHD ratios."""
    lines = [f"Step time relative to logit KD (median {clock} time per step; kd = 1.00, so the lean and naive "
             "columns are SHD lean / KD and SHD naive / KD)", "",
             "| N | B | " + " | ".join(modes) + " | lean / naive |",
             "|" + "---|" * (len(modes) + 3)]
    for n in sorted(times):
        t = {m: v[clock] for m, v in times[n].items()}
        kd = t.get("kd", 0.0)
        row = [str(n), str(sizes[n])] + [ratio(t[m], kd) if m in t else "-" for m in modes]
        row.append(ratio(t["lean"], t["naive"]) if "lean" in t and "naive" in t else "-")
        lines.append("| " + " | ".join(row) + " |")
    if mems:
        lines += ["", "Peak memory above the pre-step level, MiB (extra = mode - logit KD)", "",
                  "| N | B | " + " | ".join(modes) + " | lean extra | naive extra | lean extra / naive extra "
                  "| SHD loss alone: lean | naive | lean / naive |",
                  "|" + "---|" * (len(modes) + 8)]
        for n in sorted(mems):
            m_ = mems[n]
            kd = m_.get("kd")
            lean_x = None if kd is None or "lean" not in m_ else m_["lean"] - kd
            naive_x = None if kd is None or "naive" not in m_ else m_["naive"] - kd
            row = [str(n), str(sizes[n])] + [mib(m_.get(m)) for m in modes] + [mib(lean_x), mib(naive_x)]
            row.append(ratio(max(lean_x, 0), naive_x) if lean_x is not None and naive_x else "-")
            alone = m_.get("lean_loss"), m_.get("naive_loss")
            row += [mib(alone[0]), mib(alone[1]), ratio(*alone) if None not in alone else "-"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def verdicts(times: dict, mems: dict, long_n: int | None) -> list[str]:
    out = []
    if 512 in times and {"lean", "kd"} <= set(times[512]):
        r = times[512]["lean"]["cpu"] / times[512]["kd"]["cpu"]
        out.append(f"target 1, SHD lean adds <= 15% step time over logit KD at N=512: lean/kd = {r:.3f} "
                   f"(+{100 * (r - 1):.1f}%) -> {'MET' if r <= 1.15 else 'MISSED'}")
    if 2048 in mems and {"lean", "naive", "kd"} <= set(mems[2048]):
        m = mems[2048]
        r = max(m["lean"] - m["kd"], 0) / max(m["naive"] - m["kd"], 1)
        out.append(f"target 2, SHD lean extra memory <= 25% of naive's at N=2048: {mib(m['lean'] - m['kd'])} / "
                   f"{mib(m['naive'] - m['kd'])} MiB = {100 * r:.1f}% -> {'MET' if r <= 0.25 else 'MISSED'}")
        if "lean_loss" in m and "naive_loss" in m:
            r2 = m["lean_loss"] / max(m["naive_loss"], 1)
            out.append(f"         the SHD loss alone (forward + backward to q, k): {mib(m['lean_loss'])} / "
                       f"{mib(m['naive_loss'])} MiB = {100 * r2:.1f}% -> {'MET' if r2 <= 0.25 else 'MISSED'}")
    if long_n:
        ok = long_n in times and "lean" in times[long_n]
        extra = ""
        if ok and long_n in mems and {"lean", "kd"} <= set(mems[long_n]):
            extra = (f", peak {mib(mems[long_n]['lean'])} MiB vs {mib(mems[long_n]['kd'])} MiB for logit KD, "
                     f"lean/kd time {times[long_n]['lean']['cpu'] / times[long_n]['kd']['cpu']:.2f}")
        out.append(f"target 3, N={long_n} runs in the lean path: {'MET' if ok else 'MISSED'}{extra}")
    return out


def logit_tables(times: dict, mems: dict, sizes: dict, modes, clock: str) -> str:
    """Issue 17's tables: step time relative to the floor, peak memory and its excess over the floor."""
    lines = [] if not times else [
        f"Step time relative to the floor (median {clock} time per step; floor = 1.00)", "",
        "| N | B | " + " | ".join(modes) + " | lean_fused / floor_fused |", "|" + "---|" * (len(modes) + 3)]
    for n in sorted(times):
        t = {m: v[clock] for m, v in times[n].items()}
        row = [str(n), str(sizes[n])] + [ratio(t[m], t["floor"]) if m in t else "-" for m in modes]
        row.append(ratio(t["lean_fused"], t["floor_fused"]) if {"lean_fused", "floor_fused"} <= set(t) else "-")
        lines.append("| " + " | ".join(row) + " |")
    if mems:
        lines += ["", "Peak memory above the pre-step level, MiB; logit-KD extra = kd - floor (full logits) and "
                  "kd_fused - floor, kd_fused - floor_fused (fused)", "",
                  "| N | B | " + " | ".join(modes) + " | KD extra: naive | fused over floor | fused over floor_fused "
                  "| fused / naive (strict) |", "|" + "---|" * (len(modes) + 6)]
        for n in sorted(mems):
            m_ = mems[n]
            row = [str(n), str(sizes[n])] + [mib(m_.get(m)) for m in modes]
            if {"kd", "kd_fused", "floor", "floor_fused"} <= set(m_):
                naive_x = m_["kd"] - m_["floor"]
                fused_x, strict_x = m_["kd_fused"] - m_["floor"], m_["kd_fused"] - m_["floor_fused"]
                row += [mib(naive_x), mib(fused_x), mib(strict_x), ratio(max(strict_x, 0), naive_x)]
            else:
                row += ["-"] * 4
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def logit_verdicts(times: dict, mems: dict) -> list[str]:
    out = []
    if 512 in times and {"lean_fused", "floor", "floor_fused"} <= set(times[512]):
        t = {m: v["cpu" if "cpu" in v else "wall"] for m, v in times[512].items()}
        r, r2 = t["lean_fused"] / t["floor"], t["lean_fused"] / t["floor_fused"]
        out.append(f"goal 1, KD + SHD step <= 1.3x its floor at N=512: lean_fused / floor = {r:.2f}, "
                   f"/ floor_fused = {r2:.2f} -> {'MET' if max(r, r2) <= 1.3 else 'MISSED'}"
                   + (f" (full logits: lean / floor = {t['lean'] / t['floor']:.2f})" if "lean" in t else ""))
    if 2048 in mems and {"kd", "kd_fused", "floor", "floor_fused"} <= set(mems[2048]):
        m = mems[2048]
        naive_x, strict_x = m["kd"] - m["floor"], m["kd_fused"] - m["floor_fused"]
        r = max(strict_x, 0) / max(naive_x, 1)
        out.append(f"goal 2, logit-KD extra memory at N=2048 <= 15% of today's: {mib(strict_x)} / {mib(naive_x)} MiB "
                   f"= {100 * r:.1f}% -> {'MET' if r <= 0.15 else 'MISSED'}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds; asserts lean == naive")
    p.add_argument("--seqs", default="128,512,1024,2048", help="sequence lengths N")
    p.add_argument("--long", type=int, default=4096, help="also run logit KD and SHD lean at this N (0: skip)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per batch: B = max(1, tokens // N)")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (median); one warm-up round first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: steadier on a shared machine; 0 = torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--logits", action="store_true", help="issue 17: floor / logit KD / KD + SHD, full vs fused logits")
    p.add_argument("--model", default="full", choices=[k for k in CONFIGS if k != "quick"],
                   help="full | vocab262k (Gemma-3-sized vocabulary) | smollm2 (the real recipe's models)")
    p.add_argument("--memory-seqs", default=None, help="sequence lengths for memory (default: --seqs)")
    p.add_argument("--json", type=Path, help="write all measurements here")
    p.add_argument("--child-memory", nargs=3, metavar=("CFG", "SIZES", "MODES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child_memory:
        name, spec, modes = args.child_memory
        cfg = CONFIGS[name]
        out = {}
        for item in spec.split(","):
            n, b = (int(x) for x in item.split(":"))
            out[n] = memory_modes(cfg, n, b, modes.split(","), device)
        print(json.dumps(out))
        return 0

    t_start = time.perf_counter()
    cfg_name = "quick" if args.quick else args.model
    cfg = CONFIGS[cfg_name]
    if args.logits:
        return main_logits(args, cfg_name, cfg, device, t_start)
    if args.quick:
        seqs, long_n, tokens, rounds = [16, 40], 96, 64, 1
    else:
        seqs, long_n, tokens, rounds = [int(x) for x in args.seqs.split(",")], args.long, args.tokens, args.rounds
    sizes = {n: max(1, tokens // n) for n in seqs}
    if long_n:
        sizes[long_n] = max(1, tokens // long_n)
    clock = "wall" if device.type == "cuda" else "cpu"
    print(f"# SHD performance: {cfg.describe()}", flush=True)
    print(f"# device {device} ({torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs), torch "
          f"{torch.__version__}; {tokens} tokens per batch; median of {rounds} rounds", flush=True)

    if args.quick:
        cases = check_equivalence(cfg, 24, 3, device)
        print(f"lean == naive (loss and student gradients, rtol 1e-4, fp32): OK, {cases} cases", flush=True)

    times: dict[int, dict] = {}
    for n in seqs:
        times[n] = time_modes(cfg, n, sizes[n], MODES, rounds, device)
        print(f"timed N={n}: " + ", ".join(f"{m} {v[clock] * 1e3:.0f} ms" for m, v in times[n].items()), flush=True)
    if long_n:
        times[long_n] = time_modes(cfg, long_n, sizes[long_n], ("kd", "lean"), 1, device)
        print(f"timed N={long_n}: " + ", ".join(f"{m} {v[clock] * 1e3:.0f} ms" for m, v in times[long_n].items()),
              flush=True)
    mems: dict[int, dict] = {}
    if not args.no_memory:
        if args.quick:  # one process for everything
            mems.update(memory_in_subprocess(cfg_name, [(n, sizes[n]) for n in sizes], MODES, args.device))
        else:  # one process per size: a failure or a large peak at one N leaves the others alone
            for n in seqs:
                mems.update(memory_in_subprocess(cfg_name, [(n, sizes[n])], MODES, args.device))
            if long_n:
                mems.update(memory_in_subprocess(cfg_name, [(long_n, sizes[long_n])], ("kd", "lean"), args.device))
        print("measured memory", flush=True)
    verdict_lines = verdicts(times, mems, long_n if not args.quick else None)
    return report(args, tables(times, mems, sizes, MODES, clock), verdict_lines, cfg, device, clock, sizes, times,
                  mems, t_start)


def main_logits(args, cfg_name: str, cfg, device: torch.device, t_start: float) -> int:
    """--logits: LOGIT_MODES timed at --seqs and measured at --memory-seqs, tables relative to the floor."""
    seqs = [int(x) for x in args.seqs.split(",")] if not args.quick else [16, 40]
    mem_seqs = [int(x) for x in (args.memory_seqs or args.seqs).split(",")] if not args.quick else seqs
    tokens, rounds = (64, 1) if args.quick else (args.tokens, args.rounds)
    sizes = {n: max(1, tokens // n) for n in sorted(set(seqs) | set(mem_seqs))}
    clock = "wall" if device.type == "cuda" else "cpu"
    print(f"# logit KD without full logits: {cfg.describe()}", flush=True)
    print(f"# device {device} ({torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs), torch "
          f"{torch.__version__}; {tokens} tokens per batch; median of {rounds} rounds", flush=True)
    times: dict[int, dict] = {}
    if rounds > 0:
        for n in seqs:
            times[n] = time_modes(cfg, n, sizes[n], LOGIT_MODES, rounds, device)
            print(f"timed N={n}: " + ", ".join(f"{m} {v[clock] * 1e3:.0f} ms" for m, v in times[n].items()), flush=True)
    mems: dict[int, dict] = {}
    if not args.no_memory:
        for n in mem_seqs:
            mems.update(memory_in_subprocess(cfg_name, [(n, sizes[n])], LOGIT_MODES, args.device))
            print(f"measured memory at N={n}", flush=True)
    return report(args, logit_tables(times, mems, sizes, LOGIT_MODES, clock), logit_verdicts(times, mems),
                  cfg, device, clock, sizes, times, mems, t_start)


def report(args, table: str, verdict_lines, cfg, device: torch.device, clock: str, sizes: dict, times: dict,
           mems: dict, t_start: float) -> int:
    """Print the table and verdicts, the total time, and write --json: the end of both benchmark modes."""
    print()
    print(table)
    print()
    for line in verdict_lines:
        print(line)
    print(f"\n# total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"config": cfg.describe(), "device": str(device), "clock": clock,
                                         "threads": torch.get_num_threads(), "sizes": sizes, "times": times,
                                         "memory": mems}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
