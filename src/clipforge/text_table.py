"""Aligned plain-text columns for the terminal: the one renderer behind every table clipforge prints
(``clipforge models``, ``models --pretrained``, ``eval merge``)."""

from __future__ import annotations

from collections.abc import Container, Sequence


def format_columns(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: Container[int] = (),
    rule: bool = False,
) -> str:
    """Columns two spaces apart, each as wide as its widest cell; ``right``: indices aligned right
    (numbers), ``rule``: a dashed line under the header. Trailing spaces are stripped, so a short
    last column leaves no invisible padding; cells past the header's length are ignored."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    lines = [line(header)]
    if rule:
        lines.append("  ".join("-" * w for w in widths))
    lines += [line(row) for row in rows]
    return "\n".join(lines)
