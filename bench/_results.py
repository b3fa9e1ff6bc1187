"""bench/RESULTS.md: each benchmark owns one ``## Heading`` section and rewrites only that."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(heading: str, body: str, results: Path = RESULTS) -> None:
    """Replace the section under ``heading`` (or append it) with ``body``, leaving the other
    benchmarks' sections as they are. ``body`` may start with the heading line itself."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    if not body.startswith(heading + "\n"):
        body = f"{heading}\n\n{body}"
    block = body.rstrip("\n") + "\n\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    results.write_text(text.rstrip("\n") + "\n")
