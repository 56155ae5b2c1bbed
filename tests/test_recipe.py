"""Recipe loading and validation (shdcli/recipe.py): defaults, --set overrides, one-line errors.

Every invalid input must end as a ShdError whose message names the field (dotted path) or the
file at fault; nothing else may escape (the fuzz tests at the bottom check that).
"""

from __future__ import annotations

import copy
import functools
import math
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shdcli.errors import ShdError
from shdcli.recipe import (
    DataSpec,
    DistillSpec,
    FromTeacher,
    Recipe,
    Section,
    StudentSpec,
    TeacherSpec,
    TrainSpec,
    apply_overrides,
    load_recipe,
    parse_override,
    validate_recipe,
)

MINIMAL = {
    "teacher": "some/teacher",
    "student": {"from_teacher": {"heads": 2}},
    "data": {"path": "train.txt"},
}


def minimal(**changes) -> dict:
    data = copy.deepcopy(MINIMAL)
    data.update(changes)
    return data


def write_recipe(tmp_path, data, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def error_of(data) -> str:
    with pytest.raises(ShdError) as info:
        validate_recipe(data)
    message = str(info.value)
    assert "\n" not in message, "errors are printed as one line"
    return message


# =========================================================================== valid recipes
def test_minimal_recipe_gets_every_default(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, MINIMAL))
    assert recipe.teacher.path == "some/teacher"  # string shorthand
    assert recipe.teacher.trust_remote_code is False and recipe.teacher.allow_pickle is False
    assert recipe.student.path is None
    assert recipe.student.from_teacher == FromTeacher(heads=2)
    assert recipe.student.from_teacher.layers is None and recipe.student.from_teacher.init == "teacher"
    # Sections left out are the defaults, field by field.
    assert recipe.distill == DistillSpec()
    assert recipe.train == TrainSpec()
    assert recipe.data == DataSpec(path="train.txt")
    assert recipe.distill.layers == "auto" and recipe.distill.alpha == "lsq" and recipe.distill.attn_loss == "kl"
    assert recipe.train.max_steps == 100 and recipe.train.lr == pytest.approx(5e-4)
    assert recipe.data.seq_len == 128 and recipe.data.val_fraction == pytest.approx(0.1)
    assert recipe.output_dir == "runs/shd"


def test_shipped_recipe_loads():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "recipes"
    files = sorted(root.glob("*.yaml"))
    assert files, "recipes/ has no recipe"
    for path in files:
        recipe = load_recipe(path)
        assert isinstance(recipe, Recipe)


def test_student_path_shorthand_and_explicit_layers():
    recipe = validate_recipe(minimal(student="other/student", distill={"layers": [[0, 1], [1, 3]]}))
    assert recipe.student.path == "other/student" and recipe.student.from_teacher is None
    assert recipe.distill.layers == [(0, 1), (1, 3)]


def test_paths_relative_to_recipe_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "train.txt").write_text("hello\n")
    recipe = load_recipe(write_recipe(sub, minimal(data={"path": "train.txt"})))
    assert recipe.data.path == str(sub / "train.txt")
    # A path that does not exist next to the recipe stays as written (resolved against the cwd later).
    assert recipe.teacher.path == "some/teacher"


def test_fingerprint_ignores_length_evaluation_and_output_only():
    a = validate_recipe(minimal())
    b = validate_recipe(minimal(train={"max_steps": 7, "eval_every": 3}, output_dir="elsewhere",
                                data={"path": "train.txt", "eval_tokens": 512}))
    c = validate_recipe(minimal(train={"lr": 1e-3}))
    d = validate_recipe(minimal(data={"path": "train.txt", "seq_len": 64}))
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint() and a.fingerprint() != d.fingerprint()


