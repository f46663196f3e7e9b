"""A model card's front matter: the YAML metadata block at the top of README.md, found as the Hub finds it.

One parser for the card stage, the catalog, publishing and the Hub test server. The block rule is
huggingface_hub's (`repocard.REGEX_YAML_BLOCK`, "the exact same regex as in the Hub server"),
kept here so that validating, carding and cataloguing never import huggingface_hub; a test checks
that the two are still the same.
"""

from __future__ import annotations

import re
from typing import Any

YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")


def split(text: str) -> tuple[str | None, str]:
    """The card's YAML block (None when it has none) and the Markdown after it."""
    match = YAML_BLOCK.search(text)
    if not match:
        return None, text
    return match.group(2), text[match.end():]


def end(text: str) -> int:
    """Where the front matter ends in `text` (0 when there is none)."""
    match = YAML_BLOCK.search(text)
    return match.end() if match else 0


def load(text: str) -> tuple[dict[str, Any] | None, str]:
    """The card's metadata (None when absent or not a mapping) and its Markdown body; yaml.YAMLError when the block is not YAML."""
    block, body = split(text)
    if block is None:
        return None, body
    import yaml

    # libyaml when present: ten times faster, and the catalog parses a thousand cards per build.
    data = yaml.load(block, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return (data if isinstance(data, dict) else None), body
