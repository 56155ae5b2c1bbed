#!/usr/bin/env bash
# One prepared check of shd on a CUDA GPU (under 8 minutes on one H100-class card), ending in one table:
#   1. lean vs naive SHD equivalence on CUDA      (tests/test_perf_equivalence.py, SHD_TEST_DEVICE=cuda)
#   2. fused vs naive logit equivalence on CUDA   (tests/test_fused_logits.py, SHD_TEST_DEVICE=cuda)
#   3. a bf16 `shd distill` of recipes/smollm2_9to3.yaml, 20 steps: every logged loss finite, student reloads
#   4. the same with train.compile=true: loss at step 20 and tokens/s against 3 (torch.compile on vs off)
#   5. benchmarks/perf.py on CUDA: step time and peak memory of KD + SHD lean and naive over KD alone
# Without CUDA it prints "no CUDA: skipped" and exits 0 (tests/test_gpu_check.py runs it so on CPU).
#
#   bash benchmarks/gpu_check.sh            # results and logs under $GPU_CHECK_OUT (default $OUT or /tmp)
# Exit status: 0 when every check passed, 1 otherwise; the table says which.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no CUDA: skipped"
    exit 0
fi

DIR=${GPU_CHECK_OUT:-${OUT:-/tmp}/gpu_check}
mkdir -p "$DIR"
RESULTS="$DIR/results.tsv"
: > "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)

record() {  # record CHECK STATUS DETAIL
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$RESULTS"
}

run_tests() {  # run_tests NAME FILE SELECTION: pytest on CUDA, the last summary line as the detail
    local log="$DIR/$1.log"
    if SHD_TEST_DEVICE=cuda timeout 150 "$PY" -m pytest -q -p no:cacheprovider "$2" -k "$3" > "$log" 2>&1; then
        record "$1" PASS "$(grep -E 'passed|failed' "$log" | tail -1)"
    else
        record "$1" FAIL "$(grep -E 'passed|failed|Error' "$log" | tail -1) (see $log)"
    fi
}

distill() {  # distill NAME EXTRA_SET...: 20 bf16 steps of the SmolLM2 recipe into $DIR/NAME
    local name=$1
    shift
    local sets=(--set train.max_steps=20 --set train.dtype=bfloat16 --set train.device=cuda
                --set train.eval_every=20 --set train.save_every=20 --set "output_dir=$DIR/$name" "$@")
    timeout 240 "$PY" -m shdcli distill recipes/smollm2_9to3.yaml "${sets[@]}" --overwrite > "$DIR/$name.log" 2>&1
}

summarise_run() {  # summarise_run NAME: finite losses, the student reloads and runs; prints "loss tok/s"
    "$PY" - "$DIR/$1" <<'EOF'
import json, math, sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

out = Path(sys.argv[1])
metrics = json.loads((out / "metrics.json").read_text())
values = [v for h in metrics["history"] for k, v in h.items() if isinstance(v, float) and k != "time_s"]
assert values and all(math.isfinite(v) for v in values), "a logged value is not finite"
model = AutoModelForCausalLM.from_pretrained(out / "student", dtype=torch.float32).cuda().eval()
tokens = AutoTokenizer.from_pretrained(out / "student")("def add(a, b):\n    return a + b", return_tensors="pt")
with torch.no_grad():
    logits = model(**{k: v.cuda() for k, v in tokens.items()}).logits
assert torch.isfinite(logits).all(), "the reloaded student gives non-finite logits"
print(f"{metrics['history'][-1]['total']:.4f} {metrics['timings']['tokens_per_s']:.0f}")
EOF
}

# ---- 1, 2: equivalence of the fast paths on CUDA
run_tests "lean == naive SHD (cuda)" tests/test_perf_equivalence.py "lean_matches_naive or bfloat16_teacher"
run_tests "fused == naive logits (cuda)" tests/test_fused_logits.py "equal_reference or bias_softcap"

# ---- 3, 4: bf16 distillation, compile off and on
EAGER=""
if distill eager && EAGER=$(summarise_run eager 2>>"$DIR/eager.log"); then
    record "bf16 distill, 20 steps" PASS "loss $(cut -d' ' -f1 <<< "$EAGER"), $(cut -d' ' -f2 <<< "$EAGER") tok/s"
else
    record "bf16 distill, 20 steps" FAIL "see $DIR/eager.log"
fi
if distill compiled --set train.compile=true && COMPILED=$(summarise_run compiled 2>>"$DIR/compiled.log"); then
    detail="loss $(cut -d' ' -f1 <<< "$COMPILED"), $(cut -d' ' -f2 <<< "$COMPILED") tok/s"
    if [ -n "$EAGER" ]; then
        detail="$detail; vs eager: loss $(cut -d' ' -f1 <<< "$EAGER"), tok/s ratio $("$PY" -c \
            "print(f'{$(cut -d' ' -f2 <<< "$COMPILED") / max($(cut -d' ' -f2 <<< "$EAGER"), 1):.2f}')")"
    fi
    record "torch.compile on" PASS "$detail"
else
    record "torch.compile on" FAIL "see $DIR/compiled.log"
fi

# ---- 5: step time and peak memory over logit KD alone (perf.py: synchronised wall clock, max_memory_allocated)
if timeout 200 "$PY" benchmarks/perf.py --device cuda --seqs 512,2048 --long 0 --rounds 5 \
        --json "$DIR/perf.json" > "$DIR/perf.log" 2>&1; then
    "$PY" - "$DIR/perf.json" >> "$RESULTS" <<'EOF'
import json, sys

data = json.load(open(sys.argv[1]))
for n, modes in data["times"].items():
    mem = data["memory"].get(n, {})
    for mode in ("lean", "naive"):
        time_ratio = modes[mode]["wall"] / modes["kd"]["wall"]
        mem_ratio = mem[mode] / mem["kd"] if mem.get(mode) and mem.get("kd") else float("nan")
        print(f"perf N={n}: KD + SHD {mode} / KD\tPASS\tstep time {time_ratio:.2f}x "
              f"({modes[mode]['wall'] * 1e3:.1f} vs {modes['kd']['wall'] * 1e3:.1f} ms), peak memory {mem_ratio:.2f}x")
EOF
else
    record "perf.py on cuda" FAIL "see $DIR/perf.log"
fi

# ---- the table
"$PY" - "$RESULTS" "$(( $(date +%s) - START ))" <<'EOF'
import sys

import torch

rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
print(f"\n# shd GPU check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {sys.argv[2]} s")
width = max(len(r[0]) for r in rows)
print(f"| {'check'.ljust(width)} | result | detail |")
print(f"|{'-' * (width + 2)}|--------|--------|")
for check, status, detail in rows:
    print(f"| {check.ljust(width)} | {status:6} | {detail} |")
EOF
! grep -q $'\tFAIL\t' "$RESULTS"
