"""Write README's "Supported families" table from the family table (shdcli/models/families.py FAMILIES).

    python scripts/families_table.py [README.md]

The table sits between <!-- families:start --> and <!-- families:end -->; tests/test_families.py fails
when README and the code's table differ, so run this after changing FAMILIES.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shdcli.models.families import supported_markdown  # noqa: E402

START, END = "<!-- families:start -->", "<!-- families:end -->"


def update(readme: Path) -> None:
    text = readme.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: no {START} ... {END} block to fill")
    readme.write_text(pattern.sub(lambda _: f"{START}\n{supported_markdown()}\n{END}", text, count=1))


if __name__ == "__main__":
    update(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "README.md")
