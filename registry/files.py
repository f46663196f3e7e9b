"""File primitives every stage shares: content hashes, atomic replacement, fsync.

One home for each, so the rules (a reader never sees half a file; a published copy hard-linked to
the old file keeps its content) hold everywhere the same way.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_HASH_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content."""
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with Path(path).open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Write `data` to a new file beside `path` and rename it over `path`.

    Readers see the old content or the new, never a mix; a hard link to the old file keeps the old
    content. With `durable`, the data and the rename are fsynced before returning.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)