def _other_values(annotation, current) -> list:
    """Candidate values of a field other than `current`, from its type (Literal choices, numbers nearby)."""
    choices = [a for a in _flat_args(annotation) if not isinstance(a, type) and a is not None]
    if isinstance(current, bool):
        return [not current]
    if current is None or isinstance(current, (int, float)) and not isinstance(current, bool):
        base = current if current is not None else 0
        numbers = [base + 1, base + 2, 0.5, 0.25, 2] if int in _flat_args(annotation) else [0.5, 0.25, 2.0, base * 2]
        return [c for c in choices if c != current] + [n for n in numbers if n != current] + ["elsewhere"]
    if isinstance(current, list):
        return [["jsonl", "tensorboard"]]
    return [c for c in choices if c != current] + [f"{current}_elsewhere"]


def _flat_args(annotation) -> list:
    args = typing.get_args(annotation)
    if not args:
        return [annotation]
    return [leaf for a in args for leaf in (_flat_args(a) if typing.get_args(a) else [a])]


def test_the_fingerprint_follows_each_fields_resume_mark():
    """Every field of every section, changed alone: the fingerprint stays for a RESUME_FREE field (its value
    may change between a run and its --resume) and changes for any other (a new field is part of the run's
    identity unless marked)."""
    reference = validate_recipe(minimal())
    for path, model in [((), Recipe), (("teacher",), TeacherSpec), (("student",), StudentSpec),
                        (("student", "from_teacher"), FromTeacher), (("data",), DataSpec),
                        (("distill",), DistillSpec), (("train",), TrainSpec)]:
        owner = functools.reduce(getattr, path, reference)
        for name, field in model.model_fields.items():
            current = getattr(owner, name)
            if isinstance(current, Section) or name in ("teacher", "student", "data", "lora"):
                continue  # sections are walked themselves (lora: a student option that needs peft)
            for value in _other_values(field.annotation, current):
                changed = copy.deepcopy(reference.resolved())
                functools.reduce(dict.__getitem__, path, changed)[name] = value
                if path == ("student",) and name == "path":
                    changed["student"]["from_teacher"] = None
                try:
                    recipe = validate_recipe(changed)
                except ShdError:
                    continue
                free = (field.json_schema_extra or {}).get("resume") == "free"
                where = ".".join([*path, name])
                assert (recipe.fingerprint() == reference.fingerprint()) == free, f"{where}={value!r}"
                break
            else:
                raise AssertionError(f"no other valid value found for {'.'.join([*path, name])}")


# =========================================================================== --set overrides
@pytest.mark.parametrize(
    "text, keys, value",
    [
        ("train.max_steps=20", ["train", "max_steps"], 20),
        ("train.lr=1e-3", ["train", "lr"], "1e-3"),  # YAML 1.1 reads 1e-3 as a string; pydantic parses it
        ("train.lr=0.001", ["train", "lr"], 0.001),
        ("distill.alpha=mean", ["distill", "alpha"], "mean"),
        ("teacher.trust_remote_code=true", ["teacher", "trust_remote_code"], True),
        ("distill.layers=[[0, 1], [1, 3]]", ["distill", "layers"], [[0, 1], [1, 3]]),
        ("output_dir=", ["output_dir"], ""),
        ("output_dir=a=b", ["output_dir"], "a=b"),
        ("data.path=: not yaml [", ["data", "path"], ": not yaml ["),  # unparsable YAML stays a string
        (" train.seed =3", ["train", "seed"], 3),
    ],
)
def test_parse_override(text, keys, value):
    got_keys, got_value = parse_override(text)
    assert got_keys == keys
    assert got_value == value and type(got_value) is type(value)


@pytest.mark.parametrize("text", ["train.max_steps", "novalue", ""])
def test_parse_override_without_equals_is_an_error(text):
    with pytest.raises(ShdError, match="section.key=value"):
        parse_override(text)


@pytest.mark.parametrize("text", ["=3", ".=3", "..=3"])
def test_override_without_key_is_an_error(text):
    with pytest.raises(ShdError, match="missing key"):
        apply_overrides(minimal(), [text])


