"""The one markdown table renderer of polyfast and its benchmarks.

Two styles of cell, one layout rule:

- ``aligned=True`` (reports, the CLI, the demo): columns padded to their widest cell, the first
  left-aligned and the rest right-aligned (or as ``align`` says, one "l" / "r" per column); floats
  with 4 decimals below 1000, else with thousands separators;
- ``aligned=False`` (benchmark tables, which are long and diffed as text): cells unpadded; floats
  with 3 significant digits below 100, else one decimal with thousands separators; None is empty.
"""

from __future__ import annotations


def _report_cell(x) -> str:
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def _bench_cell(x) -> str:
    if isinstance(x, float):
        return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.3g}"
    return "" if x is None else str(x)


def markdown_table(headers: list[str], rows: list[list], *, aligned: bool = False,
                   align: str | None = None) -> str:
    """A markdown table of ``rows`` under ``headers`` (see the module docstring)."""
    if not aligned:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(_bench_cell(c) for c in r) + " |" for r in rows]
        return "\n".join(lines)
    cells = [[str(h) for h in headers]] + [[_report_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(r):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                 for c, w, a in zip(r, widths, align)) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2))
                         for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def format_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """The aligned style: ``markdown_table(headers, rows, aligned=True, align=align)``."""
    return markdown_table(headers, rows, aligned=True, align=align)
