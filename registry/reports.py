"""The files stages leave for each other: one pydantic model each, read and written only here.

`provenance.json` (merge), `smoke.json` (smoke) each carry a `format` version. A reader gets a typed
report or a one-line `ReportError` naming the file; nobody else opens these files or digs into
their JSON. Writes go to a new file renamed over the old one, so a published copy hard-linked to
the old one keeps its content.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import OlderReportError, ReportError

PROVENANCE_FILE = "provenance.json"
SMOKE_FILE = "smoke.json"
# Reports are small; anything past this is not one of ours.
MAX_REPORT_BYTES = 64 * 1024 * 1024


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Report(_Model):
    """A file one stage writes and later stages read."""

    FILE: ClassVar[str]
    FORMAT: ClassVar[int]
    # Written by the stage that makes the file; the hint says how to make it again.
    STAGE: ClassVar[str]


# ---------------------------------------------------------------------------------------------
# provenance.json


class WeightFilterEntry(_Model):
    """A per-tensor weight: the first filter that is a substring of a tensor name (or `*`) applies."""

    filter: str | None = None
    value: float


class SourcePin(_Model):
    """A source of the merge as provenance records it: what was read, never a local path or a label."""

    kind: Literal["local", "hub"]
    repo_id: str | None = None  # a Hub source's repo
    revision: str | None = None  # its commit sha
    content_sha256: str | None = None  # a local source's weights
    weight: float | list[WeightFilterEntry] | None = None

    @property
    def pin(self) -> str:
        """The commit sha (Hub) or content sha256 (local)."""
        return (self.revision if self.kind == "hub" else self.content_sha256) or ""


class FileRecord(_Model):
    """One output file: its sha256 and size."""

    sha256: str
    size: int


class Provenance(Report):
    """What a merge was made of and what it wrote: merge facts only, keyed by the merge identity.

    Text fields (repo id, summary, labels, license) are the card's: editing them reuses the merge,
    so they must not be recorded here.
    """

    FILE: ClassVar[str] = PROVENANCE_FILE
    FORMAT: ClassVar[int] = 2
    STAGE: ClassVar[str] = "merge"

    format: Literal[2] = 2
    merge_identity: str
    merge_method: str
    normalize: bool | None = None
    dtype: str
    sources: dict[str, SourcePin]
    config_donor: str
    files: dict[str, FileRecord]
    versions: dict[str, str]
    device: str


# ---------------------------------------------------------------------------------------------
# smoke.json


class CheckEntry(_Model):
    """The verdict of one smoke check; `details` is the check's own data."""

    name: str
    status: Literal["passed", "failed", "skipped"]
    reason: str
    details: dict[str, Any] = {}


class ShortEntry(_Model):
    """The short generation's sample."""

    prompt: str
    output: str
    new_tokens: int
    stopped: Literal["eos", "max_new_tokens"]


class LongEntry(_Model):
    """One needle-in-a-haystack prompt."""

    tokens: int
    depth: float
    status: Literal["retrieved", "missed", "skipped"]
    reason: str | None = None
    finite: bool | None = None
    seconds: float | None = None
    peak_memory_bytes: int | None = None
    key: str | None = None
    output: str | None = None
    estimated_memory_bytes: int | None = None
    prefill_chunk_size: int | None = None
    estimated_seconds: float | None = None


class PlannedEntry(_Model):
    """One run the smoke plan estimated before the first generation."""

    model: str  # "merged" or a parent's name
    what: Literal["load", "short", "nll", "long"]
    seconds: float
    tokens: int | None = None
    depth: float | None = None
    status: Literal["planned", "skipped"] = "planned"


class EstimateEntry(_Model):
    """The time estimate: measured throughput, the budget, every planned run (smoke_plan.py)."""

    total_seconds: float  # of the runs planned, skipped lengths excluded
    budget_seconds: float | None = None
    budget_setting: str | None = None
    linear_flops: float | None = None
    attention_flops: float | None = None
    step_seconds: float | None = None
    load_seconds: float | None = None
    runs: list[PlannedEntry] = []


