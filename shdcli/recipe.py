"""The recipe: a typed, validated YAML file (plus --set overrides) describing one distillation run.

Validation is pydantic's (typed fields, unknown keys forbidden); this module only turns its first
error into one line that names the field, says what is wrong and how to fix it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shdcli.errors import ShdError
from shdcli.report import looks_utf16


def _clean_path(value: str) -> str:
    if not value.strip() or "\x00" in value:
        raise ValueError("must be a non-empty path without NUL characters")
    return value


PathText = Annotated[str, AfterValidator(_clean_path)]


class Section(BaseModel):
    # No NaN/inf numbers: lr=.inf would pass gt=0 and wreck the run at step 1.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# A field marked RESUME_FREE does not change what a run trains (its length, where it runs and logs, what the
# evaluation scores): `--resume` accepts another value, and Recipe.fingerprint leaves it out. Every other field
# is part of the run's identity.
RESUME_FREE: dict[str, Any] = {"resume": "free"}


def free_field(default: Any, **kwargs: Any) -> Any:
    """pydantic's Field for a RESUME_FREE field."""
    return Field(default, json_schema_extra=RESUME_FREE, **kwargs)


def _resume_free(field: Any) -> bool:
    return isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("resume") == "free"


def run_defining(section: BaseModel, dumped: dict) -> dict:
    """`dumped` (section.model_dump(mode="json")) without the RESUME_FREE fields, at every depth."""
    out = {}
    for name, field in type(section).model_fields.items():
        if _resume_free(field):
            continue
        value = getattr(section, name)
        out[name] = run_defining(value, dumped[name]) if isinstance(value, BaseModel) else dumped[name]
    return out


class TeacherSpec(Section):
    path: PathText = Field(description="HF folder, .gguf file or pkg://package/path")
    trust_remote_code: bool = False
    allow_pickle: bool = free_field(False)  # how files load, not the run


class FromTeacher(Section):
    layers: int | None = Field(None, ge=1, description="student layers (default: teacher's)")
    heads: int | None = Field(None, ge=1, description="student attention heads (default: teacher's)")
    kv_heads: int | None = Field(None, ge=1, description="key/value heads (GQA); default keeps the teacher's ratio")
    hidden_size: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=1)
    params: float | None = Field(None, gt=0.0, lt=1.0, description="target size as a fraction of the teacher's "
                                 "parameters: free axes shrink in a documented order (README) until it fits")
    init: Literal["teacher", "random"] = "teacher"
    prune: Literal["importance", "uniform"] = Field(
        "importance", description="importance: keep the layers, heads, MLP neurons and channels that matter on "
        "distill.calibration_batches training batches; uniform: evenly spaced layers and leading slices (baseline)"
    )


class LoraSpec(Section):
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16.0, gt=0.0, description="scale alpha / r of the low-rank update")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Literal["attention", "all-linear"] | list[str] = Field(
        "attention", description="attention (q/k/v/o projections), all-linear, or PEFT module-name suffixes"
    )


class StudentSpec(Section):
    path: PathText | None = None
    from_teacher: FromTeacher | None = None
    allow_pickle: bool = free_field(False)
    lora: LoraSpec | None = Field(None, description="train LoRA adapters on the (frozen) student; needs peft")

    @model_validator(mode="after")
    def _one_source(self) -> StudentSpec:
        if (self.path is None) == (self.from_teacher is None):
            raise ValueError("give exactly one of student.path or student.from_teacher")
        if self.lora is not None and self.from_teacher is not None and self.from_teacher.init == "random":
            raise ValueError("lora adapters on a randomly initialised student cannot learn much; "
                             "set student.from_teacher.init=teacher (or give student.path)")
        return self


