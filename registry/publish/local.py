"""The `local` target: a directory registry, the embedded default that works offline.

Layout under the registry home (`$REGISTRY_HOME`, else `.registry/` in the current directory):

    models/<owner>/<name>/<UTC date>-<recipe sha12>/   the same files as the Hub repo
    index.json                                        every published version; the catalog reads it

A version folder is staged beside its final name and renamed into place when complete; the index is
replaced atomically under a lock, so readers never see half a model or half an index.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from .. import registry_home
from ..errors import PublishError
from ..files import replace_atomically
from ..hookspecs import hookimpl
from . import Bundle, PublishPlan, PublishResult, Target, TargetOptions, same_pins

INDEX = "index.json"


class LocalOptions(TargetOptions):
    """Options of the `local` target."""


class LocalTarget(Target):
    """Publishes into a directory registry (`.registry/` or `$REGISTRY_HOME`)."""

    name = "local"
    Options = LocalOptions

    def __init__(self, home: Path | None = None):
        self.home = home or registry_home()

    def is_current(self, recipe, pins, options) -> bool:
        latest = latest_version(self.home, recipe.repo_id)
        return bool(
            latest
            and latest["recipe_sha256"] == recipe.sha256
            and same_pins(latest.get("pins"), pins)
            and _intact(self.home, latest)
        )

    def plan(self, bundle: Bundle, options) -> PublishPlan:
        latest = latest_version(self.home, bundle.repo_id)
        if latest and _same_content(latest, bundle) and _intact(self.home, latest):
            return PublishPlan(self.name, str(self.home / latest["path"]), up_to_date=True)
        upload = sorted(bundle.files)
        return PublishPlan(
            self.name, str(self.home / "models" / bundle.repo_id), up_to_date=False, upload=upload,
            upload_bytes=sum(f.size for f in bundle.files.values()),
        )

    def publish(self, bundle: Bundle, options) -> PublishResult:
        latest = latest_version(self.home, bundle.repo_id)
        if latest and _same_content(latest, bundle) and _intact(self.home, latest):
            return PublishResult(self.name, str(self.home / latest["path"]), latest["version"], changed=False, detail="already published")
        now = dt.datetime.now(dt.timezone.utc)
        parent = self.home / "models" / bundle.repo_id
        version = f"{now:%Y%m%dT%H%M%SZ}-{bundle.short_sha}"
        for n in range(2, 100):  # the same recipe republished within a second
            if not (parent / version).exists():
                break
            version = f"{now:%Y%m%dT%H%M%SZ}-{bundle.short_sha}-{n}"
        final = parent / version
        staging = parent / f".staging-{version}-{os.getpid()}"
        parent.mkdir(parents=True, exist_ok=True)
        try:
            for rel, entry in bundle.files.items():
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(entry.path, dest)
            _fsync_tree(staging)
            os.replace(staging, final)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise PublishError(f"cannot write {final}: {exc.strerror or exc}", "check free space and permissions") from None
        entry = {
            "repo_id": bundle.repo_id,
            "version": version,
            "published_at": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "recipe_sha256": bundle.recipe_sha256,
            "path": final.relative_to(self.home).as_posix(),
            "smoke_passed": bundle.smoke_passed,
            "pins": bundle.pins,
            "files": {rel: {"sha256": f.sha256, "size": f.size} for rel, f in sorted(bundle.files.items())},
            "metadata": bundle.metadata,
        }
        with _locked_index(self.home) as index:
            index["models"].append(entry)
        return PublishResult(self.name, str(final), version, changed=True)


def _same_content(entry: dict[str, Any], bundle: Bundle) -> bool:
    files = {rel: f["sha256"] for rel, f in entry.get("files", {}).items()}
    return entry["recipe_sha256"] == bundle.recipe_sha256 and files == {rel: f.sha256 for rel, f in bundle.files.items()}


def _intact(home: Path, entry: dict[str, Any]) -> bool:
    """Every file the index lists is there with its size (a cheap check that nobody deleted it)."""
    folder = home / entry["path"]
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
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for folder in [*sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True), root]:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
    import fcntl

    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        index = read_index(home)
        yield index
        replace_atomically(home / INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8"), durable=True)


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
