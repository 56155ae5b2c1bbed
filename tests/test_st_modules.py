"""Sentence-transformers students and model cards: a distilled student of a sentence-transformers teacher
loads in the real `sentence_transformers` library with the teacher's pipeline (pooling, normalisation)
at the student's width, and its embeddings equal shd's own pooled, normalised ones."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml

from shdcli.attention.losses import mean_pool
from shdcli.models.st_modules import sentence_transformers_files
from tests.conftest import run_cli
from tests.test_cli_e2e import write_recipe

SENTENCES = ["A small test sentence.", "Squeezing heads keeps the attention maps.", "another, shorter one"]


def _st_teacher(bert_folder, target):
    """The tiny BERT as a sentence-transformers model: mean pooling, a Dense head, then Normalize."""
    shutil.copytree(bert_folder, target)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (target / "modules.json").write_text(json.dumps(modules))
    (target / "1_Pooling").mkdir()
    (target / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 48, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
         "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    (target / "2_Dense").mkdir()
    (target / "2_Dense" / "config.json").write_text(json.dumps({"in_features": 48, "out_features": 16}))
    (target / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    return target


def test_files_adapt_width_and_drop_weighted_modules(tiny_models, tmp_path):
    from transformers import BertConfig

    teacher = _st_teacher(tiny_models["bert"], tmp_path / "teacher")
    files, notes = sentence_transformers_files(teacher, BertConfig(hidden_size=36, max_position_embeddings=256))
    assert [m["type"].rsplit(".", 1)[-1] for m in json.loads(files["modules.json"])] == [
        "Transformer", "Pooling", "Normalize"]
    assert [m["idx"] for m in json.loads(files["modules.json"])] == [0, 1, 2]
    assert json.loads(files["1_Pooling/config.json"])["word_embedding_dimension"] == 36
    assert json.loads(files["sentence_bert_config.json"])["max_seq_length"] == 256  # the student's positions
    assert "2_Dense/config.json" not in files and "2_Dense" in notes[0]
    assert sentence_transformers_files(tiny_models["bert"], BertConfig()) == ({}, [])  # not an ST model


def test_distilled_student_is_a_sentence_transformers_model(tiny_models, tiny_text, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from transformers import AutoModel, AutoTokenizer

    teacher = _st_teacher(tiny_models["bert"], tmp_path / "teacher")
    recipe, out = write_recipe(tmp_path, teacher, tiny_text,
                               student={"from_teacher": {"layers": 2, "heads": 3, "hidden_size": 36}},
                               train={"max_steps": 2, "threads": 1})
    run = run_cli("distill", str(recipe))
    assert run.returncode == 0, run.stderr[-2000:]
    student = out / "student"
    assert json.loads((student / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 36

    model = st.SentenceTransformer(str(student), device="cpu")
    got = model.encode(SENTENCES, convert_to_tensor=True)  # [3, 36]
    hf = AutoModel.from_pretrained(student).eval()
    tokenizer = AutoTokenizer.from_pretrained(student)
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = F.normalize(mean_pool(hf(**batch).last_hidden_state, batch["attention_mask"]), dim=-1)
    assert got.shape == (3, 36)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # The model card: the teacher as base model, the pruned shape and the run's measured numbers.
    card = (student / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == str(teacher) and front["library_name"] == "sentence-transformers"
    final = json.loads((out / "metrics.json").read_text())["final_eval"]
    assert f"| params | {final['params']} | {final['teacher_params']} |" in card
    assert "| hidden size | 48 | 36 |" in card and "| attention heads | 6 | 3 |" in card
