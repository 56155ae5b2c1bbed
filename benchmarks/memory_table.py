"""README's "Memory per GPU" table for the recipes in recipes/scale/, computed by shdcli.memory.estimate from
the models' published configs (below: the hub's config.json values) and the code's dtype choices.

  python benchmarks/memory_table.py            # print the table
  python benchmarks/memory_table.py --write    # replace it in README.md (between the memory-table markers)

tests/test_memory_table.py fails when README's table differs from what this prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from shdcli import offline  # noqa: E402

offline()

from transformers import GPT2Config, LlamaConfig  # noqa: E402

from shdcli.memory import estimate, render_table  # noqa: E402
from shdcli.recipe import load_recipe  # noqa: E402

README = ROOT / "README.md"
BEGIN, END = "<!-- memory-table: benchmarks/memory_table.py -->", "<!-- /memory-table -->"


def configs() -> dict:
    """Folder name in the recipes -> its config (the hub's config.json values that shape the model)."""
    gpt2 = {name: GPT2Config(n_layer=layers, n_head=heads, n_embd=width, vocab_size=50257, n_positions=1024)
            for name, layers, heads, width in [("gpt2-xl", 48, 25, 1600), ("gpt2", 12, 12, 768),
                                               ("gpt2-medium", 24, 16, 1024), ("gpt2-large", 36, 20, 1280)]}
    llama = {name: LlamaConfig(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                               hidden_size=width, intermediate_size=inter, vocab_size=32000,
                               max_position_embeddings=4096)
             for name, layers, heads, width, inter in [("Llama-2-13b-hf", 40, 40, 5120, 13824),
                                                       ("Llama-2-7b-hf", 32, 32, 4096, 11008)]}
    return {**gpt2, **llama}


# (label, recipe, overrides, world): every scale recipe on one node of 8 GPUs, and the 13B -> 7B run with DDP
# (to show why it is FSDP) and with FSDP on 4 GPUs.
ROWS = [
    ("GPT-2-XL -> GPT-2, DDP", "gpt2xl_to_gpt2.yaml", [], 8),
    ("GPT-2-XL -> GPT-2-medium, DDP", "gpt2xl_to_gpt2_medium.yaml", [], 8),
    ("GPT-2-XL -> GPT-2-large, DDP", "gpt2xl_to_gpt2_large.yaml", [], 8),
    ("Llama-2-13B -> 7B, DDP", "llama2_13b_to_7b.yaml", ["train.strategy=ddp"], 8),
    ("Llama-2-13B -> 7B, FSDP W=8", "llama2_13b_to_7b.yaml", [], 8),
    ("Llama-2-13B -> 7B, FSDP W=4", "llama2_13b_to_7b.yaml", [], 4),
    ("Llama-2-13B -> 7B LoRA r=16, DDP", "llama2_13b_to_7b_lora.yaml", [], 8),
]


def table() -> str:
    known = configs()
    rows = []
    for label, name, overrides, world in ROWS:
        recipe = load_recipe(ROOT / "recipes" / "scale" / name, overrides)
        student = recipe.student.path
        memory = estimate(recipe, known[Path(recipe.teacher.path).name], known[Path(student).name], world)
        rows.append((f"{label} ({recipe.data.batch_size}, {recipe.data.seq_len})", memory))
    return render_table(rows)


def readme_table(text: str) -> str:
    """The table between the markers in README's text."""
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = parser.parse_args(argv)
    text = table()
    if args.write:
        readme = README.read_text()
        README.write_text(readme.replace(readme_table(readme), text, 1))
    print(text)


if __name__ == "__main__":
    main()
