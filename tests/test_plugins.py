"""The plugin manager: built-ins and in-memory plugins go through the same hooks."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

from registry import hookspecs, plugins
from registry.errors import RecipeError, RegistryError
from registry.hookspecs import hookimpl
from registry.publish import Target, TargetOptions
from registry.recipe import parse_recipe

RECIPE = """\
repo_id: team/m
merge:
  merge_method: linear
  models:
    - {model: org/a, parameters: {weight: 0.5}}
    - {model: org/b, parameters: {weight: 0.5}}
publish:
  - target: s3
    bucket: models
    retries: many
"""


class S3Options(TargetOptions):
    bucket: str
    retries: int = 3


class S3Target(Target):
    name = "s3"
    Options = S3Options


class S3Plugin:
    @hookimpl
    def register_targets(self, register):
        register(S3Target)


@pytest.fixture
def s3_plugin():
    pm = plugins.get_plugin_manager()
    plugin = S3Plugin()
    pm.register(plugin, name="s3-plugin")
    yield plugin
    pm.unregister(plugin)


def test_every_hook_has_a_one_line_docstring():
    specs = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "registry_spec")]
    assert {f.__name__ for f in specs} >= {"register_targets", "register_smoke_checks", "register_template_dirs", "card_sections"}
    for spec in specs:
        doc = inspect.getdoc(spec)
        assert doc and "\n" not in doc, spec.__name__


def test_builtin_targets_register_through_the_hook():
    assert {"hf", "local"} <= set(plugins.get_targets())


def test_in_memory_plugin_target_options_are_validated(s3_plugin):
    with pytest.raises(RecipeError) as info:
        parse_recipe(RECIPE, "r.yaml", targets=plugins.get_targets())
    assert [str(p) for p in info.value.problems] == ["r.yaml:10:14: publish[0].retries: retries must be an integer, got 'many'"]
    recipe = parse_recipe(RECIPE.replace("many", "5"), "r.yaml", targets=plugins.get_targets())
    assert recipe.publish[0].options == S3Options(bucket="models", retries=5)


def test_a_target_registered_twice_is_refused(s3_plugin):
    class Again:
        @hookimpl
        def register_targets(self, register):
            register(S3Target)

    pm = plugins.get_plugin_manager()
    pm.register(Again(), name="again")
    try:
        with pytest.raises(RegistryError, match="publish target 's3' is registered twice"):
            plugins.get_targets()
    finally:
        pm.unregister(name="again")


def test_plugins_command_lists_builtins():
    run = subprocess.run([sys.executable, "-m", "registry", "plugins", "--format", "json"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    listed = {p["name"]: p for p in json.loads(run.stdout)}
    assert listed["registry.publish.hf"]["hooks"] == ["register_targets"]
    assert listed["registry.publish.local"]["package"] == "registry (built-in)"
