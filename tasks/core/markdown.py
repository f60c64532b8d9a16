"""One way to put untrusted text into a markdown artifact.

Model outputs, error messages, S3 keys and user values can hold newlines, `|`, backticks and
HTML; placed raw in a markdown table cell they end the row and the rest of the table renders
as text. Every artifact builds its markdown from these helpers:

- `text(v)`: inline text, escaped (one line; `|`, backticks, `*`, `_`, `[`, `]`, `<`, `>`, `&`, `\\`);
- `code(v)`: an inline code span (model output is never shown raw);
- `block(v)`: a fenced code block for a whole model output or log excerpt;
- `table(header, rows)`: a GFM table; a plain `str` cell is escaped with `text`, an `Md` cell
  (what these helpers return) is used as it is, its pipes escaped for the table;
- `link(label, url)`; `artifact_page_link(key, id)`, `flow_run_link(label, id)`: links into the Prefect UI.

Long values are cut (`limit`, ending in "…"); whoever cuts a value logs it in full (or keeps it in
a table artifact). The output parses the same way with CommonMark + GFM tables (markdown-it),
cmark-gfm and marked (the Prefect UI's renderer): every `|` in a cell is preceded by an odd
number of backslashes, which all three read as an escaped pipe.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

ELLIPSIS = "…"
NEWLINE = "⏎"  # what a line break in a one-line value becomes
_LINE_BREAK = re.compile(r"\r\n|\r|\n|\u2028|\u2029")
_BREAKS = re.compile(r"(?:[ \t]*(?:\r\n|\r|\n|\u2028|\u2029))+[ \t]*")
_ESCAPED = set("\\`*_[]<>|&~")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class Md(str):
    """Markdown made by these helpers: safe to place as it is."""


def clip(value: object, limit: int | None) -> tuple[str, bool]:
    """`value` as text cut to `limit` characters (the last one an ellipsis), and whether it was cut."""
    s = "" if value is None else str(value)
    if limit is not None and len(s) > limit:
        return s[: max(limit - 1, 0)].rstrip() + ELLIPSIS, True
    return s, False


def one_line(value: object) -> str:
    """Line breaks as ⏎ (a blank line as ⏎⏎), other control characters dropped, tabs as spaces."""
    s = "" if value is None else str(value)
    s = _BREAKS.sub(lambda m: f" {NEWLINE * len(_LINE_BREAK.findall(m.group()))} ", s).replace("\t", " ")
    return _CONTROL.sub("", s)


def text(value: object, limit: int | None = None) -> Md:
    """Untrusted text as inline markdown on one line, every markdown-significant character escaped."""
    s, _ = clip(one_line(value), limit)
    return Md("".join("\\" + ch if ch in _ESCAPED else ch for ch in s))


def _fence_for(s: str, ch: str, shortest: int) -> str:
    longest = max((len(m) for m in re.findall(re.escape(ch) + "+", s)), default=0)
    return ch * max(shortest, longest + 1)


def code(value: object, limit: int | None = None) -> Md:
    """An inline code span holding `value` exactly (on one line, cut to `limit`). In a table, `table`
    escapes its pipes (GFM splits cells before it reads code spans)."""
    s, _ = clip(one_line(value), limit)
    if not s:
        return Md("*(empty)*")
    if "\\|" in s:  # inside a table cell's code span a backslash before a pipe has no reading every renderer shares
        return text(s)
    fence = _fence_for(s, "`", 1)
    if s[0] in "` " or s[-1] in "` ":
        s = f" {s} "
    return Md(f"{fence}{s}{fence}")


def block(value: object, limit: int | None = None, lang: str = "text") -> Md:
    """A fenced code block holding `value` (its own lines kept), cut to `limit` characters."""
    s, _ = clip("" if value is None else str(value), limit)
    s = _CONTROL.sub("", _LINE_BREAK.sub("\n", s))
    fence = _fence_for(s, "`", 3)
    return Md(f"{fence}{lang}\n{s}\n{fence}")


def bold(value: Md | str) -> Md:
    return Md(f"**{value if isinstance(value, Md) else text(value)}**")


def link(label: Md | str, url: str) -> Md:
    """`[label](<url>)`; a URL with spaces, angle brackets or line breaks is shown as text instead."""
    label = label if isinstance(label, Md) else text(label)
    if not url or re.search(r"[\s<>]", url):
        return label
    return Md(f"[{label}](<{url}>)")


def ui_url() -> str | None:
    """The Prefect UI's base URL (PREFECT_UI_URL; Prefect derives it from the API URL), or None."""
    try:
        from prefect.settings import PREFECT_UI_URL

        url = PREFECT_UI_URL.value()
    except Exception:  # noqa: BLE001 - no settings: plain keys instead of links
        return None
    return url.rstrip("/") if url else None


def artifact_page_link(key: str, artifact_id: object) -> Md:
    """The artifact key linked to that one artifact's page in the Prefect UI; as code without a UI URL.
    (The UI does not render a code span inside a link's text: the label is plain text.)"""
    base = ui_url()
    return link(text(key), f"{base}/artifacts/artifact/{artifact_id}") if base else code(key)


def flow_run_link(label: Md | str, flow_run_id: object) -> Md:
    base = ui_url()
    return link(label, f"{base}/runs/flow-run/{flow_run_id}") if base and flow_run_id else (
        label if isinstance(label, Md) else text(label))


def _table_pipes(s: str) -> str:
    """Every `|` preceded by an odd number of backslashes: an escaped pipe to every GFM table parser
    (an unescaped one, e.g. inside a code span, would split the cell)."""
    return re.sub(r"(?<!\\)((?:\\\\)*)\|", lambda m: m.group(1) + "\\|", s)


def _cell(value: object) -> str:
    if isinstance(value, Md):
        return _table_pipes(one_line(value))
    return text(value)


def table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> Md:
    """A GFM table. `align`: one letter per column, "l", "r" or "c" (default all left).
    A row with the wrong number of cells is a programming error."""
    header = list(header)
    align = align or "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"table: {len(header)} columns but align {align!r}")
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    for row in rows:
        row = list(row)
        if len(row) != len(header):
            raise ValueError(f"table row has {len(row)} cells, the header {len(header)}: {row!r}")
        lines.append("| " + " | ".join(_cell(c) or " " for c in row) + " |")
    return Md("\n".join(lines))


def bullets(items: Iterable[Md | str]) -> Md:
    return Md("\n".join(f"- {i if isinstance(i, Md) else text(i)}" for i in items))
