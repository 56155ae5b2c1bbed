"""Does llama.cpp run an exported student as transformers does? (issue 16)

Exports STUDENT_DIR with `shd export --format gguf` at each --dtype, loads every file in llama.cpp
(llama-cpp-python, built from source) and in transformers (the GGUF loader), and compares both with the
student's own HF folder in transformers (float32, the reference) on held-out text (Debian fortunes; the
recipes train on CPython's pydoc topics):

  - next-token log-probabilities: per position, log p(actual next token) and the full log-softmax row
    (mean |difference| over the vocabulary); top-1 agreement (same argmax); perplexity of each;
  - greedy continuation: how many of --gen-tokens generated tokens match the reference;
  - tokenizer: share of held-out documents that llama.cpp's tokenizer (from the GGUF) splits exactly as
    the student's HF tokenizer does (the model comparisons feed both runtimes the same HF token ids);
  - q8_0 bytes: our Q8_0 file against llama.cpp's own quantizer run on our f32 export, tensor by tensor;
  - speed on CPU with the same thread count: prompt tokens/s (one window forward) and generation tokens/s
    (greedy, one token at a time with a KV cache), in rounds interleaving transformers and both runtimes;
    medians of the per-round ratios to transformers (the reference).

  python benchmarks/llamacpp_check.py runs/smollm2_9to3/student --dtypes f16 q8_0
  (needs: pip install llama-cpp-python, built from source: CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install
   llama-cpp-python --no-binary :all:)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from shdcli import offline  # noqa: E402

offline()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shdcli.export import export  # noqa: E402

FORTUNES = Path("/usr/share/games/fortunes")


def fortunes(files: list[str], limit: int) -> list[str]:
    """Held-out documents: fortunes (one per `%`-separated entry), longest first for fuller windows."""
    docs: list[str] = []
    for name in files:
        text = (FORTUNES / name).read_text(encoding="utf-8", errors="replace")
        docs += [d.strip() for d in text.split("\n%\n") if len(d.strip()) > 80]
    return docs[:limit]


def windows(tokenizer, docs: list[str], n_ctx: int, count: int) -> list[list[int]]:
    """Documents joined with EOS and cut into `count` windows of n_ctx token ids."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(ids) >= n_ctx * count:
            break
    if len(ids) < n_ctx * count:
        raise SystemExit(f"held-out text gives {len(ids)} tokens, fewer than {count} x {n_ctx}")
    return [ids[i * n_ctx:(i + 1) * n_ctx] for i in range(count)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


class HFRunner:
    def __init__(self, model, name: str):
        self.model, self.name = model.eval(), name

    def logprobs(self, ids: list[int]) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        return log_softmax(logits), time.perf_counter() - start

    def generate(self, ids: list[int], n: int) -> tuple[list[int], float]:
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=self.model.config.eos_token_id)
        return out[0, len(ids):].tolist(), time.perf_counter() - start


class LlamaCppRunner:
    def __init__(self, path: Path, n_ctx: int, threads: int, name: str):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                         n_threads_batch=threads, logits_all=True, verbose=False, seed=0)
        self.name = name

    def logprobs(self, ids: list[int]) -> tuple[np.ndarray, float]:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        elapsed = time.perf_counter() - start
        return log_softmax(np.array(self.llm.scores[: len(ids)])), elapsed

    def generate(self, ids: list[int], n: int) -> tuple[list[int], float]:
        self.llm.reset()
        self.llm.eval(ids)  # the prompt, not timed: generation speed only
        out: list[int] = []
        start = time.perf_counter()
        for _ in range(n):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            self.llm.eval([token])
        return out, time.perf_counter() - start

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def same_as_llamacpp_quantizer(student: Path, ours: Path, out_dir: Path) -> tuple[int, int]:
    """(identical tensors, all tensors): our q8_0 file against llama.cpp's own quantizer
    (llama_model_quantize) applied to our f32 export, compared block for block."""
    import ctypes

    import gguf
    import llama_cpp

    f32 = export(student, "gguf", "f32", out_dir / "student-f32.gguf").path
    theirs = out_dir / "student-q8_0-by-llamacpp.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, 1
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) != 0:
        raise SystemExit("llama_model_quantize failed")
    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    same = sum(n in b and a[n].tensor_type == b[n].tensor_type and np.array_equal(np.asarray(a[n].data),
                                                                                  np.asarray(b[n].data)) for n in a)
    return same, len(set(a) | set(b))


