"""Secrets and local paths in what is published: one scanner for the card and for every published file.

A card is scanned as a reader sees it (Markdown escapes removed) for secrets, local paths and
environment references. Every other published file (configs, chat templates, tokenizer files,
reports, a recipe) is scanned as bytes for secrets only: a tokenizer vocabulary is full of
path-shaped pieces, and tokenizer.json can be tens of MB, so one compiled alternation passes
over each file once.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

# Secret formats, each (what it is, literals every match holds, pattern). Taken from the detectors that Yelp/detect-secrets ships
# (detect_secrets/plugins/*.py: aws, aws_secret_access_key, azure_storage_key, basic_auth, github_token,
# jwt, mailchimp, npm, openai, private_key, pypi_token, sendgrid, slack, stripe, twilio) and from the
# rules of gitleaks (config/gitleaks.toml: huggingface, github-fine-grained-pat, anthropic, gcp-api-key,
# gitlab-pat, npm-access-token), tightened with word boundaries so that a tokenizer vocabulary is clean.
# Every pattern starts with a literal character (the boundary is checked just after it), and only the
# patterns whose literals occur in a file join the one alternation that scans it: so it skips ahead to
# candidate characters in C (an 8 MB vocabulary in about 0.1 s, against 4 s for lookbehinds first).


def _word(first: str, rest: str, before: str = "[A-Za-z0-9_]") -> str:
    """`first` then `rest`, where `first` does not follow a `before` character."""
    return f"{first}(?<!{before}{first}){rest}"


SECRET_FORMATS: list[tuple[str, tuple[str, ...], str]] = [
    ("a Hugging Face token (hf_…)", ("hf_",), _word("h", r"f_[A-Za-z0-9]{30,}")),
    ("a Hugging Face organization token (api_org_…)", ("api_org_",), _word("a", r"pi_org_[A-Za-z0-9]{30,}")),
    (
        "an AWS access key id",
        ("A3T", "AKIA", "ASIA", "ABIA", "ACCA"),
        _word("A", r"(?:3T[A-Z0-9]|KIA|SIA|BIA|CCA)[A-Z0-9]{16}(?![A-Z0-9])", "[A-Z0-9]"),
    ),
    (
        "an AWS secret access key",
        ("ecret", "ECRET"),
        r"[Aa][Ww][Ss]_?(?i:secret_?(?:access_?)?key)[\"']?[ \t]*[:=][ \t]*[\"']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])",
    ),
    (
        "a GitHub token",
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
        _word("g", r"(?:h[pousr]_[A-Za-z0-9]{36,}|ithub_pat_[A-Za-z0-9_]{60,})"),
    ),
    ("a GitLab token", ("glpat-",), _word("g", r"lpat-[A-Za-z0-9_-]{20,}")),
    ("a Slack token", ("xox",), _word("x", r"ox[abposr]-(?:[0-9]+-)+[A-Za-z0-9]+")),
    (
        "a Slack webhook",
        ("hooks.slack.com",),
        r"https://hooks\.slack\.com/services/T[A-Za-z0-9_]+/B[A-Za-z0-9_]+/[A-Za-z0-9_]+",
    ),
    ("an Anthropic API key", ("sk-ant-",), _word("s", r"k-ant-[a-z]+[0-9]{2}-[A-Za-z0-9_-]{80,}")),
    (
        "an OpenAI API key",
        ("sk-",),
        _word("s", r"k-(?:(?:proj|svcacct|admin)-[A-Za-z0-9_-]{40,}|[A-Za-z0-9_-]*[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20})"),
    ),
    ("a Google API key", ("AIza",), _word("A", r"Iza[0-9A-Za-z_-]{35}")),
    ("a Stripe key", ("k_live_",), _word("[rs]", r"k_live_[0-9A-Za-z]{24,}")),
    ("a private key", ("PRIVATE KEY-----",), r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----"),
    ("a private key", ("PuTTY-User-Key-File-",), r"PuTTY-User-Key-File-[0-9]"),
    ("a JSON Web Token", ("eyJ",), _word("e", r"yJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*")),
    ("an Azure storage account key", ("AccountKey",), r"AccountKey[ \t]*=[ \t]*[A-Za-z0-9+/]{86}=="),
    ("an npm token", ("npm_",), _word("n", r"pm_[A-Za-z0-9]{36}(?![A-Za-z0-9])")),
    ("an npm token", ("/:_auth",), r"/:_auth(?:Token)?=[ \t]*[A-Za-z0-9+/=_-]{8,}"),
    ("a PyPI token", ("pypi-AgEIcHlwaS5vcmc",), _word("p", r"ypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}")),
    ("a Twilio key", ("AC",), _word("A", r"C[0-9a-f]{32}(?![A-Za-z0-9])", "[A-Za-z0-9]")),
    ("a Twilio key", ("SK",), _word("S", r"K[0-9a-f]{32}(?![A-Za-z0-9])", "[A-Za-z0-9]")),
    ("a SendGrid API key", ("SG.",), _word("S", r"G\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}")),
    # Found from the `-us` after 32 hex digits, and from the `://` of a URL, so that each starts with a literal.
    ("a Mailchimp API key", ("-us",), r"-(?<=(?<![A-Za-z0-9])[0-9a-f]{32}-)us[0-9]{1,2}(?![0-9])"),
    ("a password in a URL", ("://",), r":(?<=[A-Za-z0-9]:)//[^\s:/@\"'<>]+:[^\s/@\"'<>]+@"),
]
_ONE_TEXT = [re.compile(pattern) for _, _, pattern in SECRET_FORMATS]
_ONE_BYTES = [re.compile(pattern.encode("ascii")) for _, _, pattern in SECRET_FORMATS]
_ANCHORS_BYTES = [tuple(a.encode("ascii") for a in anchors) for _, anchors, _ in SECRET_FORMATS]


@functools.lru_cache(maxsize=64)
def _alternation(present: tuple[int, ...], binary: bool) -> re.Pattern:
    """One pattern for the formats numbered `present` (without groups, which would stop sre skipping ahead)."""
    source = "|".join(SECRET_FORMATS[i][2] for i in present)
    return re.compile(source.encode("ascii") if binary else source)


def _secrets_in(data, binary: bool) -> Iterator[tuple[int, int, str]]:
    """(start, end, what) of each known secret format in `data` (str or bytes)."""
    anchors = _ANCHORS_BYTES if binary else [anchors for _, anchors, _ in SECRET_FORMATS]
    present = tuple(i for i, found in enumerate(anchors) if any(a in data for a in found))
    if not present:
        return
    one = _ONE_BYTES if binary else _ONE_TEXT
    for match in _alternation(present, binary).finditer(data):
        # Which format matched: the alternation took the first one that matches here (matches are rare).
        what = next(SECRET_FORMATS[i][0] for i in present if one[i].match(data, match.start()))
        yield match.start(), match.end(), what


# Names of environment variables whose values are secrets: the value itself is looked for.
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH", re.IGNORECASE)
_MIN_SECRET = 8  # shorter values ("true", "1") would be found everywhere

# Card-only: local paths and environment references, which a model card must not show.
_PATH_START = r"(?:(?<=^)|(?<=[\s\"'`(\[{=,:;*|>]))"
_SEGMENT = r"[A-Za-z0-9._~@+%-]+"
_WELL_KNOWN_ROOTS = "home|Users|root|tmp|mnt|scratch|data|local|opt|srv|media|workspace|gpfs|lustre|nfs|Volumes"
_PATHS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\$\{[^}\n]*\}"), "an environment reference"),
    (re.compile(r"\$[A-Za-z_][A-Za-z0-9_]*[\\/]|%[A-Za-z_][A-Za-z0-9_]*%[\\/]"), "an environment reference"),
    (re.compile(r"(?<![A-Za-z0-9])[A-Za-z]:[\\/]+[^\s|`'\"<>]*"), "a Windows path"),
    (re.compile(r"(?<![\w\\])\\{2,}[A-Za-z0-9._$-]+\\+[A-Za-z0-9._$-]+[^\s|`'\"<>]*"), "a network (UNC) path"),
    (re.compile(r"(?<![\w/.~-])~(?:[A-Za-z_][A-Za-z0-9._-]*)?[\\/][^\s|`'\"<>]*"), "a home-relative path"),
    (
        re.compile(
            _PATH_START + rf"/(?:(?:{_SEGMENT}/)+{_SEGMENT}?|(?:{_WELL_KNOWN_ROOTS})(?![A-Za-z0-9._-]))[^\s|`'\"<>]*",
            re.MULTILINE,
        ),
        "an absolute path",
    ),
]
_ESCAPABLE = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_PATHLIKE = re.compile(r"^(?:/|~|[A-Za-z]:[\\/]|\\\\)")

# Weights are scanned through their safetensors header (metadata is free text); other large binary
# files are not text anyone reads, and reading them whole would cost more than the publish.
_HEADER_ONLY = ".safetensors"
_BINARY_LIMIT = 64 << 20


@dataclass(frozen=True)
class Leak:
    """Something secret- or path-shaped in published text, and where (line and column from 1)."""

    line: int
    col: int
    what: str
    section: str = ""  # in a card: the heading it falls under

    def __str__(self) -> str:
        where = f" ({self.section})" if self.section else ""
        return f"line {self.line}:{self.col}{where} contains {self.what}"


def secret_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment variables whose names say they hold a secret, long enough to look for."""
    environ = os.environ if environ is None else environ
    return {name: value for name, value in sorted(environ.items()) if _SECRET_NAME.search(name) and len(value) >= _MIN_SECRET}


