"""Publish targets: where a merged, smoke-tested model and its card go."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from ..errors import PublishError
from ..files import sha256_file

if TYPE_CHECKING:
    from ..recipe import Recipe
    from ..reports import Eval, Family, FileRecord, Provenance, Smoke

CARD_NAME = "README.md"
# What every publish writes beside the merge's own files (the signature only when signed): an earlier
# publish of ours put them there, so a target may replace or remove them.
def release_files() -> tuple[str, ...]:
    """The files every publish writes beside the merge's outputs: card, reports, recipe, lock, signature."""
    from ..release import LOCK_FILE, RECIPE_FILE
    from ..reports import EVAL_FILE, PROVENANCE_FILE, SMOKE_FILE
    from ..signing import SIGNATURE_FILE

    return (CARD_NAME, PROVENANCE_FILE, SMOKE_FILE, EVAL_FILE, RECIPE_FILE, LOCK_FILE, SIGNATURE_FILE)


class TargetOptions(BaseModel):
    """Base for a target's options in a recipe's `publish:` list: strict, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", strict=True, defer_build=True)

    # Refuse to publish here unsigned (see the recipe's `sign:` block and registry.signing).
    require_signature: bool = False


@dataclass(frozen=True)
class FileEntry:
    """One file of a bundle: where it lies here and its content hash.

    `path` is None for a file kept from the published version (a card-only publish on a machine
    without the build): the target already holds these exact bytes and must not need them again.
    """

    path: Path | None
    sha256: str
    size: int


@dataclass(frozen=True)
class Published:
    """What a target holds under a merge identity: its card's hash and, where it can read them back, its reports.

    With reports, a card can be re-rendered without the build folder; a target that cannot read them
    back (an MLflow registry) gives only the two identities.
    """

    merge_identity: str
    card_identity: str
    provenance: Provenance | None = None
    smoke: Smoke | None = None
    evaluation: Eval | None = None


@dataclass
class Bundle:
    """Everything a target publishes for one recipe: the model folder's files, its reports and its card.

    Targets read the reports and the card from here, never from the files again.
    """

    repo_id: str
    recipe_sha256: str
    pins: dict[str, Any]
    files: dict[str, FileEntry]  # path in repo -> file here
    provenance: Provenance
    smoke: Smoke | None
    card: str  # README.md as rendered
    evaluation: Eval | None = None  # eval.json, when the recipe has an eval: section

    @property
    def metadata(self) -> dict[str, Any]:
        """The card's front matter, parsed (the card was checked when it was rendered)."""
        from ..frontmatter import load

        return load(self.card)[0] or {}

    @property
    def short_sha(self) -> str:
        """The first 12 hex digits of the recipe sha256, as used in versions and tags."""
        return self.recipe_sha256[:12]

    def commit_message(self) -> str:
        """The commit message every target uses: it names the recipe and its hash."""
        return f"Publish {self.repo_id} from recipe sha256:{self.recipe_sha256}"


@dataclass
class PublishResult:
    """What a target did: where the model is, which revision, and whether anything changed."""

    target: str
    location: str
    revision: str | None
    changed: bool
    detail: str = ""
    kept: list[str] = field(default_factory=list)  # files there that no publish of ours put there, left alone
    notes: list[str] = field(default_factory=list)  # what the target tidied up on the way, for the user
    # The model this result is about (a family's hook matches results to its points by it); None for a family's own result.
    repo_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "target": self.target, "location": self.location, "revision": self.revision,
            "changed": self.changed, "detail": self.detail, "kept": self.kept, "notes": self.notes,
        }


@dataclass
class PublishPlan:
    """What a target would send for a bundle: the files to upload and to delete, or nothing."""

    target: str
    location: str
    up_to_date: bool
    upload: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    upload_bytes: int = 0
    kept: list[str] = field(default_factory=list)  # files not in the bundle that no publish of ours put there

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "target": self.target, "location": self.location, "up_to_date": self.up_to_date,
            "upload": self.upload, "delete": self.delete, "upload_bytes": self.upload_bytes, "kept": self.kept,
        }


