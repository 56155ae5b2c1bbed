"""Can this teacher teach this student? Checks that turn shape and vocabulary mismatches into one clear line.

They run after loading and before any forward pass, where the same mistakes would otherwise end
in an index error deep inside an embedding or a shape error inside the loss.
"""

from __future__ import annotations

from shdcli.errors import ShdError
from shdcli.models.families import ModelShape


def check_tokenizer_fits(tokenizer, shape: ModelShape, field: str) -> None:
    """Every id the tokenizer can produce must have a row in the model's embedding."""
    if shape.vocab is not None and len(tokenizer) > shape.vocab:
        raise ShdError(
            f"{field}: its tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {shape.vocab}; "
            "the folder's tokenizer and weights do not belong together"
        )


def check_student_fits(teacher: ModelShape, student: ModelShape, t_tok, s_tok) -> None:
    """A given student (student.path) must read the teacher's token ids and have no more heads or layers."""
    if student.heads > teacher.heads:
        raise ShdError(
            f"student.path: the student has {student.heads} attention heads, more than the teacher's {teacher.heads}; "
            f"SHD squeezes teacher heads into fewer student heads, so give a student with at most {teacher.heads}"
        )
    if student.layers > teacher.layers:
        raise ShdError(
            f"student.path: the student has {student.layers} layers, more than the teacher's {teacher.layers}; "
            f"give a student with at most {teacher.layers} layers"
        )
    if hasattr(s_tok, "get_vocab") and hasattr(t_tok, "get_vocab"):  # image processors have no vocabulary
        s_vocab = s_tok.get_vocab()
        for token, t_id in sorted(t_tok.get_vocab().items(), key=lambda kv: kv[1]):
            if s_vocab.get(token) != t_id:
                now = "missing" if token not in s_vocab else f"id {s_vocab[token]}"
                raise ShdError(
                    f"student.path: the student's tokenizer differs from the teacher's (token {token!r} is id {t_id} "
                    f"for the teacher, {now} for the student); both models read the teacher's token ids, so give a "
                    "student that uses the teacher's tokenizer (or derive one with student.from_teacher)"
                )
    if student.vocab is not None and len(t_tok) > student.vocab:
        raise ShdError(
            f"student.path: the student's vocabulary has {student.vocab} entries but the teacher's tokenizer "
            f"{len(t_tok)}; give a student whose vocab_size is at least {len(t_tok)}"
        )


def check_positions(seq_len: int, shape: ModelShape, who: str) -> None:
    if shape.max_positions and seq_len > shape.max_positions:
        raise ShdError(
            f"data.seq_len: {seq_len} is longer than the {who}'s {shape.max_positions} positions; "
            f"set data.seq_len <= {shape.max_positions}"
        )
