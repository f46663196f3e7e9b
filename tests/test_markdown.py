"""The card and the CI summary share one set of Markdown helpers, so the same text is escaped the same way."""

from __future__ import annotations

import pytest

from registry import card, ci, markdown

TEXTS = [
    "plain",
    "with `one` and ``two`` backticks",
    "`starts and ends with a tick`",
    "a | pipe",
    "tab\there",
    "escape \x1b[31m red \x1b[0m and bell \x07",
    "line\r\nbreaks\rand\nmore",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_the_ci_summary_and_the_card_quote_text_alike(text):
    # ci had its own code span and fence, which passed control characters through to the comment.
    for table in (False, True):
        assert ci.code(text, table) == card.code(text, table) == markdown.code(text, table)
    assert ci.fenced(text, "text") == (f"{markdown.codeblock(text, 'text')}\n" if text else "```text\n```\n")
    assert "\x1b" not in ci.cell(text) and "\x07" not in ci.cell(text)


def test_control_characters_are_shown_as_escapes_in_code():
    assert ci.code("a\x1bb") == "`a\\x1bb`"
    assert ci.fenced("x\x07\n") == "```\nx\\x07\n```\n"
    assert ci.cell("a\x1b|b") == "a\\x1b\\|b"
