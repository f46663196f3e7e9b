"""CI: which recipes a change touches (a GitHub Actions matrix) and the Markdown summary a pull request shows.

`changed` reads the change from git (`git diff --name-status -z -M <merge-base>...HEAD`, as bytes), never
from the file system, so it sees renames and deletions and reads every file name exactly; a change under `templates/` touches every recipe (it
changes their cards) and a change to `x.lock.json` touches `x.yaml`. `summary` validates each touched
recipe, renders its card, compares its merge settings with the base version (`git show <base>:<path>`)
and shows the dry run's smoke report when one was downloaded, all within GitHub's comment limit.
A sweep recipe is one matrix entry per point (`point`, `label`, `family`, `repo_id`, a slug of its
own), and its summary groups the points under one heading with the family table.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import RecipeError, RegistryError, ReportError, UsageError
from .markdown import cell, code, fenced, longest_run
from .recipe import ModelRef, Recipe, env_names, load_recipe, parse_recipe
from .reports import Provenance, Smoke
from .reports import read as read_report

RECIPES_DIR = "recipes"
EXAMPLES_DIR = "recipes/examples"
TEMPLATES_DIR = "templates"
RECIPE_SUFFIXES = (".yaml", ".yml")
LOCK_SUFFIX = ".lock.json"
# The reasons that name another file; the Markdown shows that name as code.
RENAMED_FROM = "renamed from "
COPIED_FROM = "copied from "
ZERO_SHA = "0" * 40
COMMENT_LIMIT = 65_536
# Room left for what the comment workflow adds around the summary: its marker line and a link to the run.
SUMMARY_LIMIT = COMMENT_LIMIT - 1_024
COMMENT_MARKER = "<!-- registry-ci-summary -->"
# A hosted runner has 16 GB of RAM and ~14 GB of free disk: the sources, their merge and a smoke run must fit.
DEFAULT_MAX_SOURCE_GB = 2.0
GB = 1_000_000_000

_FENCE_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_OUTPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


# ---------------------------------------------------------------------------------------------
# git


def git_bytes(args: Sequence[str], cwd: Path | None = None) -> bytes:
    """Run git and return its stdout as bytes; raises RegistryError with git's own message when it fails."""
    # Bytes, never text mode: text mode reads a \r in a file name as a line break.
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)
    except FileNotFoundError:
        raise RegistryError("git is not installed", "install git: registry ci reads the change from the repository") from None
    if done.returncode != 0:
        stderr = done.stderr.decode("utf-8", "replace")
        message = (stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise RegistryError(f"git {' '.join(args[:2])} failed: {message}")
    return done.stdout


def git(args: Sequence[str], cwd: Path | None = None) -> str:
    """Run git and return its stdout as text (bytes that are not UTF-8 kept as surrogates, as file names are)."""
    return git_bytes(args, cwd).decode("utf-8", "surrogateescape")


def git_paths(args: Sequence[str], cwd: Path | None = None) -> list[str]:
    """The NUL-separated fields a `git ... -z` command prints, each exactly as stored (see utf8_name)."""
    return git_bytes(args, cwd).decode("utf-8", "surrogateescape").split("\0")


def utf8_name(path: str) -> str:
    """`path` itself when it is UTF-8; a RegistryError naming it when git holds bytes that are not."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise RegistryError(
            f"the file name '{shown}' is not UTF-8",
            "rename it: recipe and template file names appear in job names, summaries and JSON",
        ) from None
    return path


def repo_root(cwd: Path | None = None) -> Path:
    """The top folder of the git work tree holding `cwd`."""
    try:
        return Path(git(["rev-parse", "--show-toplevel"], cwd).removesuffix("\n"))
    except RegistryError:
        raise UsageError(f"{Path(cwd or '.').resolve()} is not inside a git repository", "run registry ci from a clone of the recipes repo") from None


def _is_commit(ref: str, root: Path) -> bool:
    done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=root, capture_output=True, check=False)
    return done.returncode == 0


def default_base(root: Path, environ: Mapping[str, str] | None = None) -> str:
    """The ref a pull request is compared with: origin/$GITHUB_BASE_REF in Actions, else origin/main or main."""
    environ = os.environ if environ is None else environ
    if environ.get("GITHUB_BASE_REF"):
        return f"origin/{environ['GITHUB_BASE_REF']}"
    for candidate in ("origin/main", "main"):
        if _is_commit(candidate, root):
            return candidate
    raise UsageError("no base to compare with: neither origin/main nor main exists here", "pass --base REF")


def merge_base(base: str, root: Path) -> str:
    """The commit where HEAD left `base` (the sha itself for an ancestor, e.g. a push's `before`)."""
    if base.startswith("-") or not base.strip():
        raise UsageError(f"--base '{base}' is not a git ref")
    if not _is_commit(base, root):
        raise UsageError(
            f"base '{base}' is not a commit in this clone",
            "fetch the history (actions/checkout with fetch-depth: 0) or pass --base REF",
        )
    try:
        return git(["merge-base", base, "HEAD"], root).strip()
    except RegistryError:
        raise UsageError(
            f"'{base}' and HEAD have no common ancestor in this clone", "fetch the full history (fetch-depth: 0)"
        ) from None


def _head_files(root: Path, folder: str) -> list[str]:
    return [p for p in git_paths(["ls-tree", "-r", "-z", "--name-only", "HEAD", "--", folder], root) if p]


def _diff(base_sha: str, root: Path) -> list[tuple[str, str | None, str]]:
    """(status letter, old path or None, new path) for every file changed between `base_sha` and HEAD.

    Names under recipes/ and templates/ must be UTF-8 (utf8_name); others are never shown, so any bytes do.
    """
    tokens = git_paths(["diff", "--name-status", "-z", "-M", "--no-ext-diff", f"{base_sha}...HEAD"], root)
    entries: list[tuple[str, str | None, str]] = []
    i = 0
    while i < len(tokens) and tokens[i]:
        status = tokens[i][0]
        if status in "RC":
            entries.append((status, _watched(tokens[i + 1]), _watched(tokens[i + 2])))
            i += 3
        else:
            entries.append((status, None, _watched(tokens[i + 1])))
            i += 2
    return entries


def _watched(path: str) -> str:
    return utf8_name(path) if PurePosixPath(path).parts[0] in (RECIPES_DIR, TEMPLATES_DIR) else path


def is_recipe_path(path: str) -> bool:
    """True for a YAML file under recipes/ (hidden folders skipped, as `registry validate recipes/` does)."""
    parts = PurePosixPath(path).parts
    return (
        len(parts) > 1 and parts[0] == RECIPES_DIR and PurePosixPath(path).suffix in RECIPE_SUFFIXES
        and not any(part.startswith(".") for part in parts[1:])
    )


def lock_path(recipe: str) -> str:
    """The lock file `registry plan` writes beside a recipe: recipes/x.lock.json for recipes/x.yaml."""
    p = PurePosixPath(recipe)
    return str(p.with_name(p.stem + LOCK_SUFFIX))


def slug(path: str, point: int | None = None) -> str:
    """A name for artifacts and cache keys made from a recipe path: recipes-examples-toy.yaml (…-p3 for a sweep's point 3)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path).strip("-.") or "recipe"
    return name if point is None else f"{name}-p{point}"


# ---------------------------------------------------------------------------------------------
# Which recipes changed


@dataclass
class ChangedRecipe:
    """A recipe the change touches, and what CI can do with it on a hosted runner."""

    recipe: str
    reasons: list[str]
    renamed_from: str | None = None
    example: bool = False
    valid: bool = True
    plan: bool = False
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)
    repo_id: str = ""
    family: str = ""  # a sweep's family name; "" for a plain recipe
    points: list[tuple[int, str, str]] = field(default_factory=list)  # a sweep's (index, label, repo id)

    def to_dict(self, point: tuple[int, str, str] | None = None) -> dict[str, Any]:
        """One matrix entry (the recipe's, or one point's of a sweep): flat strings and booleans, so workflow expressions can read every field."""
        index, label, repo_id = point if point is not None else (None, "", self.repo_id)
        return {
            "recipe": self.recipe,
            "slug": slug(self.recipe, index),
            "lock": lock_path(self.recipe),
            "reason": "; ".join(self.reasons),
            "renamed_from": self.renamed_from or "",
            "example": self.example,
            "valid": self.valid,
            "plan": self.plan,
            "dry_run": self.dry_run,
            "note": "; ".join(self.notes),
            "point": "" if index is None else str(index),
            "label": label,
            "family": self.family,
            "repo_id": repo_id,
        }

    def entries(self) -> list[dict[str, Any]]:
        """The matrix entries: one per point of a sweep, else one for the recipe."""
        return [self.to_dict(p) for p in self.points] if self.points else [self.to_dict()]


@dataclass
class Changes:
    """What a change between `base` and HEAD does to the recipes."""

    base: str
    base_sha: str
    head_sha: str
    recipes: list[ChangedRecipe]
    deleted: list[str]
    templates: list[str]

    def matrix(self) -> dict[str, Any]:
        """The `strategy.matrix` value for a job per changed recipe, one per point of a changed sweep."""
        return {"include": [e for r in self.recipes for e in r.entries()]}

    def families(self) -> dict[str, Any]:
        """The `strategy.matrix` value for a job per changed sweep (the one that gathers its points)."""
        return {"include": [{"recipe": r.recipe, "slug": slug(r.recipe), "family": r.family, "points": str(len(r.points))}
                            for r in self.recipes if r.points]}

    def to_dict(self) -> dict[str, Any]:
        """Everything, as JSON-ready data."""
        include = self.matrix()["include"]
        families = self.families()["include"]
        return {
            "base": self.base,
            "base_sha": self.base_sha,
            "head_sha": self.head_sha,
            "count": len(include),
            "include": include,
            "families": families,
            "deleted": self.deleted,
            "templates": self.templates,
        }

    def find(self, recipe: str) -> ChangedRecipe | None:
        """The entry for `recipe`, if the change touches it."""
        return next((r for r in self.recipes if r.recipe == recipe), None)


HubSize = Callable[[ModelRef], int]


def compute_changes(
    base: str | None = None,
    *,
    root: Path | None = None,
    examples: bool = True,
    max_source_bytes: int = int(DEFAULT_MAX_SOURCE_GB * GB),
    hub_size: HubSize | None = None,
    environ: Mapping[str, str] | None = None,
) -> Changes:
    """The recipes touched between the merge base of `base` and HEAD (added, modified, renamed, deleted)."""
    root = root or repo_root()
    base = base or default_base(root, environ)
    head_sha = git(["rev-parse", "HEAD"], root).strip()
    head_recipes = [utf8_name(p) for p in _head_files(root, RECIPES_DIR) if is_recipe_path(p)]
    touched: dict[str, ChangedRecipe] = {}
    deleted: list[str] = []
    templates: list[str] = []

    def touch(path: str, reason: str, renamed_from: str | None = None) -> None:
        entry = touched.setdefault(path, ChangedRecipe(path, []))
        if reason not in entry.reasons:
            entry.reasons.append(reason)
        entry.renamed_from = entry.renamed_from or renamed_from

    if base == ZERO_SHA:
        # A push that created the branch has no `before`: every recipe is new to it.
        base_sha = ZERO_SHA
        for path in head_recipes:
            touch(path, "added")
    else:
        base_sha = merge_base(base, root)
        for status, old, new in _diff(base_sha, root):
            if old is not None and is_recipe_path(old) and not is_recipe_path(new) and status == "R":
                deleted.append(old)
            if is_recipe_path(new):
                if status == "D":
                    deleted.append(new)
                elif status == "R":
                    touch(new, RENAMED_FROM + old, renamed_from=old)
                elif status == "C":
                    touch(new, COPIED_FROM + old)
                else:
                    touch(new, "added" if status == "A" else "modified")
            elif new.endswith(LOCK_SUFFIX) and PurePosixPath(new).parts[0] == RECIPES_DIR:
                stem = new[: -len(LOCK_SUFFIX)]
                for recipe in (stem + suffix for suffix in RECIPE_SUFFIXES):
                    if recipe in head_recipes:
                        touch(recipe, "lock file changed")
            if PurePosixPath(new).parts[0] == TEMPLATES_DIR or (old and PurePosixPath(old).parts[0] == TEMPLATES_DIR):
                templates.append(new)
        if templates:
            for path in head_recipes:
                touch(path, "templates changed")

    recipes = [touched[p] for p in sorted(touched)]
    for entry in recipes:
        entry.example = _is_example(entry.recipe)
    if not examples:
        recipes = [r for r in recipes if not r.example]
    for entry in recipes:
        assess(entry, root, max_source_bytes, hub_size)
    return Changes(base, base_sha, head_sha, recipes, sorted(set(deleted)), sorted(set(templates)))


def _is_example(path: str) -> bool:
    return PurePosixPath(path).is_relative_to(EXAMPLES_DIR)


def assess(entry: ChangedRecipe, root: Path, max_source_bytes: int, hub_size: HubSize | None = None) -> None:
    """Decide whether a hosted runner can plan the recipe (reach its sources) and dry-run it (fit them)."""
    from .plugins import get_targets

    try:
        recipe = load_recipe(root / entry.recipe, targets=get_targets())
    except RecipeError:
        entry.valid = False
        entry.notes.append("invalid recipe: see registry validate")
        return
    entry.repo_id = recipe.repo_id
    if recipe.sweep is not None:
        entry.family = recipe.sweep.family
        entry.points = [(p.index, p.label, p.recipe.repo_id) for p in recipe.points()]
    if entry.example:
        # Example recipes merge the tiny checkpoints shipped in tests/fixtures/toy: small and offline.
        entry.plan = entry.dry_run = True
        entry.notes.append("example recipe: sources shipped in the repo")
        return
    total = 0
    known = True
    reachable = True
    for item in recipe.inputs():
        if item.ref.kind == "local":
            size = _local_weight_bytes(item.ref.value, (root / entry.recipe).parent)
            if size is None:
                reachable = False
                entry.notes.append(f"local source '{item.name}' is not in the checkout")
            else:
                total += size
            continue
        try:
            total += (hub_size or hub_weight_bytes)(item.ref)
        except Exception as exc:  # any failure only means "size unknown": the plan step reports the real error
            known = False
            entry.notes.append(f"size of '{item.name}' unknown: {_one_line(exc)}")
    entry.plan = reachable
    if not reachable or not known:
        return
    shown = f"sources total {total / GB:.2f} GB"
    if total <= max_source_bytes:
        entry.dry_run = True
        entry.notes.append(shown)
    else:
        entry.notes.append(f"{shown}, over the {max_source_bytes / GB:.2f} GB a hosted runner takes")


def _local_weight_bytes(path: str, recipe_dir: Path) -> int | None:
    """Bytes of a local source's weight files, found as `registry plan` finds them; None when they are not at hand."""
    from .sources import expand_local, weight_file_names

    if any(not os.environ.get(name) for name in env_names(path)):
        return None
    folder = expand_local(path, recipe_dir)
    try:
        return sum((folder / name).stat().st_size for name in weight_file_names(folder) if name.endswith(".safetensors"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def hub_weight_bytes(ref: ModelRef) -> int:
    """Bytes of a Hub model's safetensors files at the pinned revision (one metadata request, no download)."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(ref.value, revision=ref.revision, files_metadata=True)
    sizes = [s.size or 0 for s in info.siblings or [] if s.rfilename.endswith(".safetensors")]
    if not sizes:
        raise ValueError(f"{ref.value} has no .safetensors files")
    return sum(sizes)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def point_build(recipe_path: Path, index: int) -> dict[str, str]:
    """A sweep point's repo id, label, state and build folder (what its CI job uploads), as flat step outputs."""
    from .plugins import get_evaluators, get_targets
    from .sweep import pick, survey

    recipe = load_recipe(recipe_path, targets=get_targets(), evaluators=get_evaluators())
    if recipe.sweep is None:
        raise UsageError(f"{recipe_path} has no sweep: section; --point picks a point of a sweep recipe")
    pick(recipe, [index])  # a UsageError naming the valid range
    found = survey(recipe)[index]
    folder = found.model_dir
    with_cwd = folder.relative_to(Path.cwd()) if folder.is_relative_to(Path.cwd()) else folder
    return {"recipe": str(recipe_path), "point": str(index), "label": found.point.label, "family": recipe.sweep.family,
            "repo_id": found.point.recipe.repo_id, "state": found.state, "folder": with_cwd.as_posix(), "id": folder.name}


# ---------------------------------------------------------------------------------------------
# GitHub Actions files


def write_outputs(values: Mapping[str, str], environ: Mapping[str, str] | None = None) -> bool:
    """Append step outputs to $GITHUB_OUTPUT (name=value, or a heredoc block for multi-line values)."""
    target = (os.environ if environ is None else environ).get("GITHUB_OUTPUT")
    if not target:
        return False
    blocks = []
    for name, value in values.items():
        if not _OUTPUT_NAME.fullmatch(name):
            raise ValueError(f"not an output name: {name!r}")
        if "\n" in value or "\r" in value:
            # The delimiter is derived from the value, and a value holding it would need a hash fixed point.
            delimiter = "ghadelimiter_" + hashlib.sha256(value.encode()).hexdigest()[:24]
            assert delimiter not in value
            blocks.append(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")
        else:
            blocks.append(f"{name}={value}\n")
    _append(Path(target), "".join(blocks), "GITHUB_OUTPUT")
    return True


def write_step_summary(markdown: str, environ: Mapping[str, str] | None = None) -> bool:
    """Append Markdown to $GITHUB_STEP_SUMMARY, the page a workflow run shows."""
    target = (os.environ if environ is None else environ).get("GITHUB_STEP_SUMMARY")
    if not target:
        return False
    _append(Path(target), markdown if markdown.endswith("\n") else markdown + "\n", "GITHUB_STEP_SUMMARY")
    return True


def _append(path: Path, text: str, name: str) -> None:
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise RegistryError(f"cannot append to ${name} ({path}): {exc.strerror or exc}") from None


def changes_outputs(changes: Changes) -> dict[str, str]:
    """The step outputs of `registry ci changed`, as the workflows read them."""
    compact = {"separators": (",", ":"), "ensure_ascii": False}
    matrix, families = changes.matrix(), changes.families()
    return {
        "matrix": json.dumps(matrix, **compact),
        "count": str(len(matrix["include"])),
        "families": json.dumps(families, **compact),
        "family_count": str(len(families["include"])),
        "deleted": json.dumps(changes.deleted, **compact),
        "base": changes.base_sha,
    }


def changes_markdown(changes: Changes) -> str:
    """A short table of the touched recipes for the step summary."""
    lines = [f"### Recipes changed since {code(changes.base_sha[:12])}", ""]
    if changes.recipes:
        lines += ["| Recipe | Why | Plan | Dry run | Notes |", "|---|---|---|---|---|"]
        for r in changes.recipes:
            why = reasons_markdown(r.reasons, table=True)
            recipe = code(r.recipe, table=True) + _family_note(r)
            lines.append(f"| {recipe} | {why} | {_yes(r.plan)} | {_yes(r.dry_run)} | {cell('; '.join(r.notes))} |")
    else:
        lines.append("No recipe is touched.")
    if changes.deleted:
        lines += ["", "Deleted: " + ", ".join(code(p) for p in changes.deleted) + " (published models are left as they are)."]
    return "\n".join(lines) + "\n"


def _family_note(r: ChangedRecipe) -> str:
    return f" (family {code(r.family, table=True)}, {len(r.points)} points)" if r.points else ""


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def reasons_markdown(reasons: Sequence[str], table: bool = False) -> str:
    """Why a recipe is touched, as Markdown: the file a reason names as code, the rest as plain text."""
    parts = []
    for reason in reasons:
        prefix = next((p for p in (RENAMED_FROM, COPIED_FROM) if reason.startswith(p)), None)
        parts.append(prefix + code(reason[len(prefix):], table=table) if prefix else cell(reason))
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Markdown helpers


def utf8_len(text: str) -> int:
    """Length in UTF-8 bytes: never less than GitHub's count of characters or UTF-16 units."""
    return len(text.encode("utf-8"))


def cut_utf8(text: str, limit: int) -> str:
    """The longest prefix of `text` within `limit` UTF-8 bytes, not splitting a character or its combining marks."""
    if utf8_len(text) <= limit:
        return text
    cut = len(text.encode("utf-8")[: max(limit, 0)].decode("utf-8", "ignore"))
    while cut > 0 and _joins_previous(text[cut]):
        cut -= 1
    return text[:cut]


def _joins_previous(char: str) -> bool:
    # Combining marks, variation selectors and zero-width joiners belong to the character before them.
    return (
        bool(unicodedata.combining(char))
        or unicodedata.category(char) == "Me"
        or char in "\u200d\ufe0e\ufe0f"
        or "\U000e0020" <= char <= "\U000e007f"
    )


def _fence_after(line: str, fence: tuple[str, int] | None) -> tuple[str, int] | None:
    """The open fence (char, length) after `line`, given the one open before it."""
    body = line.rstrip("\n")
    if fence is None:
        m = _FENCE_OPEN.match(body)
        if m and not (m[1][0] == "`" and "`" in m[2]):
            return (m[1][0], len(m[1]))
        return None
    char, length = fence
    stripped = body.lstrip(" ")
    if len(body) - len(stripped) <= 3 and stripped.rstrip() and set(stripped.rstrip()) == {char} and len(stripped.rstrip()) >= length:
        return None
    return fence


def _closers(fence: tuple[str, int] | None, details: int) -> str:
    text = (fence[0] * fence[1] + "\n") if fence else ""
    return text + "\n</details>\n" * details


def truncate_markdown(text: str, limit: int, note: str) -> str:
    """`text` cut at a line boundary to at most `limit` UTF-8 bytes with `note` appended; open fences and <details> closed."""
    if utf8_len(text) <= limit:
        return text
    note = note if note.endswith("\n") or not note else note + "\n"
    kept: list[str] = []
    used = 0
    fence: tuple[str, int] | None = None
    details = 0
    lines = text.split("\n")
    pieces = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    for piece in pieces:
        next_fence = _fence_after(piece, fence)
        next_details = details
        if fence is None:
            next_details += len(re.findall(r"<details\b", piece)) - len(re.findall(r"</details>", piece))
            next_details = max(next_details, 0)
        size = utf8_len(piece)
        tail = utf8_len(_closers(next_fence, next_details)) + utf8_len(note)
        if used + size + tail > limit:
            if fence is not None:
                # Inside a code block text is literal, so part of a line can be shown; never part of a character.
                room = limit - used - utf8_len(_closers(fence, details)) - utf8_len(note) - 1
                part = cut_utf8(piece.rstrip("\n"), room)
                if part and _fence_after(part, fence) == fence:
                    kept.append(part + "\n")
                    used += utf8_len(part) + 1
            break
        kept.append(piece)
        used += size
        fence, details = next_fence, next_details
    head = "".join(kept)
    if head and not head.endswith("\n"):
        head += "\n"
    return head + _closers(fence, details) + note


# ---------------------------------------------------------------------------------------------
# The pull request summary


@dataclass
class RecipeSummary:
    """What the summary says about one recipe."""

    recipe: str
    valid: bool
    repo_id: str | None = None
    sha256: str | None = None
    problems: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    diff: list[tuple[str, str, str]] | None = None
    diff_note: str | None = None
    dry_run: str | None = None
    smoke_passed: bool | None = None
    card: str | None = None
    card_error: str | None = None
    card_title: str = "README.md"
    family: str | None = None  # a sweep's family name
    points: list[dict[str, Any]] = field(default_factory=list)  # a sweep's points: index, label, repo id, dry run
    family_table: str | None = None  # Markdown (family.markdown_table) from the points' dry-run reports at hand

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (the card text left out: it is in the Markdown)."""
        return {
            "family": self.family,
            "points": self.points,
            "recipe": self.recipe,
            "valid": self.valid,
            "repo_id": self.repo_id,
            "recipe_sha256": self.sha256,
            "problems": self.problems,
            "reason": "; ".join(self.reasons),
            "diff": [{"setting": s, "before": b, "after": a} for s, b, a in self.diff or []],
            "dry_run": self.dry_run,
            "smoke_passed": self.smoke_passed,
            "card_error": self.card_error,
        }


@dataclass
class Summary:
    """The pull request summary: Markdown within the comment limit, and the facts behind it."""

    markdown: str
    recipes: list[RecipeSummary]
    deleted: list[str]
    truncated: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "valid": all(r.valid for r in self.recipes),
            "recipes": [r.to_dict() for r in self.recipes],
            "deleted": self.deleted,
            "truncated": self.truncated,
            "markdown": self.markdown,
        }


MISSING = object()


def _format_weight(value: Any) -> str:
    if value is MISSING:
        return "—"
    if isinstance(value, list):
        parts = []
        for entry in value:
            data = entry.model_dump() if hasattr(entry, "model_dump") else dict(entry)
            inner = ", ".join(f"{k}: {json.dumps(v)}" for k, v in data.items() if v is not None)
            parts.append("{" + inner + "}")
        return "[" + ", ".join(parts) + "]"
    return "none" if value is None else json.dumps(value)


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [v.model_dump() if hasattr(v, "model_dump") else v for v in value]
    return value


def recipe_diff(before: Recipe, after: Recipe) -> list[tuple[str, str, str]]:
    """(setting, before, after) for each merge setting that differs: weights, models, method, dtype, normalize."""
    rows: list[tuple[str, str, str]] = []
    old = {m.model: (m.parameters.weight if m.parameters else None) for m in before.merge.models}
    new = {m.model: (m.parameters.weight if m.parameters else None) for m in after.merge.models}
    for name in [*new, *(n for n in old if n not in new)]:
        b, a = old.get(name, MISSING), new.get(name, MISSING)
        if b is MISSING or a is MISSING or _plain(b) != _plain(a):
            rows.append((f"weight of {name}", _format_weight(b), _format_weight(a)))
    for setting, b, a in (
        ("merge method", before.merge.merge_method, after.merge.merge_method),
        ("dtype", before.merge.dtype, after.merge.dtype),
        ("out_dtype", before.merge.out_dtype, after.merge.out_dtype),
        ("normalize", before.merge.parameters.normalize, after.merge.parameters.normalize),
    ):
        if b != a:
            rows.append((setting, _format_setting(b), _format_setting(a)))
    if before.sweep is not None or after.sweep is not None:
        old_points, new_points = (_point_labels(r) for r in (before, after))
        if old_points != new_points:
            rows.append(("sweep points", old_points, new_points))
    return rows


def _point_labels(recipe: Recipe) -> str:
    return "; ".join(p.label for p in recipe.points()) if recipe.sweep is not None else "no sweep"


def _format_setting(value: Any) -> str:
    if value is None:
        return "not set"
    return json.dumps(value) if isinstance(value, bool) else str(value)


@dataclass
class DryRunReports:
    """What one recipe's dry run left: its reports, or why they cannot be read."""

    provenance: Provenance | None = None
    smoke: Smoke | None = None
    problem: str | None = None


def report_folder(recipe: str, point: int | None = None) -> str:
    """The folder a recipe's (or a sweep point's) dry-run reports land in: the workflow's artifact name, report-<slug>."""
    return f"report-{slug(recipe, point)}"


def find_reports(folder: Path | None) -> dict[str, DryRunReports]:
    """The dry runs' reports under `folder`, keyed by the folder holding them (report-<slug>, one per recipe)."""
    found: dict[str, DryRunReports] = {}
    if folder is None or not folder.is_dir():
        return found
    holders = {path.parent for kind in (Provenance, Smoke) for path in folder.rglob(kind.FILE)}
    for holder in sorted(holders):
        entry = found.setdefault(holder.name, DryRunReports())
        try:
            entry.provenance, entry.smoke = read_report(Provenance, holder), read_report(Smoke, holder)
        except ReportError as exc:
            entry.problem = str(exc)
    return found


def build_summary(
    recipes: Sequence[str] | None = None,
    *,
    base: str | None = None,
    reports: Path | None = None,
    limit: int = SUMMARY_LIMIT,
    root: Path | None = None,
    max_source_bytes: int = int(DEFAULT_MAX_SOURCE_GB * GB),
    hub_size: HubSize | None = None,
    environ: Mapping[str, str] | None = None,
) -> Summary:
    """The Markdown a pull request shows for `recipes` (default: those the change touches), within `limit` bytes."""
    root = root or repo_root()
    changes: Changes | None = None
    if recipes is None or base is not None:
        changes = compute_changes(base, root=root, max_source_bytes=max_source_bytes, hub_size=hub_size, environ=environ)
    elif recipes:
        try:
            changes = compute_changes(None, root=root, max_source_bytes=max_source_bytes, hub_size=hub_size, environ=environ)
        except UsageError:
            changes = None  # no base here: the summary still validates and previews
    if recipes is None:
        paths = [r.recipe for r in changes.recipes] if changes else []
    else:
        paths = [_repo_path(p, root) for p in recipes]
    found = find_reports(reports)
    items = [_summarize(path, root, changes, found) for path in paths]
    return _assemble(items, changes.deleted if changes else [], changes, limit)


def _repo_path(path: str, root: Path) -> str:
    full = Path(path).resolve()
    try:
        return full.relative_to(root.resolve()).as_posix()
    except ValueError:
        raise UsageError(f"{path} is not inside the repository at {root}") from None


def _summarize(path: str, root: Path, changes: Changes | None, reports: Mapping[str, DryRunReports]) -> RecipeSummary:
    entry = changes.find(path) if changes else None
    item = RecipeSummary(path, valid=True, reasons=list(entry.reasons) if entry else [])
    if not (root / path).is_file():
        item.valid = False
        item.problems = [f"{path}: no such file"]
        return item
    from .plugins import get_targets

    try:
        recipe = load_recipe(root / path, targets=get_targets())
    except RecipeError as exc:
        item.valid = False
        item.problems = [_problem_line(p, path) for p in exc.problems]
        return item
    except RegistryError as exc:
        item.valid = False
        item.problems = [f"{path}: {exc}"]
        return item
    item.repo_id, item.sha256 = recipe.repo_id, recipe.sha256
    if changes is not None and changes.base_sha != ZERO_SHA:
        item.diff, item.diff_note = _base_diff(recipe, path, entry, root, changes.base_sha)
    if recipe.sweep is not None:
        _summarize_family(item, recipe, root, entry, reports)
        return item
    report = reports.get(report_folder(path), DryRunReports())
    provenance, smoke = report.provenance, report.smoke
    if report.problem is not None:
        item.dry_run = f"its report cannot be read: {report.problem}"
    elif smoke is not None:
        item.smoke_passed = smoke.passed
        item.dry_run = _smoke_line(smoke)
    elif provenance is not None:
        item.dry_run = "merged, but no smoke report was found: see the recipe's job log"
    elif entry is not None and not entry.dry_run:
        item.dry_run = "not run: " + ("; ".join(entry.notes) or "not chosen for a dry run")
    elif entry is not None:
        item.dry_run = "no report found: the dry run failed or did not finish; see the recipe's job log"
    item.card, item.card_error = _card(recipe, root, provenance, smoke)
    return item


def _summarize_family(item: RecipeSummary, recipe: Recipe, root: Path, entry: ChangedRecipe | None,
                      reports: Mapping[str, DryRunReports]) -> None:
    """A sweep: its points with their dry-run reports (where the matrix ran one), the family table, point 0's card."""
    from .family import PointReports, build_family, markdown_table

    points = recipe.points()
    item.family = recipe.sweep.family if recipe.sweep else None
    gathered, tested, passed, unreadable, missing = [], 0, 0, [], []
    for point in points:
        report = reports.get(report_folder(item.recipe, point.index), DryRunReports())
        if report.problem is not None:
            unreadable.append(f"point {point.index}: {report.problem}")
            report = DryRunReports()
        elif report.provenance is None and report.smoke is None:
            missing.append(str(point.index))
        tested += report.smoke is not None
        passed += bool(report.smoke is not None and report.smoke.passed)
        gathered.append(PointReports(point, report.provenance, report.smoke))
        item.points.append({"index": point.index, "label": point.label, "repo_id": point.recipe.repo_id,
                            "smoke_passed": report.smoke.passed if report.smoke is not None else None})
    if entry is not None and not entry.dry_run:
        item.dry_run = "not run: " + ("; ".join(entry.notes) or "not chosen for a dry run") + "; the points are listed unmerged"
    elif entry is not None or tested or unreadable:
        parts = [f"{tested} of {len(points)} points merged and smoke-tested on the CPU, {passed} passed"]
        if missing:
            several = len(missing) > 1
            parts.append(f"no report for point{'s' if several else ''} {', '.join(missing)}: the dry run failed or did not "
                         f"finish; see {'their job logs' if several else 'its job log'}")
        item.dry_run = "; ".join(parts + unreadable)
    item.family_table = markdown_table(build_family(recipe, gathered))
    first = gathered[0]
    item.card_title = f"point 0, {first.point.label}, README.md"
    item.card, item.card_error = _card(first.point.recipe, root, first.provenance, first.smoke)


def _problem_line(p: Any, path: str) -> str:
    where = f"{p.loc}: " if p.loc else ""
    return f"{path}:{p.line}:{p.col}: {where}{p.message}"


def _base_diff(recipe: Recipe, path: str, entry: ChangedRecipe | None, root: Path, base_sha: str) -> tuple[list | None, str | None]:
    old_path = entry.renamed_from if entry and entry.renamed_from else path
    try:
        text = git_bytes(["show", f"{base_sha}:{old_path}"], root).decode("utf-8")
    except RegistryError:
        return None, "new recipe"
    except UnicodeDecodeError:
        text = None
    try:
        from .plugins import get_targets

        before = parse_recipe(text, old_path, targets=get_targets()) if text is not None else None
    except RecipeError:
        before = None
    if before is None:
        return None, f"{code(old_path)} on the base is not a valid recipe, so there is nothing to compare with"
    return recipe_diff(before, recipe), None


def _smoke_line(smoke: Smoke) -> str:
    parts = []
    for check in smoke.checks:
        part = f"{check.name} {check.status}"
        if check.status == "failed" and check.reason:
            part += f" ({check.reason})"
        parts.append(part)
    verdict = "smoke tests passed" if smoke.passed else "smoke tests FAILED"
    return verdict + (": " + ", ".join(parts) if parts else "")


def _card(recipe: Recipe, root: Path, provenance: Provenance | None, smoke: Smoke | None) -> tuple[str | None, str | None]:
    from .card import render_card
    from .templating import template_dirs

    try:
        team = root / TEMPLATES_DIR
        dirs = template_dirs(team if team.is_dir() else None)
        return render_card(recipe, provenance, smoke, dirs), None
    except RegistryError as exc:
        return None, str(exc)


def _assemble(items: list[RecipeSummary], deleted: list[str], changes: Changes | None, limit: int) -> Summary:
    """Lay out the summary, sharing what the limit leaves after everything else among the card previews."""
    heads = [_head(item, changes) for item in items]
    intro = _intro(items, deleted, changes)
    cards = [item for item in items if item.card is not None]
    skeleton = intro + "".join(heads) + "".join(_card_block(item, "") for item in cards)
    budgets = _share(limit - utf8_len(skeleton), [utf8_len(item.card or "") for item in cards])
    previews = {item.recipe: _preview(item.card or "", budget) for item, budget in zip(cards, budgets, strict=True)}
    body = intro + "".join(
        head + (_card_block(item, previews[item.recipe]) if item.card is not None else "") for head, item in zip(heads, items, strict=True)
    )
    truncated = any(previews[item.recipe] != item.card for item in cards)
    if utf8_len(body) > limit:
        body = truncate_markdown(body, limit, "\n*The summary was cut here to fit GitHub's comment limit; the job's step summaries have the rest.*\n")
        truncated = True
    return Summary(body, items, deleted, truncated)


def _share(room: int, sizes: list[int]) -> list[int]:
    """Split `room` among items of `sizes`: small ones get all they need, large ones an equal share of the rest."""
    budgets = [0] * len(sizes)
    left = max(room, 0)
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    for rank, i in enumerate(order):
        share = left // (len(sizes) - rank)
        budgets[i] = min(sizes[i], share)
        left -= budgets[i]
    return budgets


def _preview(card: str, budget: int) -> str:
    if utf8_len(card) <= budget:
        return card
    note = f"… card preview cut at {{shown:,}} of {len(card):,} characters to fit GitHub's comment limit\n"
    # The note's own length depends on the count it shows; the widest count is the card's length.
    room = budget - utf8_len(note.format(shown=len(card)))
    cut = truncate_markdown(card, max(room, 0), "")
    shown = len(cut)
    return cut + note.format(shown=shown)


def _intro(items: list[RecipeSummary], deleted: list[str], changes: Changes | None) -> str:
    lines = ["## Recipe check", ""]
    invalid = [i for i in items if not i.valid]
    if not items:
        lines.append("This change touches no recipe.")
    else:
        count = f"{len(items)} recipe{'s' if len(items) != 1 else ''}"
        lines.append(f"{count} checked, {len(invalid)} invalid." if invalid else f"{count} checked, all valid.")
    if changes is not None:
        lines.append(f"Compared with {code(changes.base)} at {code(changes.base_sha[:12])}.")
    if deleted:
        lines += ["", "**Deleted:** " + ", ".join(code(p) for p in deleted) + " (published models are left as they are)."]
    return "\n".join(lines) + "\n"


def _head(item: RecipeSummary, changes: Changes | None) -> str:
    lines = ["", f"### {code(item.recipe)}", ""]
    why = f" · {reasons_markdown(item.reasons)}" if item.reasons else ""
    if not item.valid:
        lines += [f"**Invalid**{why}", "", fenced("\n".join(item.problems), "text").rstrip("\n")]
        return "\n".join(lines) + "\n"
    what = code(item.repo_id or "") if item.family is None else f"family {code(item.family)}, {len(item.points)} points"
    lines.append(f"**Valid** · {what} · recipe sha256 {code((item.sha256 or '')[:12])}{why}")
    if item.diff_note:
        lines += ["", item.diff_note[0].upper() + item.diff_note[1:] + "."]  # Markdown already: see _base_diff
    elif item.diff is not None and changes is not None:
        base = code(changes.base)
        if item.diff:
            lines += ["", f"Merge settings against {base}:", "", "| Setting | Before | After |", "|---|---|---|"]
            lines += [f"| {cell(s)} | {code(b, table=True)} | {code(a, table=True)} |" for s, b, a in item.diff]
        else:
            lines += ["", f"Weights, dtype and normalize are unchanged against {base}."]
    if item.dry_run:
        lines += ["", f"**Dry run:** {cell(item.dry_run)}"]
    if item.family_table is not None:
        lines += ["", item.family_table.rstrip("\n")]
    if item.card_error:
        lines += ["", "**Card not rendered:**", "", fenced(item.card_error, "text").rstrip("\n")]
    return "\n".join(lines) + "\n"


def _card_block(item: RecipeSummary, preview: str) -> str:
    card = item.card or ""
    # The fence is sized for the whole card, so the space reserved for it holds for any cut of it.
    fence = "`" * max(3, longest_run(card, "`") + 1)
    body = preview if preview.endswith("\n") or not preview else preview + "\n"
    return (
        f"\n<details><summary>Card preview ({cell(item.card_title)}, {len(card):,} characters)</summary>\n\n"
        f"{fence}markdown\n{body}{fence}\n\n</details>\n"
    )
