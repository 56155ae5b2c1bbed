"""The recipe: a typed, validated YAML file (plus --set overrides) describing one distillation run.

Validation is pydantic's (typed fields, unknown keys forbidden); this module only turns its first
error into one line that names the field, says what is wrong and how to fix it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shdcli.errors import ShdError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherSpec(Section):
    path: str = Field(description="HF folder, .gguf file or pkg://package/path")
    trust_remote_code: bool = False
    allow_pickle: bool = False


class FromTeacher(Section):
    layers: int | None = Field(None, ge=1, description="student layers (default: teacher's)")
    heads: int | None = Field(None, ge=1, description="student attention heads (default: teacher's)")
    kv_heads: int | None = Field(None, ge=1, description="key/value heads (GQA); default keeps the teacher's ratio")
    hidden_size: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=1)
    init: Literal["teacher", "random"] = "teacher"


class StudentSpec(Section):
    path: str | None = None
    from_teacher: FromTeacher | None = None
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> StudentSpec:
        if (self.path is None) == (self.from_teacher is None):
            raise ValueError("give exactly one of student.path or student.from_teacher")
        return self


class DataSpec(Section):
    path: str = Field(description="a .txt file, a .jsonl file, or builtin:pydoc")
    text_field: str = "text"
    seq_len: int = Field(128, ge=2)
    batch_size: int = Field(8, ge=1)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    max_documents: int | None = Field(None, ge=2)
    val_batches: int = Field(8, ge=1)


class DistillSpec(Section):
    layers: Literal["auto", "last"] | list[tuple[int, int]] = "auto"
    grouping: Literal["balanced", "pairs"] = "balanced"
    calibration_batches: int = Field(8, ge=1)
    alpha: Literal["lsq", "mean", "select"] = "lsq"
    attn_loss: Literal["kl", "mse", "cosine"] = "kl"
    temperature: float = Field(1.0, gt=0.0)
    logit_temperature: float = Field(2.0, gt=0.0)
    task: float = Field(1.0, ge=0.0)
    logit: float = Field(1.0, ge=0.0)
    shd: float = Field(1.0, ge=0.0)
    impl: Literal["lean", "naive"] = "lean"
    chunk_rows: int = Field(0, ge=0, description="query rows per chunk in the lean path; 0 = auto")


class TrainSpec(Section):
    max_steps: int = Field(100, ge=1)
    lr: float = Field(5e-4, gt=0.0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.01, ge=0.0)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0.0)
    seed: int = 0
    eval_every: int = Field(25, ge=1)
    log_every: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="teacher weights (it only runs forward); auto = bfloat16 on a CUDA GPU that supports it"
    )
    compile: bool = Field(False, description="torch.compile the student (slow first steps; worth it on CUDA)")


class Recipe(Section):
    teacher: TeacherSpec
    student: StudentSpec
    data: DataSpec
    distill: DistillSpec = DistillSpec()
    train: TrainSpec = TrainSpec()
    output_dir: str = "runs/shd"

    @field_validator("teacher", mode="before")
    @classmethod
    def _teacher_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @field_validator("student", mode="before")
    @classmethod
    def _student_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    def resolved(self) -> dict:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """Hash of everything that defines the run except its length and output place."""
        data = self.resolved()
        for key in ("max_steps", "eval_every", "log_every", "device", "threads", "compile"):
            data["train"].pop(key, None)
        data.pop("output_dir", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading
def _section_fields(loc: tuple) -> list[str]:
    """Field names valid at a location, for 'did you mean' suggestions."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        if not isinstance(part, str):
            continue
        info = model.model_fields.get(part)
        if info is None:
            break
        annotation = info.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        sub = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if sub is None:
            break
        model = sub
    return list(model.model_fields)


def _format_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal["))))
    where = ".".join(str(p) for p in loc) or "recipe"
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = _section_fields(loc)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{source}: unknown key {where!r}; {hint}valid keys here: {', '.join(valid)}"
    if kind == "missing":
        return f"{source}: {where} is required; add it to the recipe"
    message = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict | list) and value is not None else ""
    return f"{source}: {where}: {message}{shown}"


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ShdError(f"--set {text!r}: write it as section.key=value, e.g. --set train.max_steps=20")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return [k for k in key.strip().split(".") if k], value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        if not keys:
            raise ShdError(f"--set {text!r}: missing key; write it as section.key=value")
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            elif not isinstance(node[k], dict):
                node[k] = {"path": node[k]} if k in ("teacher", "student") else node[k]
            if not isinstance(node[k], dict):
                raise ShdError(f"--set {text!r}: {k} is not a section")
            node = node[k]
        node[keys[-1]] = value
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise ShdError(f"recipe {path} does not exist; give the path of a recipe YAML file (see recipes/)")
    if path.is_dir():
        raise ShdError(f"recipe {path} is a folder; give the path of a recipe YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ShdError(f"recipe {path} is not UTF-8 text; save it as a YAML text file") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ShdError(f"recipe {path}: invalid YAML{where}; fix the syntax") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ShdError(f"recipe {path}: the top level must be a mapping of sections (teacher, student, data, ...)")
    data = apply_overrides(data, overrides or [])
    return validate_recipe(data, str(path), base=path.parent)


def validate_recipe(data: dict, source: str = "recipe", base: Path | None = None) -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise ShdError(_format_error(exc, source)) from None
    except (TypeError, ValueError, RecursionError) as exc:  # pragma: no cover - defensive, keys of odd types
        raise ShdError(f"{source}: {exc}") from None
    if base is not None:
        recipe = _relative_to(recipe, base)
    return recipe


def _relative_to(recipe: Recipe, base: Path) -> Recipe:
    """Paths in a recipe are relative to the recipe file when they exist there, else to the cwd."""

    def fix(p: str | None) -> str | None:
        if p is None or p.startswith(("pkg://", "builtin:")) or Path(p).is_absolute():
            return p
        candidate = base / p
        return str(candidate) if candidate.exists() and not Path(p).exists() else p

    recipe.teacher.path = fix(recipe.teacher.path)
    if recipe.student.path is not None:
        recipe.student.path = fix(recipe.student.path)
    recipe.data.path = fix(recipe.data.path)
    return recipe