class DataSpec(Section):
    path: PathText = Field(description="a .txt, .jsonl or .parquet file, a datasets save_to_disk folder, or "
                           "builtin:pydoc; images: a root/<class>/<file> folder, a .npz (x, y), a datasets folder, or "
                           "builtin:digits; text classifiers: labelled .jsonl / .csv / .parquet rows, a datasets "
                           "folder, builtin:bbc-news or builtin:tweets (fixed held-out split)")
    text_field: str = "text"
    text_pair_field: str | None = Field(None, description="text classifiers: the column of each row's second text "
                                        "(NLI / paraphrase pairs); None: single texts")
    stream: bool = Field(False, description="stream .txt/.jsonl into a memory-mapped token cache (always on for "
                         "parquet and datasets folders): for corpora larger than RAM")
    image_field: str = Field("image", description="image column of a datasets folder")
    label_field: str = Field("label", description="label column (image datasets folders, text classifiers): class "
                             "names (the teacher's label2id) or ids")
    seq_len: int = Field(128, ge=2)
    batch_size: int = Field(8, ge=1)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="held-out share (text classifiers: a fixed "
                                "hash split; builtin:bbc-news / builtin:tweets always hold out their fixed 0.1)")
    max_documents: int | None = Field(None, ge=2)
    val_batches: int = Field(8, ge=1)
    ood_eval: PathText | None = Field(None, description="a second corpus (e.g. builtin:fortunes), never trained on, "
                                      "scored at init and in the final evaluation (ood_* metrics)")
    eval_tokens: int = free_field(4096, ge=2, description="tokens of the held-out split (and of ood_eval) the "
                                  "evaluation at init and at the end scores for perplexity: fewer is faster, noisier")


# distill.layers: {form: N} selections of student layers (mapping.layer_pairs says what each chooses)
LAYER_SUBSETS = ("every", "last", "first")


class DistillSpec(Section):
    # auto | last | [[student, teacher], ...] | {every: N} (the last student layer and every N-th below it)
    # | {last: N} (the last N student layers) | {first: N} (the first N; the others left free); see mapping.layer_pairs
    layers: Literal["auto", "last"] | list[tuple[int, int]] | dict[str, int] = "auto"
    grouping: Literal["balanced", "pairs", "calibrated"] = "balanced"
    calibration_batches: int = Field(8, ge=1, description="training batches the teacher sees to calibrate grouping "
                                     "and to measure pruning importance")
    alpha: Literal["lsq", "mean", "select"] = "lsq"
    attn_loss: Literal["kl", "mse", "cosine"] = "kl"
    # squeeze: SHD. projector / score_mean: the baselines of benchmarks/quality.py (see shdcli/attention/baselines.py).
    # relations: MiniLMv2 Q-Q/K-K/V-V self-attention relations (shdcli/attention/relations.py).
    target: Literal["squeeze", "projector", "score_mean", "relations"] = "squeeze"
    relation_heads: int = Field(0, ge=0, description="relation heads of target=relations; 0 = the gcd of the "
                                "teacher's and student's query and KV head counts")
    temperature: float = Field(1.0, gt=0.0)
    logit_temperature: float = Field(2.0, gt=0.0)
    task: float = Field(1.0, ge=0.0)
    logit: float = Field(1.0, ge=0.0)
    shd: float = Field(1.0, ge=0.0)
    impl: Literal["lean", "naive"] = "lean"
    chunk_rows: int = Field(0, ge=0, description="query rows per chunk in the lean path; 0 = auto")
    logit_loss: Literal["kl", "reverse_kl", "jsd"] = Field(
        "kl", description="logit KD divergence: kl (forward), reverse_kl, or jsd (generalised, distill.jsd_beta)")
    jsd_beta: float = Field(0.5, ge=0.0, le=1.0, description="jsd mixture weight (TRL): 0 = forward KL, 1 = reverse KL")
    logit_impl: Literal["fused", "naive"] = Field(
        "fused", description="causal LMs: fused (LM head + CE + KD in token chunks, no [B, N, V] logits) | naive")
    chunk_memory_mb: int = Field(64, ge=1, description="MiB of working memory per chunk: lean SHD and fused logits")
    # shdcli/attention/balance.py: with value|grad, `shd` is the SHD term's fraction of the task + logit term;
    # agreement caps SHD's gradient at the running cos(g_shd, g_task+logit) times the task's; pcgrad projects
    # out the part of SHD's gradient that opposes the task's.
    # auto (default): none where the task learns labels or tokens with logit KD; off (training skips SHD, validation
    # measures it) where it regresses the teacher's output, a sentence embedding (balance.resolve_mode says why).
    balance: Literal["auto", "none", "value", "grad", "agreement", "pcgrad"] = "auto"
    shd_schedule: Literal["constant", "linear_decay", "cosine_decay"] = "constant"
    shd_warmup_steps: int = Field(0, ge=0, description="steps over which the SHD weight ramps up from 0")
    shd_decay_steps: int = Field(0, ge=0, description="steps of decay after the warmup; 0 = until train.max_steps")

    @field_validator("layers", mode="before")
    @classmethod
    def _layer_subset(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        if len(value) != 1 or next(iter(value)) not in LAYER_SUBSETS:
            raise ValueError(f"{value!r} is not a layer selection; write {{every: N}}, {{last: N}} or {{first: N}} "
                             "(or auto, last, or a list of [student, teacher] pairs)")
        (form, n), = value.items()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{form}: {n!r} must be a whole number >= 1")
        return value

    @model_validator(mode="after")
    def _balance_needs_a_reference(self) -> DistillSpec:
        if self.balance not in ("none", "auto") and self.task == 0 and self.logit == 0:
            raise ValueError(f"balance={self.balance} scales SHD to a fraction of the task + logit term, which "
                             "has weight 0 here; give distill.task or distill.logit a weight, or set balance=none")
        return self


class TrainSpec(Section):
    max_steps: int = free_field(100, ge=1)
    lr: float = Field(5e-4, gt=0.0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.01, ge=0.0)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0.0)
    seed: int = 0
    eval_every: int = free_field(25, ge=1)
    log_every: int = free_field(10, ge=1, description="steps between lines of the run log "
                                "(output_dir/logs/metrics.jsonl, the trackers) and, off a terminal, of the console")
    report_to: list[Literal["jsonl", "tensorboard", "mlflow", "wandb"]] = free_field(
        ["jsonl"], description="trackers the run logs to while it trains (shdcli/trackers.py); tensorboard, mlflow "
        "and wandb need their pip extras")
    grad_norms_every: int = Field(10, ge=0, description="steps between measurements of the per-part gradient norms "
                                  "(task, logit, shd; costs one extra backward per part); 0 = never")
    device: Literal["auto", "cpu", "cuda"] = free_field("auto")
    dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int = free_field(0, ge=0, description="torch CPU threads; 0 = torch's default")
    strategy: Literal["ddp", "fsdp"] = free_field(
        "ddp", description="under torchrun: ddp (student replicated) or fsdp (student sharded, FSDP2)"
    )
    save_every: int = free_field(50, ge=1, description="steps between checkpoints (also at the end and on Ctrl-C)")
    keep_checkpoints: int = free_field(2, ge=1, description="newest checkpoints kept in output_dir/checkpoints")
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="teacher weights (it only runs forward); auto = bfloat16 on a CUDA GPU that supports it"
    )
    compile: bool = free_field(False, description="torch.compile the student (slow first steps; worth it on CUDA)")


