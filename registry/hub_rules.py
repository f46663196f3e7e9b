"""The Hub's own rules for repo ids and licenses, checked locally so nothing needs the network."""

from __future__ import annotations

import re

# The Hub allows letters, digits, '-', '_' and '.'; no '--' or '..'; no leading/trailing '-' or '.';
# names up to 96 characters.
_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")
MAX_NAME = 96

# https://huggingface.co/docs/hub/repositories-licenses
LICENSES = frozenset(
    [
        "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
        "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
        "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0",
        "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0",
        "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0",
        "cdla-sharing-1.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0",
        "etalab-2.0", "eupl-1.1", "eupl-1.2", "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1",
        "lgpl-3.0", "isc", "h-research", "intel-research", "lppl-1.3c", "ms-pl", "apple-ascl", "apple-amlr", "mpl-2.0",
        "odc-by", "odbl", "openrail++", "osl-3.0", "postgresql", "ofl-1.1", "ncsa", "unlicense", "zlib", "pddl",
        "lgpl-lr", "deepfloyd-if-license", "fair-noncommercial-research-license", "llama2", "llama3", "llama3.1",
        "llama3.2", "llama3.3", "llama4", "gemma", "unknown", "other",
    ]
)


def repo_id_problem(repo_id: str, *, namespace_required: bool = True) -> str | None:
    """Why `repo_id` is not a valid Hub repo id, or None when it is."""
    parts = repo_id.split("/")
    if len(parts) == 1 and namespace_required:
        return f"{repo_id!r} is not a Hub repo id: expected 'owner/name'"
    if len(parts) > 2:
        return f"{repo_id!r} is not a Hub repo id: expected 'owner/name' with a single '/'"
    for part in parts:
        if not part:
            return f"{repo_id!r} is not a Hub repo id: owner and name must not be empty"
        if len(part) > MAX_NAME:
            return f"{repo_id!r} is not a Hub repo id: '{part[:12]}...' is longer than {MAX_NAME} characters"
        if not _PART.fullmatch(part) or "--" in part or ".." in part:
            return (
                f"{repo_id!r} is not a Hub repo id: use letters, digits, '-', '_' and '.', "
                "without '--' or '..' and not starting or ending with '-' or '.'"
            )
    if repo_id.endswith(".git"):
        return f"{repo_id!r} is not a Hub repo id: it must not end with '.git'"
    return None


def is_repo_id(value: str) -> bool:
    """True when `value` is an 'owner/name' Hub repo id."""
    return repo_id_problem(value) is None
