"""The `local` target: a directory registry, the embedded default that works offline.

Layout under the registry home (`$REGISTRY_HOME`, else `.registry/` in the current directory):

    models/<owner>/<name>/<UTC date>-<recipe sha12>/   the same files as the Hub repo
    families/<family>/<UTC date>-<family.json sha12>/ a family's family.json and its chart, when drawn
    index.json                                        every published version (with its family, if
                                                      any) and every family version; the catalog reads it

A version folder is staged beside its final name and renamed into place, under the index lock, when
complete; the index is replaced atomically under that lock, so readers never see half a model or half an
index. A killed publish can leave a marked staging folder (see registry/staging.py) or a complete
version folder that the index does not list yet: `reconcile` removes the one and adopts the other
(a family's folder too). A family is written the same way: staged, renamed into place and indexed,
with its points' version entries, under one hold of the index lock.
An index entry's `path` is only data: it is followed only while it stays inside the registry home.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import registry_home
from .. import staging as staging_dirs
from ..errors import PublishError
from ..files import fsync_path, sha256_file
from ..hookspecs import hookimpl
from . import (
    CARD_NAME,
    PIN_FIELDS,
    Bundle,
    FileEntry,
    Published,
    PublishPlan,
    PublishResult,
    Target,
    TargetOptions,
    bundle_files,
    published,
)

INDEX = "index.json"
FAMILIES = "families"
_STAGING = ".staging-"
_INDEX_STAGING = f".{INDEX}.staging-"
_VERSION = re.compile(r"(\d{8}T\d{6}Z)-([0-9a-f]{12})(?:-\d+)?")


class LocalOptions(TargetOptions):
    """Options of the `local` target."""


class LocalTarget(Target):
    """Publishes into a directory registry (`.registry/` or `$REGISTRY_HOME`)."""

    name = "local"
    Options = LocalOptions
    card_only = True

    def __init__(self, home: Path | None = None):
        self.home = home or registry_home()

    def current(self, recipe, merge_id, options) -> Published | None:
        """The latest version's card and reports when it is an intact build with this merge identity."""
        from ..reports import Eval, Provenance, Smoke, read_current

        latest = latest_version(self.home, recipe.repo_id)
        if not latest or latest.get("merge_identity") != merge_id or not _intact(self.home, latest):
            return None
        folder = version_folder(self.home, latest)
        provenance = read_current(Provenance, folder)
        if provenance is None or provenance.merge_identity != merge_id:
            return None
        try:
            card = (folder / CARD_NAME).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        return published(merge_id, card, provenance, read_current(Smoke, folder), read_current(Eval, folder))

    def plan(self, bundle: Bundle, options) -> PublishPlan:
        latest = latest_version(self.home, bundle.repo_id)
        if latest and _same_content(latest, bundle) and _intact(self.home, latest):
            return PublishPlan(self.name, str(version_folder(self.home, latest)), up_to_date=True)
        upload = sorted(bundle.files)
        return PublishPlan(
            self.name, str(self.home / "models" / bundle.repo_id), up_to_date=False, upload=upload,
            upload_bytes=sum(f.size for f in bundle.files.values()),
        )

    def publish(self, bundle: Bundle, options) -> PublishResult:
        notes = reconcile(self.home)
        latest = latest_version(self.home, bundle.repo_id)
        if latest and _same_content(latest, bundle) and _intact(self.home, latest):
            return PublishResult(self.name, str(version_folder(self.home, latest)), latest["version"], changed=False,
                                 detail="already published", notes=notes, repo_id=bundle.repo_id)
        now = dt.datetime.now(dt.UTC)
        parent = self.home / "models" / bundle.repo_id
        version = _new_version(parent, now, bundle.short_sha)
        final = parent / version
        entry = _entry(bundle.repo_id, version, now, bundle.recipe_sha256, bundle.provenance.merge_identity,
                       final.relative_to(self.home).as_posix(), bundle.smoke.passed if bundle.smoke is not None else None,
                       bundle.pins, {rel: (f.sha256, f.size) for rel, f in bundle.files.items()}, bundle.metadata)
        try:
            parent.mkdir(parents=True, exist_ok=True)
            staging = staging_dirs.create(parent / f"{_STAGING}{version}-{os.getpid()}")
        except OSError as exc:
            raise PublishError(f"cannot write {final}: {exc.strerror or exc}", "check free space and permissions") from None
        try:
            for rel, file in bundle.files.items():
                dest = staging.path / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(_source(self.home, latest, rel, file), dest)
            _fsync_tree(staging.path)
            # Renamed under the index lock, so `reconcile` never takes a version still being indexed for debris.
            with _locked_index(self.home) as index:
                staging.install(final)
                index["models"].append(entry)
        except OSError as exc:
            staging.remove()
            raise PublishError(f"cannot write {final}: {exc.strerror or exc}", "check free space and permissions") from None
        staging.close()
        return PublishResult(self.name, str(final), version, changed=True, notes=notes, repo_id=bundle.repo_id)

    def publish_family(self, family, results, options) -> PublishResult | None:
        """Keep the family's family.json (and chart) under families/ and mark each published point's version with it."""
        from ..family import family_files

        published = {r.repo_id: r.revision for r in results if r.repo_id}
        rows = [row for row in family.points if row.repo_id in published]
        if not rows:
            return None
        notes = reconcile(self.home)
        files = family_files(family)
        recorded = {name: {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)} for name, blob in sorted(files.items())}
        index = read_index(self.home)
        points = _family_points(index, rows, published)
        latest = latest_family(self.home, family.family, index)
        if (latest is not None and latest.get("files") == recorded and latest.get("points") == points
                and _intact(self.home, latest) and _marked(index, family.family, points)):
            return PublishResult(self.name, str(version_folder(self.home, latest)), latest["version"], changed=False,
                                 detail="family already recorded", notes=notes)
        now = dt.datetime.now(dt.UTC)
        parent = self.home / FAMILIES / family.family
        version = _new_version(parent, now, recorded[family.FILE]["sha256"][:12])
        final = parent / version
        entry = {"family": family.family, "version": version, "recipe_sha256": family.recipe_sha256,
                 "published_at": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
                 "path": final.relative_to(self.home).as_posix(), "points": points, "files": recorded}
        try:
            parent.mkdir(parents=True, exist_ok=True)
            staging = staging_dirs.create(parent / f"{_STAGING}{version}-{os.getpid()}")
        except OSError as exc:
            raise PublishError(f"cannot write {final}: {exc.strerror or exc}", "check free space and permissions") from None
        try:
            for name, blob in files.items():
                (staging.path / name).write_bytes(blob)
            _fsync_tree(staging.path)
            with _locked_index(self.home) as index:
                staging.install(final)
                index.setdefault("families", []).append(entry)
                _mark_points(index, family.family, points)
        except OSError as exc:
            staging.remove()
            raise PublishError(f"cannot write {final}: {exc.strerror or exc}", "check free space and permissions") from None
        staging.close()
        return PublishResult(self.name, str(final), version, changed=True,
                             detail=f"family {family.family}: {len(points)} points", notes=notes)