class Recipe(Section):
    task: Literal["auto", "causal-lm", "encoder", "image-classification", "sequence-classification",
                  "diffusion"] = Field(
        "auto", description="auto: from the teacher config's architectures (*ForCausalLM, *ForImageClassification, "
        "*ForSequenceClassification, diffusers DiTTransformer2DModel); encoder: distil the backbone of a model whose "
        "head shd does not distil; diffusion: a DiT (pip install 'shd[diffusion]')"
    )
    teacher: TeacherSpec
    student: StudentSpec
    data: DataSpec
    distill: DistillSpec = DistillSpec()
    train: TrainSpec = TrainSpec()
    output_dir: PathText = free_field("runs/shd")

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
        """Hash of every field that defines the run (all but the RESUME_FREE ones)."""
        data = run_defining(self, self.resolved())
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def flat_keys(data: dict, prefix: str = "") -> dict[str, Any]:
    """A (resolved) recipe as dotted keys: {"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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


# What to write for a section left empty (`teacher: ~`, `teacher:` with nothing after it).
EMPTY_HINTS = {
    "teacher": "the teacher's HF folder, .gguf file or pkg://package/path (teacher: path/to/model)",
    "student": "student.path or student.from_teacher (e.g. student: {from_teacher: {layers: 6}})",
    "data": "data.path (a .txt/.jsonl file or builtin:pydoc)",
}


def _field_info(loc: tuple):
    """The pydantic FieldInfo at a location (None where it cannot be followed)."""
    model: type[BaseModel] = Recipe
    info = None
    for part in loc:
        if not isinstance(part, str) or model is None:
            return None
        info = model.model_fields.get(part)
        if info is None:
            return None
        candidates = [info.annotation, *getattr(info.annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return info


def _empty_message(loc: tuple, where: str, from_set: bool) -> str:
    if len(loc) == 1 and loc[0] in EMPTY_HINTS:
        return f"{where} is empty; give {EMPTY_HINTS[loc[0]]}"
    info = _field_info(loc)
    if info is not None and not info.is_required():
        drop = "leave out this --set" if from_set else "delete the line"
        return f"{where} is empty; give it a value or {drop} to use the default"
    return f"{where} is empty; give it a value"


def _override_for(loc: tuple, overrides: dict[tuple, str]) -> str | None:
    """The --set that wrote the field at loc (or a section above it), if one did: errors name it, not the file."""
    for n in range(len(loc), 0, -1):
        if tuple(str(p) for p in loc[:n]) in overrides:
            return overrides[tuple(str(p) for p in loc[:n])]
    return None


def _format_error(exc: ValidationError, source: str, overrides: dict[tuple, str] | None = None) -> str:
    errors = exc.errors()
    # A misspelt key also makes the real key "missing"; the unknown key is the useful report (core-tests fix).
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal["))))
    where = ".".join(str(p) for p in loc) or "recipe"
    kind = err["type"]
    setting = _override_for(loc, overrides or {})
    if setting is not None:
        source = f"--set {setting!r}"
    if kind == "extra_forbidden":  # before the empty check: an unknown key left empty is still unknown
        valid = _section_fields(loc)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{source}: unknown key {where!r}; {hint}valid keys here: {', '.join(valid)}"
    if err.get("input", ...) is None and kind != "missing":
        return f"{source}: {_empty_message(loc, where, setting is not None)}"
    if kind == "missing":
        return f"{source}: {where} is required; add it to the recipe"
    message = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    text = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    shown = f" (got {text})" if not isinstance(value, dict | list) and value is not None else ""
    return f"{source}: {where}: {message}{shown}"


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ShdError(f"--set {text!r}: write it as section.key=value, e.g. --set train.max_steps=20")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except Exception:  # noqa: BLE001 - YAML's constructors raise many types (bad dates: ValueError); keep it text
        value = raw
    return [k for k in key.strip().split(".") if k], value


def apply_overrides(data: dict, overrides: list[str], origins: dict[tuple, str] | None = None) -> dict:
    """Write each section.key=value into data; origins, if given, receives key path -> the --set text."""
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
        if origins is not None:
            origins[tuple(keys)] = text
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise ShdError(f"recipe {path} does not exist; give the path of a recipe YAML file (see recipes/)")
    if path.is_dir():
        raise ShdError(f"recipe {path} is a folder; give the path of a recipe YAML file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ShdError(f"recipe {path}: cannot read it ({exc.strerror}); check the path and its permissions") from None
    if looks_utf16(raw):
        raise ShdError(f"recipe {path} is UTF-16 text; save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ShdError(f"recipe {path} is not UTF-8 text; save it as a YAML text file") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = f" ({exc.problem})" if getattr(exc, "problem", None) else ""
        raise ShdError(f"recipe {path}: invalid YAML{where}{problem}; fix the syntax") from None
    except RecursionError:  # PyYAML parses recursively: thousands of nested brackets
        raise ShdError(f"recipe {path}: YAML nested too deeply; write a flat mapping of sections") from None
    except Exception as exc:  # noqa: BLE001 - YAML's constructors raise ValueError etc. on bad dates, numbers
        raise ShdError(f"recipe {path}: invalid YAML value ({str(exc).splitlines()[0]}); fix it or quote it") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ShdError(f"recipe {path}: the top level must be a mapping of sections (teacher, student, data, ...)")
    origins: dict[tuple, str] = {}
    data = apply_overrides(data, overrides or [], origins)
    return validate_recipe(data, str(path), base=path.parent, origins=origins)


def validate_recipe(data: dict, source: str = "recipe", base: Path | None = None,
                    origins: dict[tuple, str] | None = None) -> Recipe:
    """origins: key path -> the --set text that wrote it (an error in such a field names the --set)."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise ShdError(_format_error(exc, source, origins)) from None
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
        return str(candidate) if os.path.exists(candidate) and not os.path.exists(p) else p

    recipe.teacher.path = fix(recipe.teacher.path)
    if recipe.student.path is not None:
        recipe.student.path = fix(recipe.student.path)
    recipe.data.path = fix(recipe.data.path)
    return recipe