def test_overrides_typed_and_nested(tmp_path):
    path = write_recipe(tmp_path, MINIMAL)
    recipe = load_recipe(
        path,
        [
            "train.max_steps=20",
            "train.lr=1e-3",
            "distill.alpha=mean",
            "distill.layers=last",
            "student.from_teacher.layers=3",
            "student.from_teacher.init=random",
            "data.seq_len=64",
            "teacher.trust_remote_code=true",
            "output_dir=out/x",
        ],
    )
    assert recipe.train.max_steps == 20 and isinstance(recipe.train.max_steps, int)
    assert recipe.train.lr == pytest.approx(1e-3) and isinstance(recipe.train.lr, float)
    assert recipe.distill.alpha == "mean" and recipe.distill.layers == "last"
    assert recipe.student.from_teacher.layers == 3 and recipe.student.from_teacher.heads == 2
    assert recipe.student.from_teacher.init == "random"
    assert recipe.data.seq_len == 64 and recipe.data.path == "train.txt"
    assert recipe.teacher.trust_remote_code is True
    assert recipe.teacher.path == "some/teacher"  # the string shorthand became {path: ...} and kept its value
    assert recipe.output_dir == "out/x"


def test_override_creates_missing_sections():
    data = apply_overrides({}, ["train.max_steps=5", "student.from_teacher.heads=3"])
    assert data == {"train": {"max_steps": 5}, "student": {"from_teacher": {"heads": 3}}}


def test_override_later_wins_and_teacher_can_be_replaced():
    data = apply_overrides(minimal(), ["train.seed=1", "train.seed=2", "teacher=new/teacher"])
    recipe = validate_recipe(data)
    assert recipe.train.seed == 2 and recipe.teacher.path == "new/teacher"


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(ShdError, match="output_dir is not a section"):
        apply_overrides(minimal(output_dir="runs/x"), ["output_dir.x=1"])
    with pytest.raises(ShdError, match="is not a section"):
        apply_overrides(minimal(), ["teacher.path.deeper=1"])


def test_override_with_unknown_key_names_it(tmp_path):
    with pytest.raises(ShdError) as info:
        load_recipe(write_recipe(tmp_path, MINIMAL), ["train.max_step=20"])
    message = str(info.value)
    assert "train.max_step" in message and "'max_steps'" in message


def test_override_bad_type(tmp_path):
    with pytest.raises(ShdError, match=r"train\.max_steps"):
        load_recipe(write_recipe(tmp_path, MINIMAL), ["train.max_steps=many"])


# =========================================================================== validation errors
@pytest.mark.parametrize(
    "data, field, suggestion",
    [
        (minimal(train={"lrr": 1e-3}), "train.lrr", "lr"),
        (minimal(train={"max_step": 3}), "train.max_step", "max_steps"),
        (minimal(distil={"alpha": "mean"}), "distil", "distill"),
        (minimal(student={"from_teacher": {"head": 3}}), "student.from_teacher.head", "heads"),
        (minimal(data={"path": "x", "seqlen": 3}), "data.seqlen", "seq_len"),
        (minimal(teacher={"path": "x", "trust_remote": True}), "teacher.trust_remote", "trust_remote_code"),
        (minimal(outputdir="x"), "outputdir", "output_dir"),
    ],
)
def test_unknown_key_names_field_and_suggests(data, field, suggestion):
    message = error_of(data)
    assert f"unknown key {field!r}" in message
    assert f"did you mean {suggestion!r}" in message
    assert "valid keys here:" in message


def test_unknown_key_lists_the_valid_keys_of_its_section():
    message = error_of(minimal(train={"zzzz": 1}))
    assert "did you mean" not in message  # nothing is close
    for key in TrainSpec.model_fields:
        assert key in message.split("valid keys here:")[1]


