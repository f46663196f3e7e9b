"""Markdown helpers: text from recipes, reports and git shown literally in cards and pull-request comments.

One home for the card's template filters (md, code, codeblock) and the CI summary's (code, cell, fenced),
so both escape the same way: control characters shown as escapes, code fences longer than any
backtick run inside.
"""

from __future__ import annotations

import re
from typing import Any

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#~$&])")
# What starts a list item or a setext underline when a line begins with it.
_BLOCK_START = re.compile(r"^(?:[-+]|\d{1,9}[.)])(?=\s|$)|^=+\s*$")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def md(value: Any) -> str:
    """One line of literal text: whitespace collapsed, Markdown punctuation escaped (safe in table cells)."""
    text = _MD_SPECIAL.sub(r"\\\1", " ".join(_visible(value).split()))
    if _BLOCK_START.match(text):
        digits = len(text) - len(text.lstrip("0123456789"))
        text = text[:digits] + "\\" + text[digits:]
    return text


def code(value: Any, table: bool = False) -> str:
    """An inline code span holding `value` literally; `table=true` also escapes '|' for a table cell."""
    text = " ".join(_visible(value).split())
    ticks = "`" * (longest_run(text, "`") + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    span = f"{ticks}{pad}{text}{pad}{ticks}"
    return span.replace("|", "\\|") if table else span


def codeblock(value: Any, lang: str = "") -> str:
    """A fenced code block holding `value` literally, its fence longer than any backtick run inside."""
    text = _visible(value, keep_newlines=True).rstrip("\n")
    fence = "`" * max(3, longest_run(text, "`") + 1)
    return f"{fence}{lang}\n{text}\n{fence}"


def fenced(text: str, info: str = "") -> str:
    """`text` in a fenced code block whose fence no line inside can close, ending with a newline."""
    text = _visible(text, keep_newlines=True)
    fence = "`" * max(3, longest_run(text, "`") + 1)
    body = text if text.endswith("\n") or not text else text + "\n"
    return f"{fence}{info}\n{body}{fence}\n"


def cell(text: str) -> str:
    """Plain text for a table cell: one line, '|' and HTML escaped."""
    text = " ".join(_visible(text).split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|") or " "


def longest_run(text: str, char: str) -> int:
    """Length of the longest run of `char` in `text`."""
    return max((len(m) for m in re.findall(f"{re.escape(char)}+", text)), default=0)


def _visible(value: Any, keep_newlines: bool = False) -> str:
    text = str(value).replace("\r\n", "\n").replace("\r", "\n")
    if not keep_newlines:
        text = text.replace("\n", " ")
    # Control characters would be invisible in the card or garble a terminal: show them as escapes.
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text.replace("\t", "    "))
