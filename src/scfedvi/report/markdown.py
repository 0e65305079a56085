"""A report as a list of blocks, rendered to Markdown (images as relative links).

Blocks are plain tuples, so that the HTML renderer (:mod:`scfedvi.report.html`) shows the same
content: ``("h1" | "h2" | "h3", text)``, ``("p", text)``, ``("table", DataFrame, caption)``,
``("img", path, caption)``, ``("pre", text)``. A ``pre`` block longer than
:data:`FOLD_LINES` lines (a configuration) is folded (``<details>``); the time the report was
written follows the title.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

Block = tuple[Any, ...]
#: ``pre`` blocks with more lines than this are folded, in Markdown as in HTML.
FOLD_LINES = 12


def written_now() -> str:
    """The time a report is written, in UTC to the minute."""
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def table_markdown(df: pd.DataFrame) -> str:
    """A pipe table of ``df`` (its index, if named or not a default range, as first column)."""
    if not isinstance(df.index, pd.RangeIndex) or df.index.name:
        df = df.reset_index()
    header = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in df.itertuples(index=False):
        cells = [_cell(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "–" if pd.isna(v) else f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def to_markdown(
    blocks: Sequence[Block], base: str | os.PathLike, *, written: str | None = None
) -> str:
    """Render blocks to Markdown; image paths are written relative to ``base``.

    ``written`` (default: now) is printed under the first ``h1``.
    """
    out: list[str] = []
    stamped = False
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + block[1])
            if kind == "h1" and not stamped:
                out.append(f"*Written {written or written_now()}.*")
                stamped = True
        elif kind == "p":
            out.append(block[1])
        elif kind == "table":
            _, df, caption = block
            if caption:
                out.append(f"**{caption}**\n")
            out.append(table_markdown(df))
        elif kind == "img":
            _, path, caption = block
            rel = os.path.relpath(Path(path), Path(base))
            out.append(f"![{caption}]({rel})\n\n*{caption}*")
        elif kind == "pre":
            text = block[1].rstrip()
            code = "```\n" + text + "\n```"
            n = text.count("\n") + 1
            if n > FOLD_LINES:
                code = (
                    f"<details><summary>{n} lines (click to show)</summary>\n\n{code}\n\n</details>"
                )
            out.append(code)
        else:
            raise ValueError(f"unknown report block {kind!r}")
    return "\n\n".join(out) + "\n"
