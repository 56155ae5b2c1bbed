"""The scale-out recipes in recipes/scale/ (not run in CI) validate, and their head plans are the paper's."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import memory_table
from shdcli.models.families import model_shape
from shdcli.models.mapping import make_plan
from shdcli.recipe import load_recipe

SCALE = Path(__file__).resolve().parents[1] / "recipes" / "scale"


def _configs():
    """The scale recipes' model configs, as benchmarks/memory_table.py (README's memory table) builds them."""
    return memory_table.configs()


@pytest.mark.parametrize("path", sorted(SCALE.glob("*.yaml")), ids=lambda p: p.name)
def test_scale_recipe_validates_and_plans(path):
    recipe = load_recipe(path)
    assert recipe.train.device == "cuda" and recipe.train.dtype == "bfloat16"
    configs = _configs()
    teacher = model_shape(configs[Path(recipe.teacher.path).name])
    student = model_shape(configs[Path(recipe.student.path).name])
    plan = make_plan(teacher, student, recipe.distill.layers, recipe.distill.grouping)
    assert len(plan.pairs) == student.layers
    for groups in plan.groups:  # every teacher head used once, one group per student head
        assert len(groups) == student.heads
        assert sorted(h for g in groups for h in g) == list(range(teacher.heads))
    if teacher.heads == 40:  # 40 -> 32: 8 adjacent pairs and 24 single heads
        assert sorted(len(g) for g in plan.groups[0]) == [1] * 24 + [2] * 8
    if "13b" in recipe.teacher.path and recipe.student.lora is None:
        assert recipe.train.strategy == "fsdp"  # a 7B student's fp32 Adam state does not fit one GPU


def test_all_scale_recipes_present():
    names = {p.name for p in SCALE.glob("*.yaml")}
    assert {"gpt2xl_to_gpt2.yaml", "gpt2xl_to_gpt2_medium.yaml", "gpt2xl_to_gpt2_large.yaml",
            "llama2_13b_to_7b.yaml", "llama2_13b_to_7b_lora.yaml"} <= names
