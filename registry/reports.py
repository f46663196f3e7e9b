"""The files stages leave for each other: one pydantic model each, read and written only here.

`provenance.json` (merge), `smoke.json` (smoke), `eval.json` (eval), `family.json` (sweep) each carry a `format` version. A reader gets a typed
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
EVAL_FILE = "eval.json"
FAMILY_FILE = "family.json"
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


class ParityEntry(_Model):
    """One model's NLL on the fixed text and its retrieval over the prompts the merge also ran.

    A parent's row also holds KL(parent || merge), the mean per-token KL divergence in nats over the
    comparison prompts' next-token distributions, and the share of those positions where both pick the
    same top token (None: not compared, or the merged row itself).
    """

    model: str
    nll: float | None
    long_retrieved: int
    long_total: int
    kl: float | None = None
    top1_agreement: float | None = None


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

    def failed(self) -> list[CheckEntry]:
        """The checks that failed."""
        return [c for c in self.checks if c.status == "failed"]

    @property
    def longest_retrieved(self) -> int | None:
        """The longest prompt whose pass key was retrieved."""
        return max((r.tokens for r in self.long if r.status == "retrieved"), default=None)


# ---------------------------------------------------------------------------------------------
# A parent's cached measurements (build_root()/parents/<pin12>-<settings12>/parent.safetensors)


class ParentShortEntry(ShortEntry):
    """A parent's short generation with the measures the short check compares against."""

    finite: bool
    logit_std: float | None  # None: not finite
    repeated_ngrams: float
    longest_run: int


class ParentMeasurements(Report):
    """What a parent did under one set of smoke settings, cached by its pin so a family runs each parent once.

    The file is a safetensors file: this JSON is its metadata entry `registry`, beside the tensor
    `logprobs` (next-token log-probs at every position of the comparison prompts, float32).
    """

    FILE: ClassVar[str] = "parent.safetensors"
    FORMAT: ClassVar[int] = 1
    STAGE: ClassVar[str] = "smoke"

    format: Literal[1] = 1
    pin: str
    settings: str  # the hash of the smoke settings that shape these measurements
    nll: float | None = None
    short: ParentShortEntry | None = None
    short_missing: str | None = None  # why there is no short generation (no chat template)
    long: list[LongEntry] = []  # the prompts run so far, one per (tokens, depth), none skipped
    prompts: list[list[int]] | None = None  # the comparison prompts' token ids, when log-probs are held


# ---------------------------------------------------------------------------------------------
# eval.json


class MetricScore(_Model):
    """One metric of one task: its value and standard error (None where the evaluator gives none, or not finite)."""

    value: float | None
    stderr: float | None = None


class TaskScores(_Model):
    """One task's scores: the task's version, how many samples were scored, each metric by name."""

    version: str | None
    samples: int
    metrics: dict[str, MetricScore]


class GateRow(_Model):
    """One gate rule judged: the merge's value against the better parent's, allowed to drop by `max_drop`."""

    task: str
    metric: str
    max_drop: float
    value: float | None
    parent: str | None  # alias of the better parent (None: no parent had the metric)
    parent_value: float | None
    passed: bool
    reason: str


class Eval(Report):
    """Benchmark scores of a merge and of its parents under the same settings; the eval identity keys it.

    `tasks` maps task → metric → value/stderr; `parents` maps each parent's alias to the same shape.
    """

    FILE: ClassVar[str] = EVAL_FILE
    FORMAT: ClassVar[int] = 1
    STAGE: ClassVar[str] = "eval"

    format: Literal[1] = 1
    eval_identity: str | None = None  # None: run on a folder without a recipe
    merge_identity: str | None = None
    evaluator: str
    evaluator_version: str
    config_sha256: str  # hash of the eval settings (tasks, limit, generation, batch size, options)
    device: str
    limit: int | None = None
    tasks: dict[str, TaskScores]
    parents: dict[str, dict[str, TaskScores]] = {}
    gate: list[GateRow] = []
    passed: bool

    def failed(self) -> list[GateRow]:
        """The gate rows that failed."""
        return [g for g in self.gate if not g.passed]


# ---------------------------------------------------------------------------------------------
# family.json


class Retrieved(_Model):
    """Pass keys retrieved out of the prompts run."""

    retrieved: int
    total: int


class FamilyRow(_Model):
    """One member of a family (a point) or one of its endpoints (a parent), with what was measured on it.

    `kl` and `top1` map each parent's alias to the KL divergence (nats per token) and top-1 agreement
    against it; `scores` maps `TASK/METRIC` to an evaluation score. None: not measured.
    """

    kind: Literal["point", "parent"]
    label: str  # `cos=0.3 fmt=0.7` for a point, the alias for a parent
    weights: dict[str, float]  # the swept aliases' weights (a parent: itself 1, the others 0)
    repo_id: str | None = None  # a parent's only when it is a Hub source
    merge_identity: str | None = None
    state: str  # planned, merged, tested, published (a point); parent
    smoke_passed: bool | None = None
    nll: float | None = None
    retrieved: Retrieved | None = None  # over every length
    retrieval: dict[int, Retrieved] = {}  # context tokens → retrieved
    kl: dict[str, float | None] = {}
    top1: dict[str, float | None] = {}
    scores: dict[str, MetricScore] = {}
    selected: bool = False
    published: list[str] = []  # where it went: `hf:ORG/NAME`, `local:PATH`

    @property
    def nearest_parent(self) -> str | None:
        """The parent this row is closest to by KL (None when no KL was measured)."""
        known = [(v, alias) for alias, v in self.kl.items() if v is not None and math.isfinite(v)]
        return min(known)[1] if known else None


class Family(Report):
    """A sweep's points and its parents side by side: the family report, keyed by the sweep recipe's hash."""

    FILE: ClassVar[str] = FAMILY_FILE
    FORMAT: ClassVar[int] = 1
    STAGE: ClassVar[str] = "sweep"

    format: Literal[1] = 1
    family: str
    recipe_sha256: str
    aliases: list[str]  # the swept aliases, in the recipe's order
    axes: list[str] = []  # those that vary independently; the first is the chart's x axis
    selection: str  # `passed`, `best:METRIC` or `best:METRIC:N`
    rows: list[FamilyRow]

    @property
    def points(self) -> list[FamilyRow]:
        """The point rows, in the sweep's order."""
        return [r for r in self.rows if r.kind == "point"]

    @property
    def parents(self) -> list[FamilyRow]:
        """The parent rows (the family's endpoints)."""
        return [r for r in self.rows if r.kind == "parent"]


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
    "EVAL_FILE", "FAMILY_FILE", "PROVENANCE_FILE", "SMOKE_FILE", "CheckEntry", "Eval", "Family", "FamilyRow", "FileRecord",
    "GateRow", "LongEntry", "MetricScore", "ParentMeasurements", "ParentShortEntry", "ParityEntry", "Provenance", "Report",
    "ReportError", "Retrieved", "ShortEntry", "Smoke", "SourcePin", "TaskScores", "data", "dumps", "parse", "read",
    "read_current", "write",
]
