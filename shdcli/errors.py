"""The one error type a user sees: a bad recipe, path, model or data file.

The CLI prints its message as one line and exits with code 2 (no traceback unless --debug).
Messages name the field or file at fault and say how to fix it.
"""


class ShdError(Exception):
    """User-facing input error (exit code 2)."""


def article(word: str) -> str:
    """`a` or `an` before a word put into a message (`an encoder model`, `a causal-lm model`). Our words are
    task, family and class names, where the first letter decides (none starts with a long u)."""
    return "an" if word[:1].lower() in "aeio" else "a"