def _new_version(parent: Path, now: dt.datetime, sha12: str) -> str:
    """A version folder name under `parent` not taken yet: `<UTC time>-<sha12>`, numbered when republished within a second."""
    version = f"{now:%Y%m%dT%H%M%SZ}-{sha12}"
    for n in range(2, 100):
        if not (parent / version).exists():
            break
        version = f"{now:%Y%m%dT%H%M%SZ}-{sha12}-{n}"
    return version


def _entry(repo_id: str, version: str, when: dt.datetime, recipe_sha256: str, merge_id: str, path: str,
           smoke_passed: bool | None, pins: dict[str, Any], files: dict[str, tuple[str, int]],
           metadata: dict[str, Any]) -> dict[str, Any]:
    """One version's record in index.json."""
    return {
        "repo_id": repo_id,
        "version": version,
        "published_at": when.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "recipe_sha256": recipe_sha256,
        "merge_identity": merge_id,
        "path": path,
        "smoke_passed": smoke_passed,
        "pins": pins,
        "files": {rel: {"sha256": sha, "size": size} for rel, (sha, size) in sorted(files.items())},
        "metadata": metadata,
    }


def _family_points(index: dict[str, Any], rows: list[Any], published: dict[str, str | None]) -> list[dict[str, Any]]:
    """Each published point as the family's index entry lists it: repo id, the version it marks, label, weights."""
    points = []
    for row in rows:
        found = [m for m in index["models"] if m.get("repo_id") == row.repo_id]
        # The version this publish made or found current; a result without one (nothing sent) means the latest.
        chosen = next((m for m in found if m.get("version") == published.get(row.repo_id)), found[-1] if found else None)
        if chosen is None:
            continue  # published elsewhere only: nothing here to mark
        points.append({"repo_id": row.repo_id, "version": chosen["version"], "label": row.label, "weights": dict(row.weights)})
    return points