def find_leaks(text: str, environ: Mapping[str, str] | None = None) -> list[Leak]:
    """Every path- or secret-shaped thing in a card's `text`, including values of secret or path-valued environment variables."""
    environ = os.environ if environ is None else environ
    # Scan the text as a reader sees it: `hf\_abc` in the Markdown is `hf_abc` on the page.
    plain, where = _unescaped(text)
    # (start, end, rank, what): environment values first, so a token is named by its variable.
    candidates: list[tuple[int, int, int, str]] = []
    secrets = secret_environ(environ)
    for name, value in secrets.items():
        for match in re.finditer(re.escape(value), plain):
            candidates.append((match.start(), match.end(), 0, f"the value of environment variable {name}"))
    for name, value in sorted(environ.items()):
        if not _SECRET_NAME.search(name) and _PATHLIKE.match(value) and len(path := value.rstrip("/\\")) >= 5:
            for match in re.finditer(r"(?<![\w./\\-])" + re.escape(path) + r"(?![\w.-])", plain):
                candidates.append((match.start(), match.end(), 0, f"the value of environment variable {name} (a path)"))
    for start, end, what in _secrets_in(plain, binary=False):
        candidates.append((start, end, 1, what))
    for rank, (pattern, what) in enumerate(_PATHS, 2):
        for match in pattern.finditer(plain):
            shown = match.group()
            shown = shown if len(shown) <= 60 else shown[:57] + "…"
            candidates.append((match.start(), match.end(), rank, f"{what} '{shown}'"))
    leaks: list[Leak] = []
    for start, what in _one_per_place(candidates):
        at = where[start]
        line = text.count("\n", 0, at) + 1
        col = at - (text.rfind("\n", 0, at) + 1) + 1
        leaks.append(Leak(line, col, what, _section_at(text, at)))
    return leaks