class SkippedLength(_Model):
    """A long-context length the time budget left out, with what all its prompts would have taken."""

    tokens: int
    estimated_seconds: float
    reason: str


class ParityEntry(_Model):
    """One model's NLL on the fixed text and its retrieval over the prompts the merge also ran."""

    model: str
    nll: float | None
    long_retrieved: int
    long_total: int


class Smoke(Report):
    """What the smoke test found; the smoke identity (merge identity + smoke settings) keys it."""

    FILE: ClassVar[str] = SMOKE_FILE
    FORMAT: ClassVar[int] = 3
    STAGE: ClassVar[str] = "smoke"

    format: Literal[3] = 3
    smoke_identity: str | None = None  # None: run on a folder without a recipe
    merge_identity: str | None = None
    passed: bool
    device: str
    checks: list[CheckEntry]
    short: ShortEntry | None = None
    long: list[LongEntry] = []
    parity: list[ParityEntry] = []
    dtype: str | None = None  # what the models computed in
    dtype_reason: str | None = None
    estimate: EstimateEntry | None = None
    skipped: list[SkippedLength] = []
    not_checked: list[str] = []  # what the verdict did not check, with why

    def failed(self) -> list[CheckEntry]:
        """The checks that failed."""
        return [c for c in self.checks if c.status == "failed"]

    @property
    def longest_retrieved(self) -> int | None:
        """The longest prompt whose pass key was retrieved."""
        return max((r.tokens for r in self.long if r.status == "retrieved"), default=None)


# ---------------------------------------------------------------------------------------------
# Reading and writing

R = TypeVar("R", bound=Report)


def parse(kind: type[R], text: str | bytes, where: str) -> R:
    """`text` as a `kind` report; a one-line ReportError naming `where` otherwise."""
    hint = f"run `registry {kind.STAGE}` again to rewrite it"
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReportError(f"{where}: not valid JSON ({exc})", hint) from None
    if not isinstance(data, dict):
        raise ReportError(f"{where}: expected a JSON object", hint)
    if data.get("format") != kind.FORMAT:
        found = data.get("format")
        older = type(found) is int and 0 < found < kind.FORMAT
        # An older format is a known state (the report of an earlier publish), not damage: readers may show it as such.
        error = OlderReportError if older else ReportError
        raise error(f"{where}: unknown {kind.FILE} format {json.dumps(found)} (this registry reads format {kind.FORMAT})", hint)
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ReportError(f"{where}: {field}: {first['msg']}", hint) from None


def read(kind: type[R], folder: str | Path) -> R | None:
    """The `kind` report in `folder`, or None when there is none."""
    path = Path(folder) / kind.FILE
    try:
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise ReportError(f"{path}: not a regular file", f"remove it and run `registry {kind.STAGE}` again")
        if path.stat().st_size > MAX_REPORT_BYTES:
            raise ReportError(f"{path}: larger than any {kind.FILE} this registry writes", f"run `registry {kind.STAGE}` again")
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    return parse(kind, text, str(path))


def read_current(kind: type[R], folder: str | Path) -> R | None:
    """Like `read`, but a corrupt or outdated report counts as none (the stage simply runs again)."""
    try:
        return read(kind, folder)
    except ReportError:
        return None


def data(report: Report) -> dict[str, Any]:
    """The report as the plain JSON data its file holds (non-finite numbers become null)."""
    return _finite(report.model_dump(mode="json"))


def dumps(report: Report) -> str:
    """The report as the JSON its file holds."""
    return json.dumps(data(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write(report: Report, folder: str | Path) -> Path:
    """Write `report` into `folder` atomically and return its path."""
    from .files import replace_atomically

    path = Path(folder) / report.FILE
    replace_atomically(path, dumps(report).encode("utf-8"))
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


__all__ = [
    "PROVENANCE_FILE", "SMOKE_FILE", "CheckEntry", "EstimateEntry", "FileRecord", "LongEntry", "ParityEntry", "PlannedEntry", "Provenance", "Report",
    "ReportError", "ShortEntry", "SkippedLength", "Smoke", "SourcePin", "data", "dumps", "parse", "read", "read_current", "write",
]