def test_misspelt_required_key_reports_the_unknown_key():
    # `pth` makes `path` missing too; the misspelling is the useful thing to report.
    message = error_of(minimal(teacher={"pth": "x"}))
    assert "teacher.pth" in message and "did you mean 'path'" in message


@pytest.mark.parametrize(
    "data, field",
    [
        (minimal(train={"lr": -1e-3}), "train.lr"),
        (minimal(train={"lr": 0}), "train.lr"),
        (minimal(train={"max_steps": 0}), "train.max_steps"),
        (minimal(train={"grad_accum": 0}), "train.grad_accum"),
        (minimal(train={"weight_decay": -0.1}), "train.weight_decay"),
        (minimal(data={"path": "x", "seq_len": 1}), "data.seq_len"),
        (minimal(data={"path": "x", "val_fraction": 1.0}), "data.val_fraction"),
        (minimal(data={"path": "x", "val_fraction": 0}), "data.val_fraction"),
        (minimal(distill={"temperature": 0}), "distill.temperature"),
        (minimal(distill={"shd": -1}), "distill.shd"),
        (minimal(student={"from_teacher": {"heads": 0}}), "student.from_teacher.heads"),
    ],
)
def test_out_of_range(data, field):
    message = error_of(data)
    assert f"{field}:" in message and "(got" in message


@pytest.mark.parametrize(
    "data, field",
    [
        (minimal(train={"lr": math.inf}), "train.lr"),
        (minimal(train={"lr": math.nan}), "train.lr"),
        (minimal(distill={"temperature": math.inf}), "distill.temperature"),
    ],
)
def test_non_finite_numbers_are_rejected(data, field):
    assert field in error_of(data)


@pytest.mark.parametrize(
    "data, field, words",
    [
        (minimal(distill={"alpha": "foo"}), "distill.alpha", ["'lsq'", "'mean'", "'select'", "'foo'"]),
        (minimal(distill={"attn_loss": "l2"}), "distill.attn_loss", ["'kl'", "'mse'", "'cosine'"]),
        (minimal(train={"device": "tpu"}), "train.device", ["'cuda'"]),
        (minimal(student={"from_teacher": {"init": "zero"}}), "student.from_teacher.init", ["'teacher'", "'random'"]),
        (minimal(distill={"layers": "first"}), "distill.layers", ["'auto'", "'last'"]),
    ],
)
def test_invalid_literal(data, field, words):
    message = error_of(data)
    assert field in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "data, field",
    [
        (minimal(train={"max_steps": "many"}), "train.max_steps"),
        (minimal(train={"max_steps": 2.5}), "train.max_steps"),
        (minimal(train={"lr": [1, 2]}), "train.lr"),
        (minimal(data={"path": ["a", "b"]}), "data.path"),
        (minimal(data={"path": "x", "batch_size": {"a": 1}}), "data.batch_size"),
        (minimal(train=[1, 2]), "train"),
        (minimal(data="train.txt"), "data"),
        (minimal(teacher=5), "teacher"),
        (minimal(distill={"layers": [[0, "a"]]}), "distill.layers"),
        (minimal(distill={"layers": [[0, 1, 2]]}), "distill.layers"),
    ],
)
def test_wrong_type(data, field):
    message = error_of(data)
    assert message.startswith(f"recipe: {field}")


@pytest.mark.parametrize("missing", ["teacher", "data", "student"])
def test_missing_section(missing):
    data = minimal()
    data.pop(missing)
    assert error_of(data) == f"recipe: {missing} is required; add it to the recipe"


def test_missing_data_path():
    assert "data.path is required" in error_of(minimal(data={"seq_len": 32}))


@pytest.mark.parametrize(
    "student",
    [
        {"path": "a", "from_teacher": {"heads": 2}},  # both
        {},  # neither
        {"allow_pickle": True},  # neither, with an unrelated key
        {"path": None, "from_teacher": None},
    ],
)
def test_student_needs_exactly_one_source(student):
    message = error_of(minimal(student=student))
    assert "student" in message and "exactly one of student.path or student.from_teacher" in message


