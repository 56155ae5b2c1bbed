"""The student's model card (README.md, the Hugging Face convention), rendered from a run's metrics.

YAML front matter (base_model = the teacher, library_name, pipeline_tag, tags), then: what was pruned
(teacher vs student shape from the plan), the recipe, the final evaluation against the teacher (the
measured numbers of metrics["final_eval"]: student keys next to their teacher_ twins), and how to load
and export the folder. Written after the final evaluation, so the numbers are the run's own.
"""

from __future__ import annotations

from typing import Any

import yaml

from shdcli.report import markdown_table

_PIPELINES = {"causal-lm": "text-generation", "encoder": "feature-extraction",
              "image-classification": "image-classification", "sequence-classification": "text-classification",
              "diffusion": "unconditional-image-generation"}
_SHAPE_ROWS = (("layers", "layers"), ("heads", "attention heads"), ("kv_heads", "key/value heads"),
               ("head_dim", "head dim"), ("hidden", "hidden size"), ("intermediate", "MLP width"),
               ("vocab", "vocabulary"), ("max_positions", "context (positions)"))


def render_card(metrics: dict, task: str, sentence_transformers: bool = False) -> str:
    recipe, plan = metrics["recipe"], metrics["plan"]
    teacher = str(recipe["teacher"]["path"])
    pipeline = "sentence-similarity" if sentence_transformers else _PIPELINES.get(task, "feature-extraction")
    front = {
        "base_model": teacher,
        "library_name": "sentence-transformers" if sentence_transformers else "transformers",
        "pipeline_tag": pipeline,
        "tags": ["shd", "distillation", "knowledge-distillation", "attention-transfer", "pruned"]
        + (["sentence-transformers"] if sentence_transformers else []),
    }
    t, s = plan["teacher"], plan["student"]
    out = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# SHD student of `{teacher}`", "",
        f"A {s['model_type']} student distilled from `{teacher}` with Squeezing-Heads Distillation "
        f"([shd](https://arxiv.org/abs/2502.07436): each student head learns the attention map of a group of "
        "teacher heads, squeezed into one map), next to the task loss"
        + (" and logit KD." if recipe["distill"]["logit"] else "."), "",
        "## What was pruned", "",
        _shape_table(t, s, metrics.get("sizes", {})), "",
        "Student layer <- teacher layer, and the teacher heads each student head stands for:", "",
        _plan_table(plan), "",
        "## Recipe", "",
        f"{metrics['steps_done']} steps on `{recipe['data']['path']}` (sequence length {recipe['data']['seq_len']}, "
        f"batch {recipe['data']['batch_size']}, lr {recipe['train']['lr']:g}); loss weights task "
        f"{recipe['distill']['task']:g}, logit KD {recipe['distill']['logit']:g}, SHD {recipe['distill']['shd']:g}; "
        f"squeeze weights `{recipe['distill']['alpha']}`, grouping `{recipe['distill']['grouping']}`, "
        f"attention loss `{recipe['distill']['attn_loss']}`. The resolved recipe:", "",
        "```yaml", yaml.safe_dump(_without_output_dir(recipe), sort_keys=False).strip(), "```", "",
        "## Final evaluation", "",
        _metrics_section(metrics.get("final_eval") or {}), "",
        "## How to use", "",
        _usage(task, sentence_transformers),
    ]
    return "\n".join(out) + "\n"


def _shape_table(t: dict, s: dict, sizes: dict) -> str:
    rows = [[label, t.get(key), s.get(key)] for key, label in _SHAPE_ROWS if t.get(key) is not None]
    if sizes.get("teacher_params") and sizes.get("student_params"):
        rows.append(["parameters", f"{sizes['teacher_params']:,}", f"{sizes['student_params']:,} "
                     f"({sizes['student_params'] / sizes['teacher_params']:.1%})"])
    return markdown_table(["", "teacher", "student"], rows)


def _plan_table(plan: dict) -> str:
    rows = [[si, ti, "; ".join(f"{j}<-{{{','.join(map(str, g))}}}" for j, g in enumerate(groups))]
            for (si, ti), groups in zip(plan["layers"], plan["groups"])]
    return markdown_table(["student layer", "teacher layer", "student head <- teacher heads"], rows)


def _without_output_dir(recipe: dict) -> dict:
    return {k: v for k, v in recipe.items() if k != "output_dir"}


def _metrics_section(final: dict[str, Any]) -> str:
    """Student metrics that have a teacher_ twin side by side; the student-only ones after them."""
    if not final:
        return "No final evaluation was recorded for this run."
    paired = [[k, final[k], final[f"teacher_{k}"]] for k in final
              if not k.startswith("teacher_") and f"teacher_{k}" in final]
    alone = [[k, v] for k, v in final.items()
             if not k.startswith("teacher_") and f"teacher_{k}" not in final and k != "step"]
    teacher_only = [[k.removeprefix("teacher_"), v] for k, v in final.items()
                    if k.startswith("teacher_") and k.removeprefix("teacher_") not in final]
    parts = ["On the run's held-out validation split (documents never trained on):", "",
             markdown_table(["metric", "student", "teacher"], paired)]
    if teacher_only:
        parts += ["", markdown_table(["teacher metric", "teacher"], teacher_only)]
    if alone:
        parts += ["", "Student only (validation losses, ratios to the teacher):", "",
                  markdown_table(["metric", "student"], alone)]
    return "\n".join(parts)


def _usage(task: str, sentence_transformers: bool) -> str:
    if sentence_transformers:
        load = ("```python\nfrom sentence_transformers import SentenceTransformer\n\n"
                "model = SentenceTransformer(\"path/to/student\")  # pooling and normalisation as the teacher's\n"
                "embeddings = model.encode([\"A sentence.\", \"Another one.\"])\n```")
    elif task == "causal-lm":
        load = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                "model = AutoModelForCausalLM.from_pretrained(\"path/to/student\")\n"
                "tokenizer = AutoTokenizer.from_pretrained(\"path/to/student\")\n```")
    elif task == "sequence-classification":
        load = ("```python\nfrom transformers import pipeline\n\n"
                "classify = pipeline(\"text-classification\", model=\"path/to/student\")\n"
                "classify(\"What a lovely day.\")  # [{'label': ..., 'score': ...}] with the teacher's labels\n```")
    elif task == "image-classification":
        load = ("```python\nfrom transformers import AutoModelForImageClassification\n\n"
                "model = AutoModelForImageClassification.from_pretrained(\"path/to/student\")\n```")
    elif task == "diffusion":
        load = ("```python\nfrom diffusers import DDPMScheduler, DiTTransformer2DModel\n\n"
                "model = DiTTransformer2DModel.from_pretrained(\"path/to/student\")\n"
                "scheduler = DDPMScheduler.from_pretrained(\"path/to/student\")  # the teacher's noise schedule\n```")
    else:
        load = ("```python\nfrom transformers import AutoModel, AutoTokenizer\n\n"
                "model = AutoModel.from_pretrained(\"path/to/student\")\n```")
    out = [load, "", "Evaluate again: `shd eval path/to/student` (teacher and held-out text from the run's "
           "metrics.json)."]
    if task == "causal-lm":
        out += ["", "Export for llama.cpp (and Ollama, LM Studio, anything that reads GGUF):", "",
                "```bash\nshd export path/to/student --format gguf --dtype q8_0   # or f16, f32\n"
                "llama-cli -m path/to/student-q8_0.gguf -p \"The capital of France is\"\n```"]
    return "\n".join(out)
