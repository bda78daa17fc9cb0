"""README's fault table, generated from the fault registry of the tests (``tests/test_safety.py``: ``FAULTS``).

    python scripts/fault_table.py            # rewrite the table between its markers in README.md
    python scripts/fault_table.py --check    # exit 1 when README's table is stale (tests do the same)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- fault-table: generated from tests/test_safety.py (FAULTS) by `python scripts/fault_table.py` -->"
END = "<!-- /fault-table -->"


def table(faults) -> str:
    """The markdown table of ``faults`` (fault, behaviour, test), between its markers."""
    rows = ["| fault | what spa-lite does | shown by |", "|---|---|---|"]
    for f in faults:
        cells = [f.fault, f.behaviour, f"`{f.test}`"]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join([BEGIN, *rows, END])


def main(argv: list[str]) -> int:
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
    from test_safety import FAULTS

    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    new = table(FAULTS)
    if BEGIN not in text or END not in text:
        print(f"README.md has no fault-table markers ({BEGIN!r})", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    updated = head + new + tail
    if "--check" in argv:
        if updated != text:
            print("README.md's fault table is stale: run python scripts/fault_table.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(updated, encoding="utf-8")
    print(f"wrote {len(FAULTS)} faults to {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
