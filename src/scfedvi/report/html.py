"""The same report blocks as :mod:`scfedvi.report.markdown`, as one self-contained HTML file
(images embedded as base64, no external resources)."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from scfedvi.report.markdown import FOLD_LINES, Block, written_now

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
caption { caption-side: top; text-align: left; font-weight: bold; padding-bottom: 4px; }
pre { background: #f6f6f6; padding: 0.8em; font-size: 0.85em;
      white-space: pre-wrap; overflow-wrap: anywhere; }
.wide { overflow-x: auto; max-width: 100%; }
details > summary { cursor: pointer; color: #555; }
.written { color: #666; font-size: 0.9em; margin-top: -0.5em; }
img { max-width: 100%; }
figure { margin: 1em 0; } figcaption { font-style: italic; font-size: 0.9em; }
"""


def _inline(text: str) -> str:
    """Escape, then the little Markdown the blocks use: ``code``, **bold**."""
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


def table_html(df: pd.DataFrame, caption: str | None = None) -> str:
    """An HTML table of ``df`` (its index as first column when meaningful)."""
    if not isinstance(df.index, pd.RangeIndex) or df.index.name:
        df = df.reset_index()
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float):
                v = "–" if pd.isna(v) else f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
            cells.append(f"<td>{_inline(str(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{_inline(caption)}</caption>" if caption else ""
    table = f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    return f'<div class="wide">{table}</div>'


def image_html(path: str | Path, caption: str) -> str:
    """A figure with the PNG embedded as a data URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    alt = html.escape(caption)
    return (
        f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"/>'
        f"<figcaption>{alt}</figcaption></figure>"
    )


def to_html(blocks: Sequence[Block], title: str, *, written: str | None = None) -> str:
    """Render blocks to one self-contained HTML page (``written``, default now, under the
    first ``h1``; long ``pre`` blocks folded, wrapped at the page's edge)."""
    body: list[str] = []
    stamped = False
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_inline(block[1])}</{kind}>")
            if kind == "h1" and not stamped:
                body.append(f'<p class="written">Written {written or written_now()}.</p>')
                stamped = True
        elif kind == "p":
            body.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "table":
            body.append(table_html(block[1], block[2]))
        elif kind == "img":
            body.append(image_html(block[1], block[2]))
        elif kind == "pre":
            text = block[1].rstrip()
            pre = f"<pre>{html.escape(text)}</pre>"
            n = text.count("\n") + 1
            if n > FOLD_LINES:
                pre = f"<details><summary>{n} lines (click to show)</summary>{pre}</details>"
            body.append(pre)
        else:
            raise ValueError(f"unknown report block {kind!r}")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
