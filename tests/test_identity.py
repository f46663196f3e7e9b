"""The three identities: each edit changes exactly the identities it must."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from registry.identity import card_identity, merge_identity, smoke_identity
from registry.recipe import load_recipe
from registry.sources import plan

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "tests" / "fixtures" / "toy"
RECIPE = (ROOT / "recipes" / "examples" / "toy_cos_fmt.yaml").read_text()


@pytest.fixture()
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REGISTRY_HOME", str(tmp_path / "home"))
    for name in ("ft_cos", "ft_fmt"):
        shutil.copytree(TOY / name, tmp_path / name)
    return tmp_path


def identities(workspace: Path, text: str) -> tuple[str, str]:
    path = workspace / "recipe.yaml"
    path.write_text(text.replace("../../tests/fixtures/toy/", "./"))
    recipe = load_recipe(path)
    merge_id = merge_identity(recipe, plan(recipe, check_resources=False))
    return merge_id, smoke_identity(merge_id, recipe)


@pytest.mark.parametrize(("edit", "old", "new", "merge_changes", "smoke_changes"), [
    ("summary", "summary: Linear merge", "summary: A linear merge", False, False),
    ("tag", "tags: [toy, example]", "tags: [toy]", False, False),
    ("label", "label: Toy fine-tune A", "label: Fine-tune A", False, False),
    ("license", "license: mit", "license: apache-2.0", False, False),
    ("repo id", "repo_id: registry-examples/toy-cos0.3-fmt0.7", "repo_id: team/renamed", False, False),
    ("publish target", "  - target: local", "  - target: hf", False, False),
    ("smoke setting", "max_new_tokens: 32", "max_new_tokens: 24", False, True),
    ("weight", "{weight: 0.3}", "{weight: 0.4}", True, True),
    ("dtype", "dtype: bfloat16", "dtype: float16", True, True),
    ("normalize", "{normalize: true}", "{normalize: false}", True, True),
])
def test_each_edit_changes_exactly_the_identities_it_must(workspace, edit, old, new, merge_changes, smoke_changes):
    assert old in RECIPE, edit
    merge_before, smoke_before = identities(workspace, RECIPE)
    merge_after, smoke_after = identities(workspace, RECIPE.replace(old, new))
    assert (merge_after != merge_before, smoke_after != smoke_before) == (merge_changes, smoke_changes)


def test_source_content_changes_the_merge_identity(workspace):
    before, _ = identities(workspace, RECIPE)
    weights = workspace / "ft_cos" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    path = workspace / "recipe.yaml"
    recipe = load_recipe(path)
    assert merge_identity(recipe, plan(recipe, update=True, check_resources=False)) != before


def test_a_carried_tokenizer_file_changes_the_merge_identity(workspace):
    before, _ = identities(workspace, RECIPE)
    template = workspace / "ft_fmt" / "chat_template.jinja"
    template.write_text(template.read_text() + "\n")
    recipe = load_recipe(workspace / "recipe.yaml")
    assert merge_identity(recipe, plan(recipe, update=True, check_resources=False)) != before


def test_card_identity_is_the_card_text():
    assert card_identity("---\na: 1\n---\nbody\n") != card_identity("---\na: 1\n---\nbody \n")
    assert card_identity("x") == card_identity("x")
