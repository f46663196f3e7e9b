"""How text reaches a terminal or a CI log: user text shown literally, workflow commands made inert.

Every command prints through `console()` (rich, for people), `write()` (a card or Markdown as text)
or `emit_json()`. Inside rich markup each user-supplied value (a file name, a repo id, a summary, an
error message quoting them) goes through `esc()`, so brackets are text, never markup. `shown()`
writes control characters, line breaks, bidi controls and undecodable bytes as escapes, so a value
never starts a new line or drives the terminal.

A CI runner reads every line of a job's output for workflow commands (GitHub Actions: `::name::`
and the older `##[name]`, after leading whitespace). Every stream here is guarded: a line that
would start with one gets a backslash before it (`\\::error::x`), which Markdown renders as the
same text. The guard is always on, not only under GITHUB_ACTIONS: a log kept and replayed later,
or a step whose container does not see the variable, is parsed just the same.
"""

from __future__ import annotations

import json
import re
import sys
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

# Besides the C0 controls: DEL and the C1 controls, line and paragraph separators, bidi embeddings,
# overrides, isolates and marks (they reorder what a reader sees), and the lone surrogates that stand
# for undecodable bytes.
_OTHER_UNSAFE = "\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE_CHAR = re.compile(f"[\x00-\x1f{_OTHER_UNSAFE}]")
_UNSAFE_IN_TEXT = re.compile(f"[\x00-\x08\x0b-\x1f{_OTHER_UNSAFE}]")  # keeps \t and \n
_JSON_UNSAFE = re.compile(f"[{_OTHER_UNSAFE}]")  # json.dumps escapes C0 itself
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# A runner splits output into lines at \r, \n and \r\n, trims leading whitespace, then looks for these.
_COMMAND_AT_LINE_START = re.compile(r"(^|[\r\n])([^\S\r\n]*)(?=::|##\[)")
_MARKERS = ("::", "##[")
# What rich's markup parser reads as a tag (rich.markup.RE_TAGS, less the backslashes before it).
_TAG_AT = re.compile(r"\[[a-z#/@][^\[]*?\]")


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"  # a byte that was not UTF-8, as Python's surrogateescape keeps it
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(value: object, *, lines: bool = False) -> str:
    """`value` as printable text: controls, bidi marks and undecodable bytes as escapes (line breaks and tabs too, unless `lines`)."""
    return (_UNSAFE_IN_TEXT if lines else _UNSAFE_CHAR).sub(_escape_char, str(value))


def esc(value: object) -> str:
    """A user-supplied value for rich markup: printed as shown() gives it, brackets and backslashes included."""
    text = shown(value)
    if "[" not in text and "\\" not in text:
        return text
    # rich drops one backslash before a '[' that starts no tag, and halves a run of them before one that does
    # (an odd run makes the tag text). rich.markup.escape handles only the second case.
    out: list[str] = []
    run = 0
    for i, char in enumerate(text):
        if char == "\\":
            run += 1
            continue
        if char == "[":
            out.append("\\" * (2 * run + 1) if _TAG_AT.match(text, i) else "\\" * (run + 1 if run else 0))
        else:
            out.append("\\" * run)
        out.append(char)
        run = 0
    # An empty style ends the value: its last backslashes escape nothing after it, and a '[' in it cannot
    # pair with a ']' that follows it.
    return "".join(out) + "\\" * (2 * run) + "[dim][/dim]"


def guard(text: str, line_start: bool = True) -> str:
    """`text` with a backslash before anything a CI runner would read as a workflow command at a line start.

    `line_start`: whether `text` begins a line (False when it continues one already written).
    """
    text = _COMMAND_AT_LINE_START.sub(lambda m: m[0] + "\\" if m[1] or line_start else m[0], text)
    tail_from = max(text.rfind("\r"), text.rfind("\n")) + 1
    if tail_from == 0 and not line_start:
        return text
    # A last line cut short (":" or "##") could become a command with the next write: settle it now.
    head = text[tail_from:].lstrip()
    if head and any(m.startswith(head) and m != head for m in _MARKERS):
        return text[: len(text) - len(head)] + "\\" + head
    return text


class GuardedStream:
    """A text stream that writes through guard(), knowing across writes whether a line has started."""

    def __init__(self, stream: IO[str]):
        self._stream = stream
        self._blank = True  # nothing but whitespace on the current line so far

    def write(self, text: str) -> int:
        """Write `text`, guarded."""
        out = guard(text, self._blank)
        tail_from = max(out.rfind("\r"), out.rfind("\n")) + 1
        tail = out[tail_from:]
        self._blank = (tail_from > 0 or self._blank) and not tail.strip()
        self._stream.write(out)
        return len(text)

    def __getattr__(self, name: str) -> Any:
        # flush, isatty, fileno, encoding: rich asks the stream itself.
        return getattr(self._stream, name)


def console(stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr) for people: guarded, no emoji codes, no highlighting, no wrapping of prints."""
    from rich.console import Console

    return Console(file=GuardedStream(sys.stderr if stderr else sys.stdout), highlight=False, soft_wrap=True, emoji=False)


def write(text: str) -> None:
    """Print multi-line text (a card, Markdown) on stdout: controls escaped, workflow commands inert."""
    GuardedStream(sys.stdout).write(shown(text, lines=True))


def emit_json(data: Any) -> None:
    """Print `data` as JSON on stdout (the --format json contract)."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    # json escapes only C0 controls: the rest of the unsafe set becomes \\uXXXX too. They occur only inside
    # strings, so the JSON stays valid and reads back the same (an undecodable byte as Python's surrogate).
    text = _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    GuardedStream(sys.stdout).write(text + "\n")
