"""README's memory table is what shdcli.memory computes for recipes/scale/ (benchmarks/memory_table.py), and the
estimate follows the code's dtype and placement choices."""

from __future__ import annotations

import pytest

from benchmarks import memory_table
from shdcli.memory import estimate
from shdcli.recipe import load_recipe


def test_readme_memory_table_is_the_computed_one():
    readme = memory_table.README.read_text()
    assert memory_table.readme_table(readme) == memory_table.table(), \
        "README's memory table is stale: run python benchmarks/memory_table.py --write"


@pytest.mark.parametrize("world", [2, 8])
def test_fsdp_splits_the_student_states_and_keeps_other_ranks_host_to_the_teacher(world):
    configs = memory_table.configs()
    path = memory_table.ROOT / "recipes" / "scale" / "llama2_13b_to_7b.yaml"
    fsdp = estimate(load_recipe(path), configs["Llama-2-13b-hf"], configs["Llama-2-7b-hf"], world)
    ddp = estimate(load_recipe(path, ["train.strategy=ddp"]), configs["Llama-2-13b-hf"], configs["Llama-2-7b-hf"],
                   world)
    assert fsdp.student_states * world == ddp.student_states
    assert fsdp.teacher == ddp.teacher == pytest.approx(13.0e9 * 2, rel=0.01)  # bf16 on CUDA, whole per rank
    assert fsdp.host_other == fsdp.teacher and ddp.host_other == ddp.host_rank0 == fsdp.host_rank0
    float32 = estimate(load_recipe(path, ["train.teacher_dtype=float32"]), configs["Llama-2-13b-hf"],
                       configs["Llama-2-7b-hf"], world)
    assert float32.teacher == 2 * fsdp.teacher