def _marked(index: dict[str, Any], name: str, points: list[dict[str, Any]]) -> bool:
    """Whether every point's version entry already names this family with these weights."""
    wanted = {(p["repo_id"], p["version"]): _family_mark(name, p) for p in points}
    found = {(m.get("repo_id"), m.get("version")): m.get("family") for m in index["models"]}
    return all(found.get(key) == mark for key, mark in wanted.items())


def _mark_points(index: dict[str, Any], name: str, points: list[dict[str, Any]]) -> None:
    wanted = {(p["repo_id"], p["version"]): _family_mark(name, p) for p in points}
    for entry in index["models"]:
        mark = wanted.get((entry.get("repo_id"), entry.get("version")))
        if mark is not None:
            entry["family"] = mark


def _family_mark(name: str, point: dict[str, Any]) -> dict[str, Any]:
    """What a point's version entry records of its family: its name, the point's label and weights."""
    return {"name": name, "label": point["label"], "weights": point["weights"]}


def list_families(home: Path | None = None, index: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The newest version of every family in the registry, by name."""
    latest: dict[str, dict[str, Any]] = {}
    for entry in (index if index is not None else read_index(home)).get("families", []):
        latest[str(entry.get("family"))] = entry
    return [latest[k] for k in sorted(latest)]


def latest_family(home: Path | None, name: str, index: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The newest recorded version of family `name`, or None."""
    return next((f for f in list_families(home, index) if f.get("family") == name), None)


def version_folder(home: Path, entry: dict[str, Any]) -> Path | None:
    """The folder an index entry names, or None when its `path` leads outside the registry home (or is it)."""
    root = home.resolve()
    path = entry.get("path")
    if not isinstance(path, str) or not path:
        return None
    folder = (home / path).resolve()
    return folder if folder.is_relative_to(root) and folder != root else None


def checked_version_folder(home: Path, entry: dict[str, Any]) -> Path:
    """version_folder(), or a PublishError naming the index entry that leads outside the registry home."""
    folder = version_folder(home, entry)
    if folder is None:
        raise PublishError(
            f"{home / INDEX}: {entry.get('repo_id')} {entry.get('version')} has path {entry.get('path')!r}, "
            "which leads outside the registry home; it is not followed",
            "remove or correct that entry of the index",
        )
    return folder


def reconcile(home: Path | None = None) -> list[str]:
    """Tidy what killed publishes left: adopt complete version folders the index lacks, remove the
    registry's own marked staging leftovers. One note per change; nothing is printed."""
    home = home or registry_home()
    if not (home / INDEX).is_file() and not (home / "models").is_dir():
        return []
    notes: list[str] = []
    adopted: list[dict[str, Any]] = []
    try:
        with _locked_index(home) as index:
            for gone in staging_dirs.remove_leftovers(home, _INDEX_STAGING):
                notes.append(f"removed {gone.relative_to(home)}: left by an interrupted index update")
            indexed = {m.get("path") for m in index["models"]} | {f"models/{m.get('repo_id')}/{m.get('version')}" for m in index["models"]}
            for repo in _repo_folders(home):
                repo_id = repo.relative_to(home / "models").as_posix()
                for gone in staging_dirs.remove_leftovers(repo, _STAGING):
                    notes.append(f"removed {gone.relative_to(home)}: left by an interrupted publish of {repo_id}")
                for folder in sorted(repo.iterdir()):
                    rel = folder.relative_to(home).as_posix()
                    if folder.name.startswith(".") or rel in indexed or folder.is_symlink() or not folder.is_dir():
                        continue
                    entry = _adoptable(repo_id, folder, rel)
                    if entry is not None:
                        adopted.append(entry)
                        notes.append(f"adopted {repo_id} {folder.name} into the index: a publish was interrupted after writing it")
            if adopted:
                # Oldest first, as publishing appends them (a stable sort keeps the order of equal times).
                index["models"] = sorted([*index["models"], *adopted], key=lambda m: str(m.get("published_at", "")))
            notes += _reconcile_families(home, index)
    except OSError:
        return notes  # a registry this user cannot write is only read
    return notes


def _reconcile_families(home: Path, index: dict[str, Any]) -> list[str]:
    """Under the index lock: remove families' staging leftovers, adopt a family folder a killed publish installed but did not index."""
    notes: list[str] = []
    root = home / FAMILIES
    if not root.is_dir():
        return notes
    indexed = {f.get("path") for f in index.get("families", [])}
    for parent in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        for gone in staging_dirs.remove_leftovers(parent, _STAGING):
            notes.append(f"removed {gone.relative_to(home)}: left by an interrupted publish of family {parent.name}")
        for folder in sorted(parent.iterdir()):
            rel = folder.relative_to(home).as_posix()
            if folder.name.startswith(".") or rel in indexed or folder.is_symlink() or not folder.is_dir():
                continue
            entry = _adoptable_family(index, parent.name, folder, rel)
            if entry is not None:
                index.setdefault("families", []).append(entry)
                index["families"].sort(key=lambda f: str(f.get("published_at", "")))
                _mark_points(index, parent.name, entry["points"])
                notes.append(f"adopted family {parent.name} {folder.name} into the index: a publish was interrupted after writing it")
    return notes


def _adoptable_family(index: dict[str, Any], name: str, folder: Path, rel: str) -> dict[str, Any] | None:
    """The index entry for a family folder a killed publish wrote completely (its family.json names it), or None."""
    from ..errors import RegistryError
    from ..reports import Family
    from ..reports import read as read_report

    match = _VERSION.fullmatch(folder.name)
    try:
        family = read_report(Family, folder) if match else None
        if family is None or family.family != name:
            return None
        files = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in sorted(folder.iterdir()) if p.is_file()}
    except (OSError, RegistryError):
        return None
    assert match is not None
    if not files[family.FILE]["sha256"].startswith(match[2]):
        return None
    published = {row.repo_id: None for row in family.points if row.state == "published"}
    points = _family_points(index, [row for row in family.points if row.repo_id in published], published)
    when = dt.datetime.strptime(match[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    return {"family": name, "version": folder.name, "recipe_sha256": family.recipe_sha256,
            "published_at": when.isoformat(timespec="seconds").replace("+00:00", "Z"), "path": rel,
            "points": points, "files": files}


def _repo_folders(home: Path) -> list[Path]:
    models = home / "models"
    if not models.is_dir():
        return []
    return sorted(repo for owner in models.iterdir() if owner.is_dir() and not owner.is_symlink()
                  for repo in owner.iterdir() if repo.is_dir() and not repo.is_symlink())


def _adoptable(repo_id: str, folder: Path, rel: str) -> dict[str, Any] | None:
    """The index entry for a version folder a killed publish wrote completely, or None."""
    import yaml

    from ..errors import RegistryError
    from ..frontmatter import load as load_front_matter
    from ..reports import Provenance, Smoke
    from ..reports import read as read_report

    match = _VERSION.fullmatch(folder.name)
    if not match or not (folder / CARD_NAME).is_file():
        return None
    try:
        provenance, smoke = read_report(Provenance, folder), read_report(Smoke, folder)
        metadata = load_front_matter((folder / CARD_NAME).read_text(encoding="utf-8"))[0] or {}
        registry = metadata.get("registry") if isinstance(metadata.get("registry"), dict) else {}
        recipe_sha256 = str(registry.get("recipe_sha256", ""))
        if (provenance is None or not provenance.files or not recipe_sha256.startswith(match[2])
                or registry.get("merge_identity") != provenance.merge_identity):
            return None
        recorded = provenance.files
        # Sizes first: an incomplete folder is left without reading it.
        if not all((folder / name).is_file() and (folder / name).stat().st_size == info.size for name, info in recorded.items()):
            return None
        if any(sha256_file(folder / name) != info.sha256 for name, info in recorded.items()):
            return None
        files = bundle_files(folder, known=recorded)
    except (OSError, ValueError, TypeError, AttributeError, RegistryError, yaml.YAMLError):
        return None  # not a complete version folder of this registry: left alone
    when = dt.datetime.strptime(match[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    pins = {alias: {f: getattr(pin, f) for f in PIN_FIELDS} for alias, pin in provenance.sources.items()}
    return _entry(repo_id, folder.name, when, recipe_sha256, provenance.merge_identity, rel,
                  smoke.passed if smoke is not None else None, pins,
                  {r: (f.sha256, f.size) for r, f in files.items()}, metadata)


def _source(home: Path, latest: dict[str, Any] | None, rel: str, file: FileEntry) -> Path:
    """Where to take a bundle file from: the latest version's copy when it holds the same bytes (a hard
    link to it costs no space and keeps unchanged files shared), else the bundle's own path."""
    recorded = (latest or {}).get("files", {}).get(rel)
    folder = version_folder(home, latest) if latest else None
    if folder is not None and recorded == {"sha256": file.sha256, "size": file.size}:
        try:
            if (folder / rel).stat().st_size == file.size:
                return folder / rel
        except OSError:
            pass
    if file.path is None:
        raise PublishError(
            f"the local registry's latest version of {(latest or {}).get('repo_id', 'this model')} lacks {rel}, "
            "which this card-only publish keeps",
            "run `registry publish` again: it will rebuild the model",
        )
    return file.path


def _same_content(entry: dict[str, Any], bundle: Bundle) -> bool:
    files = {rel: f["sha256"] for rel, f in entry.get("files", {}).items()}
    return entry["recipe_sha256"] == bundle.recipe_sha256 and files == {rel: f.sha256 for rel, f in bundle.files.items()}


def _intact(home: Path, entry: dict[str, Any]) -> bool:
    """Every file the index lists is there with its size (a cheap check that nobody deleted it)."""
    folder = version_folder(home, entry)
    if folder is None:
        return False
    try:
        return all((folder / rel).stat().st_size == f["size"] for rel, f in entry.get("files", {}).items())
    except OSError:
        return False


def _link_or_copy(src: Path, dest: Path) -> None:
    # Build folders are never modified in place (a merge renames a new folder over them), so a
    # hard link is as safe as a copy and costs no space for multi-GB shards.
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _fsync_tree(root: Path) -> None:
    # Deepest first, so each folder is synced after what it holds; the root last.
    for path in [*sorted(root.rglob("*"), reverse=True), root]:
        fsync_path(path)


def read_index(home: Path | None = None) -> dict[str, Any]:
    """The registry's index (an empty one when nothing was published yet)."""
    path = (home or registry_home()) / INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        return {"format": 1, "models": []}
    except (OSError, json.JSONDecodeError) as exc:
        raise PublishError(f"cannot read the local registry index {path}: {exc}") from None
    index.setdefault("models", [])
    return index


@contextlib.contextmanager
def _locked_index(home: Path) -> Iterator[dict[str, Any]]:
    """The index, to change in place; written back (when changed) atomically, under the registry's lock."""
    import fcntl

    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        index = read_index(home)
        before = json.dumps(index, sort_keys=True)
        yield index
        if json.dumps(index, sort_keys=True) == before and (home / INDEX).is_file():
            return
        # Written in a marked folder of its own, so a kill mid-write leaves only a leftover `reconcile` removes.
        staging = staging_dirs.create(home / f"{_INDEX_STAGING}{os.getpid()}")
        try:
            with open(staging.path / INDEX, "w") as fh:
                json.dump(index, fh, indent=2, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(staging.path / INDEX, home / INDEX)
        finally:
            staging.remove()


def versions(home: Path | None, repo_id: str) -> list[dict[str, Any]]:
    """Every published version of `repo_id`, oldest first."""
    return [m for m in read_index(home)["models"] if m["repo_id"] == repo_id]


def latest_version(home: Path | None, repo_id: str) -> dict[str, Any] | None:
    """The newest published version of `repo_id`, or None."""
    found = versions(home, repo_id)
    return found[-1] if found else None


def list_latest(home: Path | None = None) -> list[dict[str, Any]]:
    """The newest version of every model in the registry, by repo id."""
    latest: dict[str, dict[str, Any]] = {}
    for entry in read_index(home)["models"]:
        latest[entry["repo_id"]] = entry
    return [latest[k] for k in sorted(latest)]


@hookimpl
def register_targets(register):
    register(LocalTarget)
