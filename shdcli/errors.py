"""The one error type a user sees: a bad recipe, path, model or data file.

The CLI prints its message as one line and exits with code 2 (no traceback unless --debug).
Messages name the field or file at fault and say how to fix it.
"""


class ShdError(Exception):
    """User-facing input error (exit code 2)."""
