"""Atomic file replacement has one home (registry/files.py), and every writer of a file between stages uses it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from registry import files
from registry.card import write_card
from registry.publish.local import _locked_index
from registry.recipe import parse_recipe
from registry.sources import HashCache

RECIPE = """\
repo_id: team/test-merge
summary: A test merge
license: mit
merge:
  merge_method: linear
  models:
    - {model: org/a, parameters: {weight: 0.3}}
    - {model: org/b, parameters: {weight: 0.7}}
"""


def writers(tmp_path: Path):
    """(file, write it anew) for each writer of a file that another stage or process reads."""
    card = tmp_path / "card" / "README.md"

    def cache() -> None:
        c = HashCache(tmp_path / "cache" / "hashes.json")
        c.put(tmp_path / "x", os.stat(tmp_path), "0" * 64)
        c.save()

    def index() -> None:
        with _locked_index(tmp_path / "home") as data:
            data["models"] = [{"repo_id": "team/m"}]

    return {
        "card": (card, lambda: write_card(parse_recipe(RECIPE, "t.yaml"), card, template_dirs=())),
        "hash cache": (tmp_path / "cache" / "hashes.json", cache),
        "local index": (tmp_path / "home" / "index.json", index),
    }


@pytest.mark.parametrize("name", ["card", "hash cache", "local index"])
def test_a_writer_replaces_the_file_whole_and_leaves_a_hard_link_to_the_old_one_alone(tmp_path, name):
    path, write = writers(tmp_path)[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    old = '{"format": 1, "models": []}\n'
    path.write_text(old)
    published = tmp_path / "published-copy"
    os.link(path, published)
    write()
    assert published.read_text() == old and path.read_text() != old
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".") and p.name != ".lock") == []


def test_debris_of_another_writer_does_not_stop_a_card_from_being_written(tmp_path):
    # write_card used one fixed temporary name: a second writer, or a folder left there, made it fail.
    out = tmp_path / "README.md"
    (tmp_path / ".README.md.tmp").mkdir()
    text = write_card(parse_recipe(RECIPE, "t.yaml"), out, template_dirs=())
    assert out.read_text() == text and text.startswith("---\n")


def test_replace_atomically_leaves_nothing_behind_when_the_write_fails(tmp_path):
    target = tmp_path / "missing-folder" / "file.json"
    with pytest.raises(FileNotFoundError):
        files.replace_atomically(target, json.dumps({}).encode())
    assert list(tmp_path.iterdir()) == []
