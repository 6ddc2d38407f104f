"""benchmarks/RESULTS.md is written by several scripts: each owns one section between markers.

    <!-- op-speed:start -->
    ... replaced wholesale by benchmarks/op_speed.py ...
    <!-- op-speed:end -->

Text outside the markers (the hand-written analysis) is never touched.
"""

from __future__ import annotations

from pathlib import Path


def write_results_section(path: str | Path, section: str, markdown: str) -> None:
    """Replace the text between <!-- {section}:start --> and <!-- {section}:end --> in `path`,
    appending the section if its markers are missing."""
    path = Path(path)
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)
