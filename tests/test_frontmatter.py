"""One front-matter parser: the card stage, the catalog and the Hub test server read what the Hub reads."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard import REGEX_YAML_BLOCK

from registry import frontmatter
from registry.card import front_matter
from registry.catalog import card_body, split_front_matter
from registry.testing.hub import _front_matter as hub_front_matter

CARDS = {
    "lf": "---\nlicense: mit\ntags: [merge]\n---\n# Model\n",
    "crlf": "---\r\nlicense: mit\r\ntags: [merge]\r\n---\r\n# Model\r\n",
    "leading blank line": "\n---\nlicense: mit\n---\n# Model\n",
    "spaces after the closing line": "---\nlicense: mit\n---   \n# Model\n",
    "closed at the end of the file": "---\nlicense: mit\n---",
    "no front matter": "# Model\n\n---\n\nlicense: mit\n",
    "a rule later in the body": "# Model\n---\nlicense: mit\n---\n",
    "not a mapping": "---\n- a\n- b\n---\n# Model\n",
    "empty block": "---\n\n---\n# Model\n",
}


def test_the_block_rule_is_huggingface_hubs():
    assert frontmatter.YAML_BLOCK.pattern == REGEX_YAML_BLOCK.pattern


@pytest.mark.parametrize("name", sorted(CARDS))
def test_every_reader_finds_the_metadata_the_hub_finds(name):
    text = CARDS[name]
    try:
        hub = ModelCard(text, ignore_metadata_errors=True).data.to_dict() or None
    except ValueError:  # "repo card metadata block should be a dict": no metadata
        hub = None
    # card.front_matter had its own stricter pattern: it found nothing in a CRLF card or one with a leading blank line.
    assert front_matter(text) == hub
    assert split_front_matter(text)[0] == hub
    served = hub_front_matter(text)
    assert (served if isinstance(served, dict) and served else None) == hub


@pytest.mark.parametrize("name", sorted(CARDS))
def test_the_body_is_what_follows_the_block(name):
    text = CARDS[name]
    match = REGEX_YAML_BLOCK.search(text)
    body = text[match.end():] if match else text
    assert card_body(text) == split_front_matter(text)[1] == frontmatter.split(text)[1] == body
    assert frontmatter.end(text) == (match.end() if match else 0)