class Target:
    """A publish target; plugins subclass it and register it through `register_targets`."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = TargetOptions
    # True when the target can take a card-only bundle: files with no local path, which it keeps from
    # the version it holds. A target that needs every file's bytes sets False; the pipeline then
    # builds the model (merging again if the build folder is gone) before publishing to it.
    card_only: ClassVar[bool] = False

    def check_access(self, recipe: Recipe, options: BaseModel) -> None:
        """Raise PublishError now if this target will refuse the publish (a token that may not write, say).

        Called for every target before any work, --dry-run included, so it must be cheap.
        """

    def current(self, recipe: Recipe, merge_id: str, options: BaseModel) -> Published | None:
        """What the target holds for `recipe.repo_id` when that is an intact build with this merge identity; else None.

        Called before any merge, so it must not need the model files (nor import torch). The pipeline,
        not the target, decides from it whether the target is current (same merge, same card).
        """
        return None

    def plan(self, bundle: Bundle, options: BaseModel) -> PublishPlan:
        """What `publish` would send (for --dry-run), without changing anything."""
        raise NotImplementedError

    def publish(self, bundle: Bundle, options: BaseModel) -> PublishResult:
        """Publish the bundle; atomic: on failure the target is left as it was."""
        raise NotImplementedError

    def publish_family(self, family: Family, results: list[PublishResult], options: BaseModel) -> PublishResult | None:
        """Record a family (weight sweep) once its points are published here; None when there is nothing to record.

        Called once per target after every point of a sweep, with this target's result for each point it
        published or found already published (matched to `family.points` by `PublishResult.repo_id`); a
        point that failed or was not selected has no result. Must be idempotent: a second call with the
        same family changes nothing. The default records nothing, so a target without families needs nothing.
        """
        return None


def published(merge_id: str, card: str, provenance: Provenance | None = None, smoke: Smoke | None = None,
              evaluation: Eval | None = None) -> Published:
    """A `Published` for a version whose card text the target read back."""
    from ..identity import card_identity

    return Published(merge_id, card_identity(card), provenance, smoke, evaluation)


def bundle_files(
    model_dir: Path, known: dict[str, FileRecord] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, FileEntry]:
    """Every file of a finished model folder (card included), with sha256s, reusing `known` hashes (provenance's files).

    Raises PublishError when any of them holds a secret (see `check_no_secrets`), so no target receives it.
    """
    known = known or {}
    files: dict[str, FileEntry] = {}
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir).as_posix()
        if not path.is_file() or any(part.startswith(".") for part in rel.split("/")):
            continue
        size = path.stat().st_size
        info = known.get(rel)
        sha = info.sha256 if info is not None and info.size == size else sha256_file(path)
        files[rel] = FileEntry(path, sha, size)
    check_no_secrets(files, environ)
    return files


def card_only_files(
    provenance: Provenance, folder: Path, environ: Mapping[str, str] | None = None, extra: Sequence[str] = ()
) -> dict[str, FileEntry]:
    """A card-only bundle's files: the merge's outputs kept from the published version (no local path), and
    the card, reports and `extra` files (a family's chart) from `folder`. Raises PublishError when those hold a secret."""
    from ..reports import EVAL_FILE
    from ..signing import SIGNATURE_FILE

    files = {rel: FileEntry(None, f.sha256, f.size) for rel, f in provenance.files.items()}
    for rel in [*release_files(), *extra]:
        path = folder / rel
        if rel in (SIGNATURE_FILE, EVAL_FILE) and not path.is_file():
            continue
        files[rel] = FileEntry(path, sha256_file(path), path.stat().st_size)
    check_no_secrets(files, environ)
    return dict(sorted(files.items()))


def check_no_secrets(files: Mapping[str, FileEntry], environ: Mapping[str, str] | None = None) -> None:
    """Raise PublishError naming the first file, line and kind of secret found in `files` (never the secret itself)."""
    from ..leaks import scan_file

    # A kept file (no path here) was scanned when it was first published.
    found = [(rel, leak) for rel, entry in sorted(files.items()) if entry.path is not None
             for leak in scan_file(entry.path, environ)]
    if not found:
        return
    rel, leak = found[0]
    more = f" ({len(found) - 1} more)" if len(found) > 1 else ""
    raise PublishError(
        f"{rel}:{leak.line}:{leak.col} holds {leak.what}{more}; nothing was published",
        "remove it from the source, report or template the file came from, then publish again",
    )


PIN_FIELDS = ("kind", "repo_id", "revision", "content_sha256")