# =========================================================================== files
def test_invalid_yaml_names_the_line(tmp_path):
    path = write_recipe(tmp_path, "teacher: t\nstudent: s\ndata: {path: [unclosed\nother: 1\n")
    with pytest.raises(ShdError) as info:
        load_recipe(path)
    message = str(info.value)
    assert str(path) in message and "invalid YAML at line" in message
    line = int(message.split("at line ")[1].split(";")[0].split(" ")[0])
    assert 3 <= line <= 5


def test_invalid_yaml_line_of_a_bad_indent(tmp_path):
    path = write_recipe(tmp_path, "teacher: t\nstudent: s\ndata:\n  path: x\n bad: 1\n")
    with pytest.raises(ShdError, match="invalid YAML at line 5"):
        load_recipe(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    with pytest.raises(ShdError, match="top level must be a mapping"):
        load_recipe(write_recipe(tmp_path, text))


def test_empty_file_asks_for_the_required_sections(tmp_path):
    with pytest.raises(ShdError, match="teacher is required"):
        load_recipe(write_recipe(tmp_path, ""))


def test_missing_file(tmp_path):
    with pytest.raises(ShdError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_directory_given(tmp_path):
    with pytest.raises(ShdError, match="is a folder"):
        load_recipe(tmp_path)


def test_binary_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81teacher")
    with pytest.raises(ShdError, match="recipe"):
        load_recipe(path)


def test_deeply_nested_yaml_is_a_clean_error(tmp_path):
    path = write_recipe(tmp_path, "teacher: " + "[" * 1500 + "]" * 1500 + "\n")
    with pytest.raises(ShdError):
        load_recipe(path)


# =========================================================================== fuzz
KEYS = st.one_of(
    st.sampled_from(
        ["teacher", "student", "data", "distill", "train", "output_dir", "path", "from_teacher", "heads", "layers",
         "kv_heads", "init", "seq_len", "lr", "max_steps", "alpha", "grouping", "text_field", "device", "dtype"]
    ),
    st.text(max_size=6),
    st.integers(-3, 3),
    st.none(),
    st.booleans(),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["auto", "last", "lsq", "mean", "teacher", "random", "cpu", "kl"]),
    st.binary(max_size=4),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(KEYS, children, max_size=5), st.tuples(children, children)
    ),
    max_leaves=25,
)


def _only_shd_errors(call) -> None:
    try:
        result = call()
    except ShdError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(result, Recipe)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.dictionaries(KEYS, VALUES, max_size=7))
def test_fuzz_validate_random_structures(data):
    _only_shd_errors(lambda: validate_recipe(data))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    teacher=VALUES, student=VALUES, data_section=VALUES,
    extra=st.dictionaries(st.sampled_from(["distill", "train", "output_dir", "bogus"]), VALUES, max_size=3),
)
def test_fuzz_validate_near_valid_structures(teacher, student, data_section, extra):
    # Sections present with random contents reach the field validators, not just "missing".
    _only_shd_errors(lambda: validate_recipe({"teacher": teacher, "student": student, "data": data_section, **extra}))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    text=st.one_of(
        st.text(st.characters(exclude_categories=("Cs",)), max_size=200),
        st.text(alphabet=":-[]{}!&*#|>'\"\n ?,%@`abc0123.", max_size=120),
        VALUES.map(lambda v: yaml.safe_dump(v, allow_unicode=True) if not isinstance(v, bytes) else "x"),
    ),
    overrides=st.lists(st.text(alphabet="abcdefghilmnoprstuv._=[]{}:0123 -", max_size=20), max_size=3),
)
def test_fuzz_load_random_yaml_text(tmp_path, text, overrides):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    _only_shd_errors(lambda: load_recipe(path, overrides))