def compare(reference: list[np.ndarray], other: list[np.ndarray], wins: list[list[int]]) -> dict:
    target_diff, full_diff, agree, nll_ref, nll = [], [], [], [], []
    for ref, got, ids in zip(reference, other, wins):
        nxt = np.array(ids[1:])
        pos = np.arange(len(nxt))
        ref_lp, got_lp = ref[pos, nxt], got[pos, nxt]
        target_diff.append(np.abs(ref_lp - got_lp))
        full_diff.append(np.abs(ref[:-1] - got[:-1]).mean(axis=-1))
        agree.append(ref[:-1].argmax(-1) == got[:-1].argmax(-1))
        nll_ref.append(-ref_lp)
        nll.append(-got_lp)
    cat = np.concatenate
    return {"target_logprob_mae": float(cat(target_diff).mean()), "target_logprob_max": float(cat(target_diff).max()),
            "full_logprob_mae": float(cat(full_diff).mean()), "top1_agreement": float(cat(agree).mean()),
            "ppl_reference": float(np.exp(cat(nll_ref).mean())), "ppl": float(np.exp(cat(nll).mean()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student", type=Path, help="student folder written by shd distill")
    parser.add_argument("--dtypes", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--fortunes", nargs="+", default=["literature", "science", "wisdom"])
    parser.add_argument("--n-ctx", type=int, default=128, help="tokens per window")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds")
    parser.add_argument("--out-dir", type=Path, default=None, help="where the .gguf files go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="shd-llamacpp-"))
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    docs = fortunes(args.fortunes, 2000)
    wins = windows(tokenizer, docs, args.n_ctx, args.windows)
    reference = HFRunner(AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32),
                         "transformers (HF folder, f32)")

    ref_lp = [reference.logprobs(w)[0] for w in wins]
    prompt = wins[0][: args.n_ctx // 2]
    ref_gen = reference.generate(prompt, args.gen_tokens)[0]
    rows, extra, ref_speed = [], {}, []
    for dtype in args.dtypes:
        result = export(args.student, "gguf", dtype, out_dir / f"student-{dtype}.gguf")
        runners = [LlamaCppRunner(result.path, args.n_ctx, args.threads, f"llama.cpp ({dtype})"),
                   HFRunner(AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=result.path.name,
                                                                 dtype=torch.float32),
                            f"transformers (GGUF {dtype})")]
        # Speed: rounds interleave the reference and the two runtimes (same window, same prompt), so load
        # from other processes hits them alike; medians of per-round ratios to the reference.
        times = {name: {"prompt": [], "gen": []} for name in [reference.name] + [r.name for r in runners]}
        for r in range(args.rounds):
            for runner in [reference, *runners]:
                times[runner.name]["prompt"].append(runner.logprobs(wins[r % len(wins)])[1])
                times[runner.name]["gen"].append(runner.generate(prompt, args.gen_tokens)[1])
        ref_t = times[reference.name]
        ref_speed.append((args.n_ctx / statistics.median(ref_t["prompt"]),
                          args.gen_tokens / statistics.median(ref_t["gen"])))
        for runner in runners:
            lps = [runner.logprobs(w)[0] for w in wins]
            gen = runner.generate(prompt, args.gen_tokens)[0]
            t = times[runner.name]
            row = {"runtime": runner.name, "file_mib": result.bytes / 2**20, **compare(ref_lp, lps, wins),
                   "greedy_match": sum(a == b for a, b in zip(gen, ref_gen)) / len(ref_gen),
                   "prompt_tok_s": args.n_ctx / statistics.median(t["prompt"]),
                   "prompt_speed_vs_hf": statistics.median(a / b for a, b in zip(ref_t["prompt"], t["prompt"])),
                   "gen_tok_s": args.gen_tokens / statistics.median(t["gen"]),
                   "gen_speed_vs_hf": statistics.median(a / b for a, b in zip(ref_t["gen"], t["gen"]))}
            if isinstance(runner, LlamaCppRunner):
                same = [runner.tokenize(d) == tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs[:500]]
                row["tokenizer_agreement"] = sum(same) / len(same)
            rows.append(row)
        del runners
        if dtype == "q8_0":
            extra["q8_0_tensors_identical_to_llamacpp_quantize"] = same_as_llamacpp_quantizer(
                args.student, result.path, out_dir)
    print(f"student {args.student}: {args.windows} windows x {args.n_ctx} held-out tokens "
          f"(fortunes {' '.join(args.fortunes)}), {args.threads} thread(s); reference {reference.name}: "
          f"ppl {rows[0]['ppl_reference']:.2f}, {ref_speed[0][0]:.0f} prompt tok/s, {ref_speed[0][1]:.1f} gen tok/s "
          f"(median of {args.rounds} rounds interleaved with the runtimes below)")
    cols = ["runtime", "file_mib", "target_logprob_mae", "target_logprob_max", "full_logprob_mae", "top1_agreement",
            "ppl", "greedy_match", "tokenizer_agreement", "prompt_tok_s", "prompt_speed_vs_hf", "gen_tok_s",
            "gen_speed_vs_hf"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        cells = [row.get(c, "") for c in cols]
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in cells) + " |")
    if "q8_0_tensors_identical_to_llamacpp_quantize" in extra:
        same, total = extra["q8_0_tensors_identical_to_llamacpp_quantize"]
        print(f"q8_0: {same} of {total} tensors byte-identical to llama.cpp's llama_model_quantize of the f32 export")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "reference_tok_s": ref_speed, **extra}, indent=2))


if __name__ == "__main__":
    main()
