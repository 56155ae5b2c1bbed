"""shd: Squeezing-Heads Distillation for Hugging Face transformers."""

import os

__version__ = "0.1.0"


def offline() -> None:
    """Nothing may reach a model hub: every model and tokenizer comes from local folders.

    Set before transformers is imported (the CLI, the tests and the benchmarks all call it first).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
