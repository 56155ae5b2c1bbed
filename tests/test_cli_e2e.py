"""`shd distill` end to end on the tiny fixture models, and its user errors.

Successful runs go through a real subprocess (`python -m shdcli distill`, via run_cli). Most bad
inputs run the same entry point, shdcli.cli.main, in-process with the process's stdout/stderr
captured at the file-descriptor level (a subprocess each would cost ~5 s of imports); one bad input
also runs as a subprocess so the whole path from `python -m` is checked once.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.conftest import run_cli, run_main

STEPS = 3


def write_recipe(tmp_path, teacher, text_path, name: str = "recipe.yaml", **sections) -> tuple:
    out = tmp_path / "run"
    recipe = {
        "teacher": str(teacher),
        "student": {"from_teacher": {"layers": 2, "heads": 3}},
        "data": {"path": str(text_path), "seq_len": 32, "batch_size": 4, "val_batches": 2, "max_documents": 40},
        "train": {"max_steps": STEPS, "eval_every": 2, "warmup_steps": 1, "device": "cpu", "lr": 1e-3},
        "distill": {"balance": "none"},  # SHD trains for encoders too (auto would turn it off there)
        "output_dir": str(out),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path, out


def check_outputs(out, kind: str, steps: int) -> dict:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("history", "validation", "plan", "alphas", "timings", "recipe", "final_eval"):
        assert key in metrics, key
    assert [h["step"] for h in metrics["history"]] == list(range(1, steps + 1))
    for record in metrics["history"]:
        assert all(v is None or (isinstance(v, float | int) and v == v) for v in record.values()), record
        assert {"task", "shd", "total", "lr"} <= set(record)
    assert metrics["validation"][0]["step"] == 0 and metrics["validation"][-1]["step"] == steps
    # The SHD map follows the layers the student kept (importance pruning), groups as the student was built.
    kept = metrics["derivation"]["layers"]
    assert len(kept) == 2 and metrics["plan"]["layers"] == [[0, kept[0]], [1, kept[1]]]
    assert metrics["plan"]["groups"] == metrics["derivation"]["groups"]
    if kind != "llama":  # MHA: 6 -> 3 heads in contiguous pairs
        assert metrics["plan"]["groups"] == [[[0, 1], [2, 3], [4, 5]]] * 2
    else:  # 6 heads in 2 KV heads -> 3 heads, 1 KV head: the most important KV head's 3 heads, one each
        assert all(len(g) == 1 for layer in metrics["plan"]["groups"] for g in layer)
    assert set(metrics["alphas"]) == {"0", "1"}
    for layer, groups in metrics["alphas"].items():
        for j, group in enumerate(groups):
            size = len(metrics["plan"]["groups"][int(layer)][j])
            assert len(group["mean"]) == size and abs(sum(group["mean"]) - 1.0) < 1e-4
    assert metrics["timings"]["total_s"] > 0 and metrics["timings"]["tokens_per_s"] > 0
    report = (out / "report.md").read_text()
    assert report.strip()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no temporary files left"

    student_dir = out / "student"
    card = (student_dir / "README.md").read_text()  # the model card, with the run's final numbers
    assert card.startswith("---\nbase_model: ") and f"| {metrics['final_eval']['params']} |" in card
    cls = AutoModel if kind == "bert" else AutoModelForCausalLM
    model = cls.from_pretrained(student_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    assert model.config.num_attention_heads == 3 and model.config.num_hidden_layers == 2
    ids = tokenizer(["a small test sentence", "another"], return_tensors="pt", padding=True)
    with torch.no_grad():
        result = model(**ids)
    first = result.logits if kind != "bert" else result.last_hidden_state
    assert torch.isfinite(first).all()
    return metrics


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_distill_end_to_end(tmp_path, tiny_models, tiny_text, kind):
    extra = {"train": {"threads": 1}}  # the subprocess only: set_num_threads would leak into pytest in-process
    overrides: list[str] = []
    if kind == "gpt2":
        # The recipe says 50 steps and lsq; --set must win.
        extra = {"train": {"max_steps": 50, "threads": 1}}
        overrides = ["--set", f"train.max_steps={STEPS}", "--set", "distill.alpha=mean"]
    recipe, out = write_recipe(tmp_path, tiny_models[kind], tiny_text, **extra)
    proc = run_cli("distill", str(recipe), *overrides, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "SHD plan" in proc.stdout and "student written to" in proc.stdout
    metrics = check_outputs(out, kind, STEPS)
    if kind == "gpt2":
        assert metrics["recipe"]["train"]["max_steps"] == STEPS
        assert metrics["recipe"]["distill"]["alpha"] == "mean"
        for groups in metrics["alphas"].values():
            assert all(g["mean"] == [0.5, 0.5] for g in groups)
    if kind == "bert":
        assert "logit" not in metrics["history"][0]  # an encoder has no logits to distil
    else:
        assert "logit" in metrics["history"][0] and "val_perplexity" in metrics["validation"][-1]


def test_bad_key_subprocess(tmp_path, tiny_models, tiny_text):
    recipe, out = write_recipe(tmp_path, tiny_models["llama"], tiny_text)
    proc = run_cli("distill", str(recipe), "--set", "train.max_step=3", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "train.max_step" in lines[0] and "'max_steps'" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()


# =========================================================================== user errors, in-process
def assert_user_error(code, out, err, *words):
    assert code == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_error_bad_key(tmp_path, tiny_models, tiny_text, monkeypatch, capfd):
    recipe, _ = write_recipe(tmp_path, tiny_models["bert"], tiny_text, distill={"alpah": "mean"})
    assert_user_error(*run_main(monkeypatch, capfd, "distill", str(recipe)), "distill.alpah", "'alpha'")


def test_error_bad_value_override(tmp_path, tiny_models, tiny_text, monkeypatch, capfd):
    recipe, _ = write_recipe(tmp_path, tiny_models["bert"], tiny_text)
    assert_user_error(*run_main(monkeypatch, capfd, "distill", str(recipe), "--set", "train.lr=-1"), "train.lr")


def test_error_missing_recipe(tmp_path, monkeypatch, capfd):
    assert_user_error(*run_main(monkeypatch, capfd, "distill", str(tmp_path / "nope.yaml")), "does not exist")


def test_error_missing_teacher(tmp_path, tiny_text, monkeypatch, capfd):
    recipe, out = write_recipe(tmp_path, tmp_path / "no_such_teacher", tiny_text)
    assert_user_error(*run_main(monkeypatch, capfd, "distill", str(recipe)), "teacher.path", "does not exist")
    assert not out.exists()


def test_error_teacher_folder_without_config(tmp_path, tiny_text, monkeypatch, capfd):
    (tmp_path / "empty_model").mkdir()
    recipe, _ = write_recipe(tmp_path, tmp_path / "empty_model", tiny_text)
    assert_user_error(*run_main(monkeypatch, capfd, "distill", str(recipe)), "teacher.path", "config.json")


def test_error_missing_data(tmp_path, tiny_models, monkeypatch, capfd):
    recipe, _ = write_recipe(tmp_path, tiny_models["gpt2"], tmp_path / "missing.txt")
    assert_user_error(*run_main(monkeypatch, capfd, "distill", str(recipe)), "data.path", "does not exist")


def test_error_binary_data(tmp_path, tiny_models, monkeypatch, capfd):
    data = tmp_path / "data.txt"
    data.write_bytes(bytes(range(256)) * 8)
    recipe, _ = write_recipe(tmp_path, tiny_models["gpt2"], data)
    assert_user_error(*run_main(monkeypatch, capfd, "distill", str(recipe)), "data.path", "binary")


def test_error_non_utf8_data(tmp_path, tiny_models, monkeypatch, capfd):
    data = tmp_path / "data.txt"
    data.write_bytes("café au lait\n".encode("latin-1") * 20)
    recipe, _ = write_recipe(tmp_path, tiny_models["gpt2"], data)
    assert_user_error(*run_main(monkeypatch, capfd, "distill", str(recipe)), "data.path", "UTF-8")


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_error_empty_data(tmp_path, tiny_models, monkeypatch, capfd, content):
    data = tmp_path / "data.txt"
    data.write_text(content)
    recipe, _ = write_recipe(tmp_path, tiny_models["llama"], data)
    assert_user_error(*run_main(monkeypatch, capfd, "distill", str(recipe)), "data.path", "no text")


def test_error_jsonl_without_field(tmp_path, tiny_models, monkeypatch, capfd):
    data = tmp_path / "data.jsonl"
    data.write_text('{"body": "hello there"}\n' * 5)
    recipe, _ = write_recipe(tmp_path, tiny_models["llama"], data)
    assert_user_error(*run_main(monkeypatch, capfd, "distill", str(recipe)), "data.path", "'text'", "line 1")


def test_error_too_little_text(tmp_path, tiny_models, monkeypatch, capfd):
    data = tmp_path / "data.txt"
    data.write_text("one.\n\ntwo.\n")
    recipe, _ = write_recipe(tmp_path, tiny_models["llama"], data)
    assert_user_error(*run_main(monkeypatch, capfd, "distill", str(recipe)), "data")


def test_error_seq_len_above_max_positions(tmp_path, tiny_models, tiny_text, monkeypatch, capfd):
    recipe, _ = write_recipe(tmp_path, tiny_models["bert"], tiny_text, data={"seq_len": 300})
    assert_user_error(*run_main(monkeypatch, capfd, "distill", str(recipe)), "data.seq_len", "300", "256")


def test_error_student_more_heads(tmp_path, tiny_models, tiny_text, monkeypatch, capfd):
    recipe, _ = write_recipe(tmp_path, tiny_models["llama"], tiny_text, student={"from_teacher": {"heads": 8}})
    assert_user_error(*run_main(monkeypatch, capfd, "distill", str(recipe)), "heads", "8", "6")


def test_error_student_more_layers(tmp_path, tiny_models, tiny_text, monkeypatch, capfd):
    recipe, _ = write_recipe(tmp_path, tiny_models["gpt2"], tiny_text, student={"from_teacher": {"layers": 9}})
    assert_user_error(*run_main(monkeypatch, capfd, "distill", str(recipe)), "layers", "9", "4")


def test_error_kv_heads_not_dividing(tmp_path, tiny_models, tiny_text, monkeypatch, capfd):
    recipe, _ = write_recipe(tmp_path, tiny_models["llama"], tiny_text,
                             student={"from_teacher": {"heads": 3, "kv_heads": 2}})
    assert_user_error(*run_main(monkeypatch, capfd, "distill", str(recipe)), "kv_heads")


def test_error_explicit_layers_out_of_range(tmp_path, tiny_models, tiny_text, monkeypatch, capfd):
    recipe, _ = write_recipe(tmp_path, tiny_models["bert"], tiny_text, distill={"layers": [[0, 7]]})
    assert_user_error(*run_main(monkeypatch, capfd, "distill", str(recipe)), "distill.layers", "out of range")


def test_error_cuda_without_gpu(tmp_path, tiny_models, tiny_text, monkeypatch, capfd):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    recipe, _ = write_recipe(tmp_path, tiny_models["bert"], tiny_text, train={"device": "cuda"})
    assert_user_error(*run_main(monkeypatch, capfd, "distill", str(recipe)), "train.device")