def find_secrets(data: bytes, environ: Mapping[str, str] | None = None) -> list[Leak]:
    """Every secret in `data` (any file's bytes): a known token format, or the value of a secret environment variable."""
    # (start, end, rank, what): environment values first, so a token is named by its variable.
    candidates: list[tuple[int, int, int, str]] = []
    for name, value in secret_environ(environ).items():
        needle = value.encode("utf-8", "surrogateescape")
        start = data.find(needle)
        while start >= 0:
            candidates.append((start, start + len(needle), 0, f"the value of environment variable {name}"))
            start = data.find(needle, start + 1)
    for start, end, what in _secrets_in(data, binary=True):
        candidates.append((start, end, 1, what))
    leaks: list[Leak] = []
    for start, what in _one_per_place(candidates):
        line_start = data.rfind(b"\n", 0, start) + 1
        col = len(data[line_start:start].decode("utf-8", "replace")) + 1
        leaks.append(Leak(data.count(b"\n", 0, start) + 1, col, what))
    return leaks


def _one_per_place(candidates: list[tuple[int, int, int, str]]) -> list[tuple[int, str]]:
    """(start, what) of each candidate not overlapping an earlier one; at one place the lowest rank wins
    (a token is named by its environment variable; a Windows path also looks like a UNC path once its
    backslashes are escaped)."""
    kept: list[tuple[int, str]] = []
    covered = -1
    for start, end, _, what in sorted(candidates, key=lambda c: (c[0], c[2])):
        if start >= covered:
            kept.append((start, what))
            covered = end
    return kept


def scan_file(path: Path, environ: Mapping[str, str] | None = None) -> list[Leak]:
    """The secrets in one file about to be published (for safetensors weights: in their header)."""
    with open(path, "rb") as fh:
        if path.name.endswith(_HEADER_ONLY):
            head = fh.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else 0
            # A header is JSON text; past a sane size it is not a header, and the merge wrote it anyway.
            data = fh.read(min(size, 100 << 20))
        else:
            data = fh.read(_BINARY_LIMIT + 1)
            if len(data) > _BINARY_LIMIT and b"\0" in data[:8192]:
                return []
            data += fh.read()
    return find_secrets(data, environ)


def _unescaped(text: str) -> tuple[str, list[int]]:
    """`text` without Markdown backslash escapes, and the offset in `text` of each character kept."""
    chars: list[str] = []
    where: list[int] = []
    i = 0
    while i < len(text):
        where.append(i)
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPABLE:
            i += 1
        chars.append(text[i])
        i += 1
    return "".join(chars), where


def _section_at(text: str, offset: int) -> str:
    before = text[:offset]
    if before.startswith("---\n") and before.count("\n---\n") == 0:
        return "front matter"
    headings = re.findall(r"^#{2,6} +(.+)$", before, re.MULTILINE)
    return headings[-1].strip() if headings else "title"
