"""Tables: the package's one formatter, for ``apts-mpi report``, the benchmarks
(:mod:`apts_mpi.bench`) and the reproduction scripts.

Plain aligned text for a terminal, or Markdown for BENCHMARKS.md and the suite's report.
"""
from __future__ import annotations

__all__ = ["format_table"]


def format_table(header: list, rows: list, style: str = "plain") -> str:
    """One table from a header and rows of cells (each cell a ``str``).

    ``style="plain"``: columns padded to their widest cell and separated by two spaces, the first
    left-aligned and the others right-aligned, a rule of dashes under the header, a final newline.
    ``style="markdown"``: ``| a | b |`` lines with a ``|---|`` separator row, no padding and no final
    newline.  Raises ``ValueError`` for an unknown style or a row whose length differs from the
    header's.
    """
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"format_table: row {i} has {len(row)} cells, the header "
                             f"{len(header)}")
    if style == "markdown":
        def md(cells):
            return "| " + " | ".join(cells) + " |"
        return "\n".join([md(header), "|" + "---|" * len(header)] + [md(r) for r in rows])
    if style != "plain":
        raise ValueError(f"format_table: unknown style {style!r} (plain or markdown)")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(r) for r in rows]) + "\n"
