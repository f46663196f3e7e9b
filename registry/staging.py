"""Folders the registry makes for its own use (staging, set-aside outputs), and the only way any is removed.

Each such folder holds a marker file, MARKER, that names the folder and that the process working in it
keeps locked (flock) until it is done. A folder is removed as a leftover only when its marker is a
regular file naming that very folder and no live process holds its lock: a folder of the user's,
whatever its name, is never touched, and neither is one that a running process still works in.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Self

MARKER = ".registry-staging"
_MARKER_BYTES = 4096


class Staging:
    """A folder this process made or set aside for its own use, marked and locked while it is held."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    def install(self, final: Path) -> None:
        """Rename the finished folder to `final`, then drop its marker (one left by a kill just between
        names another folder, so it never makes `final` a leftover)."""
        os.replace(self.path, final)
        self.path = final
        (final / MARKER).unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the folder (if still there) and release it."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.close()

    def close(self) -> None:
        """Release the lock; a folder still marked then counts as a leftover."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create(path: Path) -> Staging:
    """Make `path` (which must not exist) as a marked staging folder held by this process."""
    path.mkdir()
    try:
        return Staging(path, _mark(path, path.name))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def set_aside(folder: Path, to: Path) -> Staging:
    """Rename the finished output `folder` to `to`, marked first, so a kill before its removal leaves a leftover."""
    fd = _mark(folder, to.name)
    try:
        os.rename(folder, to)
    except BaseException:
        (folder / MARKER).unlink(missing_ok=True)
        os.close(fd)
        raise
    return Staging(to, fd)


def _mark(folder: Path, name: str) -> int:
    fd = os.open(folder / MARKER, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({"folder": name, "pid": os.getpid(),
                                 "note": "made by registry; removed by it once this process is gone"}).encode() + b"\n")
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_leftover(folder: Path) -> bool:
    """True when `folder` is a marked staging folder whose process is gone."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return False
        fd = os.open(folder / MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        try:
            data = json.loads(os.read(fd, _MARKER_BYTES))
        except ValueError:
            return False
        if not isinstance(data, dict) or data.get("folder") != folder.name:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # its process is still working in it
        return True
    finally:
        os.close(fd)


def remove_leftovers(parent: Path, prefix: str = "") -> list[Path]:
    """Remove the leftover staging folders directly in `parent` whose names start with `prefix`; return them."""
    try:
        entries = sorted(p for p in parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []
    removed = []
    for entry in entries:
        if is_leftover(entry):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
