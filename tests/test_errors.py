"""Every bad recipe, path, model or data file gives one clear line (field or file + fix), exit code 2,
no traceback; and no YAML text or --set string can crash the recipe loader with anything else.

Most cases run the real entry point (`shdcli.cli.main`) in-process, which is fast; a few also run
`python -m shdcli` as a subprocess to show what a user's shell sees.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from shdcli.errors import ShdError
from shdcli.recipe import Recipe, load_recipe
from tests.conftest import run_cli
from tests.tiny import make_tokenizer


# --------------------------------------------------------------------------- helpers
def shd(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI entry point in-process: (exit code, stdout, stderr)."""
    from shdcli import cli

    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["shd", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)  # recipes here say threads=1; do not leak it into other tests
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, fragments: tuple[str, ...]) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def gpt2_folder(folder: Path, tokenizer=None, **config) -> Path:
    """A tiny GPT-2 model folder (same tokenizer as the fixtures unless given), config overridable."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tokenizer or make_tokenizer()
    settings_ = {"vocab_size": len(tokenizer), "n_embd": 48, "n_layer": 2, "n_head": 3, "n_positions": 256,
                 "bos_token_id": 2, "eos_token_id": 3, **config}
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**settings_)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass
class Ctx:
    tmp: Path
    models: dict[str, Path]
    text: Path

    def recipe(self, **sections) -> dict:
        data = {
            "teacher": str(self.models["gpt2"]),
            "student": {"from_teacher": {"layers": 2, "heads": 3}},
            "data": {"path": str(self.text), "seq_len": 32, "batch_size": 4, "val_batches": 1},
            "train": {"max_steps": 1, "eval_every": 1, "device": "cpu", "threads": 1},
            "output_dir": str(self.tmp / "out"),
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return data

    def write(self, data: dict | str, name: str = "recipe.yaml") -> str:
        path = self.tmp / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return str(path)

    def teacher_copy(self, name: str, kind: str = "gpt2") -> Path:
        folder = self.tmp / name
        shutil.copytree(self.models[kind], folder)
        return folder

    def file(self, name: str, content: bytes | str) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)


def _edit_weights(folder: Path, edit: Callable[[dict], dict]) -> None:
    tensors = load_file(folder / "model.safetensors")
    save_file(edit(tensors), str(folder / "model.safetensors"), metadata={"format": "pt"})


# Each case: ctx -> (CLI args, fragments the one error line must contain).
CASES: dict[str, Callable[[Ctx], tuple[list[str], tuple[str, ...]]]] = {
    # ---- the recipe file itself
    "recipe missing": lambda c: (["distill", str(c.tmp / "nope.yaml")], ("nope.yaml does not exist", "recipes/")),
    "recipe is a folder": lambda c: (["distill", str(c.tmp)], ("is a folder", "recipe YAML file")),
    "recipe not UTF-8": lambda c: (["distill", c.file("r.yaml", b"teacher: \xff\xfe\n")], ("not UTF-8",)),
    "recipe UTF-16": lambda c: (["distill", c.file("r.yaml", yaml.safe_dump(c.recipe()).encode("utf-16"))],
                                ("is UTF-16 text", "save it as UTF-8")),
    "teacher empty": lambda c: (["distill", c.write(c.recipe(teacher=None))],
                                ("teacher is empty", "give the teacher's HF folder")),
    "student empty": lambda c: (["distill", c.write(c.recipe(student=None))], ("student is empty", "from_teacher")),
    "bad --set value names the --set": lambda c: (
        ["distill", c.write(c.recipe()), "--set", "train.max_steps=many"],
        ("error: --set 'train.max_steps=many': train.max_steps", "valid integer")),
    "empty --set value": lambda c: (["distill", c.write(c.recipe()), "--set", "train.lr="],
                                    ("--set 'train.lr='", "valid number")),
    "--set to null": lambda c: (["distill", c.write(c.recipe()), "--set", "train.lr=~"],
                                ("--set 'train.lr=~': train.lr is empty", "leave out this --set")),
    "resume with nothing to resume": lambda c: (["distill", c.write(c.recipe()), "--resume"],
                                                (f"--resume: output_dir {c.tmp / 'out'} holds no run to resume",
                                                 "check output_dir")),
    "invalid YAML": lambda c: (["distill", c.write("teacher: [a\nstudent: b\n")], ("invalid YAML at line", "fix")),
    "bad YAML date": lambda c: (["distill", c.write(yaml.safe_dump(c.recipe()) + "when: 2001-13-01\n")],
                                ("invalid YAML value", "month must be in 1..12", "quote it")),
    "top level is a list": lambda c: (["distill", c.write("- teacher\n- student\n")], ("top level must be a mapping",)),
    "unknown top key": lambda c: (["distill", c.write({**c.recipe(), "trian": {}})],
                                  ("unknown key 'trian'", "did you mean 'train'?")),
    "unknown nested key": lambda c: (["distill", c.write(c.recipe(train={"max_step": 3}))],
                                     ("unknown key 'train.max_step'", "did you mean 'max_steps'?")),
    "unknown --set key": lambda c: (["distill", c.write(c.recipe()), "--set", "data.seqlen=16"],
                                    ("unknown key 'data.seqlen'", "did you mean 'seq_len'?")),
    "wrong type int": lambda c: (["distill", c.write(c.recipe(train={"max_steps": "many"}))],
                                 ("train.max_steps", "valid integer", "'many'")),
    "wrong type float list": lambda c: (["distill", c.write(c.recipe(train={"lr": [1]}))],
                                        ("train.lr", "valid number")),
    "out of range": lambda c: (["distill", c.write(c.recipe(data={"seq_len": 1}))],
                               ("data.seq_len", "greater than or equal to 2")),
    "bad choice": lambda c: (["distill", c.write(c.recipe(distill={"alpha": "median"}))],
                             ("distill.alpha", "'lsq', 'mean' or 'select'")),
    "infinite lr": lambda c: (["distill", c.write(c.recipe()), "--set", "train.lr=.inf"],
                              ("train.lr", "finite number")),
    "missing section": lambda c: (["distill", c.write({k: v for k, v in c.recipe().items() if k != "data"})],
                                  ("data is required",)),
    "two student sources": lambda c: (["distill", c.write(c.recipe(student={"path": "x"}))],
                                      ("student", "exactly one of student.path or student.from_teacher")),
    "--set without =": lambda c: (["distill", c.write(c.recipe()), "--set", "train.lr"],
                                  ("--set 'train.lr'", "section.key=value")),
    "--set into a value": lambda c: (["distill", c.write(c.recipe()), "--set", "output_dir.x=1"],
                                     ("output_dir is not a section",)),
    "NUL in a path": lambda c: (["distill", c.write(c.recipe()), "--set", "data.path=a\x00b"],
                                ("data.path", "without NUL")),
    "resume and overwrite": lambda c: (["distill", c.write(c.recipe()), "--resume", "--overwrite"],
                                       ("--resume and --overwrite",)),
    # ---- model paths and files
    "teacher missing": lambda c: (["distill", c.write(c.recipe(teacher=str(c.tmp / "gone")))],
                                  ("teacher.path", "gone does not exist", "HF folder")),
    "teacher is a file": lambda c: (["distill", c.write(c.recipe(teacher=c.file("w.bin", b"x")))],
                                    ("teacher.path", "is a file", "config.json")),
    "teacher without config.json": lambda c: (["distill", c.write(c.recipe(teacher=str(c.tmp)))],
                                              ("teacher.path", "has no config.json")),
    "pkg not installed": lambda c: (["distill", c.write(c.recipe(teacher="pkg://no_such_pkg_xyz/model"))],
                                    ("teacher.path", "'no_such_pkg_xyz' is not installed", "pip install")),
    "config.json not JSON": lambda c: _teacher_edit(c, lambda f: (f / "config.json").write_text("{nope"),
                                                    ("config.json", "not a valid JSON", "fix or replace")),
    "config.json without model_type": lambda c: _teacher_edit(c, lambda f: (f / "config.json").write_text("{}"),
                                                              ("config.json", "model_type")),
    "truncated safetensors": lambda c: _teacher_edit(
        c, lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
        ("cannot load the weights", "SafetensorError", "damaged")),
    "weights of another shape": lambda c: _teacher_edit(
        c, lambda f: _edit_weights(f, lambda t: {k: v[..., :-1].contiguous() if k.endswith("c_fc.weight") else v
                                                 for k, v in t.items()}),
        ("tensor shapes differ from config.json",)),
    "weights missing tensors": lambda c: _teacher_edit(
        c, lambda f: _edit_weights(f, lambda t: {k: v for k, v in t.items() if ".h.1." not in k}),
        ("lack 12 of the model's tensors", "incomplete")),
    "no weights": lambda c: _teacher_edit(c, lambda f: (f / "model.safetensors").unlink(),
                                          ("has no weights (model.safetensors)",)),
    "pickled weights": lambda c: _teacher_edit(c, _to_pickle, ("only pickled weights", "--allow-pickle")),
    "no tokenizer": lambda c: _teacher_edit(c, lambda f: [p.unlink() for p in f.glob("tokenizer*")],
                                            ("has no tokenizer files", "tokenizer.json")),
    "corrupt tokenizer": lambda c: _teacher_edit(c, lambda f: (f / "tokenizer.json").write_text("{broken"),
                                                 ("cannot read the tokenizer", "fix or replace")),
    "remote code not trusted": lambda c: _teacher_edit(c, _remote_code, ("needs its own Python code",
                                                                          "teacher.trust_remote_code: true")),
    "corrupt gguf": lambda c: (["distill", c.write(c.recipe(teacher=c.file("m.gguf", b"GGUF" + b"\x00" * 64)))],
                               ("teacher.path", "cannot convert", "GGUF file is damaged")),
    # ---- teacher / student compatibility
    "student more heads (derived)": lambda c: (["distill", c.write(c.recipe(student={"from_teacher": {"heads": 8}}))],
                                               ("student.from_teacher.heads: 8", "at most 6")),
    "student more layers (derived)": lambda c: (
        ["distill", c.write(c.recipe(student={"from_teacher": {"layers": 5}}))],
        ("student.from_teacher.layers: 5", "at most 4")),
    "student more heads (folder)": lambda c: _student(c, dict(n_head=12), ("student.path", "12 attention heads",
                                                                            "at most 6")),
    "student more layers (folder)": lambda c: _student(c, dict(n_layer=6), ("student.path", "6 layers", "at most 4")),
    "student other tokenizer": lambda c: _student(c, dict(tokenizer=make_tokenizer(300)),
                                                  ("student.path", "tokenizer differs", "student.from_teacher")),
    "student other vocabulary, logit KD on": lambda c: _student(
        c, dict(vocab_size=len(make_tokenizer()) + 16), ("distill.logit", "vocabulary", "set distill.logit=0")),
    "student vocabulary too small": lambda c: _student(c, dict(tokenizer=False, vocab_size=100),
                                                       ("student.path", "vocab_size is at least")),
    "seq_len beyond teacher positions": lambda c: (["distill", c.write(c.recipe(data={"seq_len": 300}))],
                                                   ("data.seq_len: 300", "teacher's 256 positions")),
    "seq_len beyond student positions": lambda c: _student(c, dict(n_positions=16),
                                                           ("data.seq_len: 32", "student's 16 positions")),
    "kv_heads not dividing": lambda c: (
        ["distill", c.write(c.recipe(teacher=str(c.models["llama"]),
                                     student={"from_teacher": {"heads": 3, "kv_heads": 2}}))],
        ("student.from_teacher.kv_heads: 2", "divide")),
    "layer pair out of range": lambda c: (["distill", c.write(c.recipe(distill={"layers": [[0, 9]]}))],
                                          ("distill.layers", "out of range")),
    "cuda without GPU": lambda c: (["distill", c.write(c.recipe(train={"device": "cuda"}))],
                                   ("train.device", "set train.device=auto or cpu")),
    # ---- data files
    "data missing": lambda c: (["distill", c.write(c.recipe(data={"path": str(c.tmp / "none.txt")}))],
                               ("data.path", "none.txt does not exist")),
    "data is a folder": lambda c: (["distill", c.write(c.recipe(data={"path": str(c.tmp)}))],
                                   ("data.path", "folder", "give a .txt/.jsonl/.parquet file")),
    "data binary": lambda c: (["distill", c.write(c.recipe(data={"path": c.file("d.txt", bytes(range(256)) * 8)}))],
                              ("data.path", "is not a text file")),
    "data UTF-16": lambda c: (["distill", c.write(c.recipe(data={"path": c.file("d.txt", ("word " * 80 + "\n")
                                                                               .encode("utf-16"))}))],
                              ("data.path", "is UTF-16 text", "convert it to UTF-8")),
    "data UTF-16 without BOM": lambda c: (["distill", c.write(c.recipe(data={"path": c.file(
        "d.txt", ("word " * 80 + "\n").encode("utf-16-le"))}))], ("data.path", "is UTF-16 text")),
    "data not UTF-8": lambda c: (
        ["distill", c.write(c.recipe(data={"path": c.file("d.txt", ("caf\xe9 au lait\n" * 50).encode("latin-1"))}))],
        ("data.path", "not UTF-8 text", "convert it to UTF-8")),
    "data empty": lambda c: (["distill", c.write(c.recipe(data={"path": c.file("d.txt", b"")}))],
                             ("data.path", "holds no text")),
    "data whitespace only": lambda c: (["distill", c.write(c.recipe(data={"path": c.file("d.txt", "  \n\n \t\n")}))],
                                       ("data.path", "holds no text")),
    "data one document": lambda c: (["distill", c.write(c.recipe(data={"path": c.file("d.txt", "one line\n")}))],
                                    ("need at least 2 documents",)),
    "data too short": lambda c: (["distill", c.write(c.recipe(data={"path": c.file("d.txt", "a b\n\nc d\n")}))],
                                 ("fewer than one block of data.seq_len=32", "lower data.seq_len")),
    "jsonl bad line": lambda c: (
        ["distill", c.write(c.recipe(data={"path": c.file("d.jsonl", '{"text": "a"}\n{bad\n')}))],
        ("d.jsonl line 2 is not valid JSON",)),
    "jsonl no text field": lambda c: (
        ["distill", c.write(c.recipe(data={"path": c.file("d.jsonl", '{"body": "a"}\n')}))],
        ("d.jsonl line 1 has no string field 'text'", "data.text_field")),
    "unknown builtin": lambda c: (["distill", c.write(c.recipe(data={"path": "builtin:wiki"}))],
                                  ("data.path", "unknown builtin", "builtin:pydoc")),
    # ---- output folder
    "output_dir is a file": lambda c: (["distill", c.write(c.recipe(output_dir=c.file("o.txt", "x")))],
                                       ("output_dir", "is a file")),
    "output_dir foreign": lambda c: (c.file("full/notes.txt", "") and
                                     ["distill", c.write(c.recipe(output_dir=str(c.tmp / "full")))],
                                     ("not empty and was not written by shd", "--overwrite")),
}


def _teacher_edit(c: Ctx, edit, fragments) -> tuple[list[str], tuple[str, ...]]:
    folder = c.teacher_copy("teacher")
    edit(folder)
    return ["distill", c.write(c.recipe(teacher=str(folder)))], ("teacher.path", *fragments)


def _to_pickle(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")


def _remote_code(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "shd_custom"
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text(
        "from transformers import PretrainedConfig\n\n\nclass CustomConfig(PretrainedConfig):\n"
        "    model_type = 'shd_custom'\n"
    )


def _student(c: Ctx, config: dict, fragments) -> tuple[list[str], tuple[str, ...]]:
    tokenizer = config.pop("tokenizer", None)
    folder = gpt2_folder(c.tmp / "student", tokenizer=tokenizer or None, **config)
    if tokenizer is False:
        for p in folder.glob("tokenizer*"):
            p.unlink()
    return ["distill", c.write(c.recipe(student=str(folder)))], fragments


@pytest.fixture(autouse=True)
def _fixed_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_line(case, tiny_models, tiny_text, tmp_path, capsys):
    args, fragments = CASES[case](Ctx(tmp_path, tiny_models, tiny_text))
    code, _, err = shd(capsys, *args)
    line = assert_one_line_error(code, err, fragments)
    print(f"\n[{case}] {line}")  # the exact line the user sees (pytest -s)


# --------------------------------------------------------------------------- the fixes work
def test_allow_pickle_loads_pickled_teacher(tiny_models, tiny_text, tmp_path, capsys):
    c = Ctx(tmp_path, tiny_models, tiny_text)
    args, _ = _teacher_edit(c, _to_pickle, ())
    code, out, err = shd(capsys, *args, "--allow-pickle")
    assert code == 0, err
    assert (tmp_path / "out" / "student" / "model.safetensors").exists()


def test_logit_off_accepts_student_with_other_vocabulary(tiny_models, tiny_text, tmp_path, capsys):
    c = Ctx(tmp_path, tiny_models, tiny_text)
    args, _ = _student(c, dict(vocab_size=len(make_tokenizer()) + 16), ())
    code, out, err = shd(capsys, *args, "--set", "distill.logit=0")
    assert code == 0, err


def test_output_dir_ownership(tiny_models, tiny_text, tmp_path, capsys):
    c = Ctx(tmp_path, tiny_models, tiny_text)
    recipe = c.write(c.recipe())
    assert shd(capsys, "distill", recipe)[0] == 0
    out = tmp_path / "out"
    assert json.loads((out / "run.json").read_text())["fingerprint"] == load_recipe(recipe).fingerprint()
    # Same recipe again: say --resume or --overwrite.
    line = assert_one_line_error(*shd(capsys, "distill", recipe)[::2], (
        f"output_dir: {out} already holds a run of this recipe (its newest checkpoint is step-00000001); "
        "pass --resume to continue it or --overwrite to start over",))
    print(f"\n[same recipe again] {line}")
    # A different recipe: refused, with what changed.
    line = assert_one_line_error(*shd(capsys, "distill", recipe, "--set", "train.lr=0.001")[::2], (
        f"output_dir: {out} holds a run of a different recipe (changed: train.lr 0.0005 -> 0.001); "
        "choose another output_dir or pass --overwrite to replace that run",))
    print(f"\n[different recipe] {line}")
    # Length, saving and devices are not part of the recipe's identity: --resume may extend a run.
    code, stdout, err = shd(capsys, "distill", recipe, "--resume", "--set", "train.max_steps=2",
                            "--set", "train.save_every=7", "--set", "train.keep_checkpoints=1")
    assert code == 0, err
    assert "resumed from" in stdout
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    # Shrinking below the newest checkpoint is refused.
    line = assert_one_line_error(*shd(capsys, "distill", recipe, "--resume")[::2],
                                 ("train.max_steps: 1 is below the newest checkpoint's step 2",))
    print(f"\n[max_steps below checkpoint] {line}")
    # --overwrite replaces shd's files and leaves others alone.
    (out / "notes.txt").write_text("mine")
    code, _, err = shd(capsys, "distill", recipe, "--overwrite", "--set", "train.lr=0.001")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]
    assert json.loads((out / "run.json").read_text())["recipe"]["train"]["lr"] == 0.001
    # No temporary files are left anywhere in the output folder.
    assert not [p for p in out.rglob(".*")]


def test_messages_put_an_before_a_vowel(tiny_models, capsys):
    code, _, err = shd(capsys, "eval", str(tiny_models["bert"]), "--teacher", str(tiny_models["gpt2"]), "--no-speed")
    assert code == 2, err
    assert err.splitlines()[-1].endswith("an encoder model cannot be compared with a causal-lm model"), err


def test_debug_shows_traceback(tmp_path, capsys):
    from shdcli import cli

    argv = sys.argv
    sys.argv = ["shd", "--debug", "distill", str(tmp_path / "missing.yaml")]
    try:
        with pytest.raises(ShdError, match="does not exist"):
            cli.main()
    finally:
        sys.argv = argv


def test_subprocess_bad_inputs_exit_2_one_line(tiny_models, tiny_text, tmp_path):
    """What a shell sees: exit status 2, one line on stderr, no traceback (recipe, model and data errors)."""
    c = Ctx(tmp_path, tiny_models, tiny_text)
    for case in ("unknown nested key", "pickled weights"):
        args, fragments = CASES[case](c)
        result = run_cli(*args, cwd=tmp_path)
        line = assert_one_line_error(result.returncode, result.stderr, fragments)
        assert result.stdout.strip() == "" or "error" not in result.stdout
        print(f"\n[subprocess {case}] {line}")
    result = run_cli("--debug", "distill", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" in result.stderr and "ShdError" in result.stderr


# --------------------------------------------------------------------------- fuzzing the loader
YAML_BITS = st.sampled_from([
    "teacher", "student", "data", "distill", "train", "output_dir", "path", "from_teacher", "layers", "heads",
    "seq_len", "lr", "max_steps", ": ", "\n", "  ", "- ", "[", "]", "{", "}", ",", "'", '"', "!!binary ", "!!float ",
    "!!int ", "!!timestamp ", "!!set ", "!!python/object:os.system ", "&a ", "*a", "? ", "2001-13-01", "1e999",
    ".nan", ".inf", "-", "0x", "~", "null", "yes", "\t", "#", "%YAML 1.1\n", "---\n", "...\n", "\x00", "\ud800",
    "é", "=", ".",
])
KEYS = st.sampled_from(["teacher", "student", "data", "distill", "train", "output_dir", "path", "from_teacher",
                        "layers", "heads", "kv_heads", "seq_len", "lr", "max_steps", "alpha", "allow_pickle", "x", ""])
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)


def _load(tmp_path: Path, text: str, sets: list[str]) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        recipe = load_recipe(path, sets)
    except ShdError as exc:
        assert str(exc).strip()
        return
    assert isinstance(recipe, Recipe)
    recipe.fingerprint()  # a recipe that loads must also hash (json of its resolved form)


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(text=st.text(max_size=200) | st.lists(YAML_BITS, max_size=30).map("".join))
def test_fuzz_yaml_text_only_clean_errors(tmp_path, text):
    _load(tmp_path, text, [])


@FUZZ
@given(data=st.dictionaries(KEYS, VALUES, max_size=6))
def test_fuzz_structured_recipes_only_clean_errors(tmp_path, data):
    base = {"teacher": "t", "student": {"from_teacher": {}}, "data": {"path": "d"}}
    _load(tmp_path, yaml.safe_dump({**base, **data}, allow_unicode=True), [])


SET_STRINGS = st.one_of(
    st.text(max_size=40),
    st.tuples(st.lists(KEYS, min_size=0, max_size=3).map(".".join), st.sampled_from(["=", "", "=="]),
              st.lists(YAML_BITS, max_size=6).map("".join)).map("".join),
)


@FUZZ
@given(sets=st.lists(SET_STRINGS, max_size=4))
def test_fuzz_set_strings_only_clean_errors(tmp_path, sets):
    _load(tmp_path, "teacher: t\nstudent: {from_teacher: {}}\ndata: {path: d}\n", sets)
