"""Carry a sentence-transformers teacher's pipeline (modules.json, pooling, normalisation) to its student.

A sentence-embedding teacher such as all-MiniLM-L6-v2 is more than its BERT weights: modules.json tells
`SentenceTransformer(folder)` to mean-pool the token embeddings (1_Pooling/config.json) and L2-normalise
them (Normalize). Without those files the library falls back to a default pipeline of its own, so a
student folder must carry them, with the pooling width set to the student's hidden size.

Modules with weights of their own (Dense projections) are not carried: they were fitted to the teacher's
width and the student was never trained through them; they are listed in the returned notes.
"""

from __future__ import annotations

import json
from pathlib import Path

# The modules a student can take over as they are (no weights, or only the width to adapt).
_KEEP = ("Transformer", "Pooling", "Normalize")
_SETTINGS = ("sentence_bert_config.json", "config_sentence_transformers.json")


def sentence_transformers_files(teacher_dir: Path, student_config) -> tuple[dict[str, str], list[str]]:
    """(files to write into the student folder {relative path: text}, notes); empty when the teacher
    is not a sentence-transformers model (no modules.json)."""
    teacher_dir = Path(teacher_dir)
    modules_file = teacher_dir / "modules.json"
    if not modules_file.is_file():
        return {}, []
    hidden = int(student_config.hidden_size)
    max_positions = getattr(student_config, "max_position_embeddings", None)
    files: dict[str, str] = {}
    notes: list[str] = []
    kept = []
    for module in json.loads(modules_file.read_text()):
        kind = module["type"].rsplit(".", 1)[-1]
        if kind not in _KEEP:
            notes.append(f"sentence-transformers module {module['path'] or module['name']} ({kind}) was not carried "
                         "to the student: it has weights fitted to the teacher")
            continue
        kept.append({**module, "idx": len(kept), "name": str(len(kept))})
        folder = teacher_dir / module["path"] if module["path"] else None
        if folder is None or not folder.is_dir():
            continue
        for file in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".json"):
            data = json.loads(file.read_text())
            if kind == "Pooling":
                for key in ("word_embedding_dimension", "embedding_dimension"):
                    if key in data:
                        data[key] = hidden
            files[f"{module['path']}/{file.name}"] = json.dumps(data, indent=2) + "\n"
    files["modules.json"] = json.dumps(kept, indent=2) + "\n"
    for name in _SETTINGS:
        if (teacher_dir / name).is_file():
            data = json.loads((teacher_dir / name).read_text())
            if name == "sentence_bert_config.json" and max_positions and data.get("max_seq_length", 0) > max_positions:
                data["max_seq_length"] = int(max_positions)
            files[name] = json.dumps(data, indent=2) + "\n"
    return files, notes
