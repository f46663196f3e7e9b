"""Fixtures shared by the test files: the registry's own (registry.testing.fixtures), and the plugin
distributions under plugins/, each installed once into a folder of its own and found through its entry point."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pluggy
import pytest

pytest_plugins = ["registry.testing.fixtures"]

PLUGINS = Path(__file__).parent.parent / "plugins"


def install_plugin(tmp_path_factory, folder: str, module: str, entry: str) -> Path:
    """plugins/FOLDER built and pip-installed into a folder of its own, its `registry` entry point checked.

    Not into the venv: every other test would then load it (the validation corpus expects its names
    to be unknown). Subprocesses see it through PYTHONPATH, as an installed distribution.
    """
    site = tmp_path_factory.mktemp(f"{folder}-site")
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(PLUGINS / folder)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert (site / f"{module}-0.1.0.dist-info" / "entry_points.txt").read_text().split() == ["[registry]", entry, "=", module]
    return site


def registered_through_entry_point(site: Path, entry: str, project: str, hook: str) -> Any:
    """What the distribution installed in `site` registers through `hook`, found only through its entry point `entry`."""
    from registry import hookspecs

    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        pm = pluggy.PluginManager("registry")
        pm.add_hookspecs(hookspecs)
        assert pm.load_setuptools_entrypoints("registry", name=entry) == 1
        [(_, dist)] = pm.list_plugin_distinfo()
        assert (dist.project_name, dist.version) == (project, "0.1.0")
        found: dict[str, Any] = {}
        getattr(pm.hook, hook)(register=lambda thing: found.setdefault(thing.name, thing))
    finally:
        # The module stays imported, but other tests' plugin managers no longer find the distribution.
        sys.path.remove(str(site))
        importlib.invalidate_caches()
    assert list(found) == [entry]
    assert str(site) in sys.modules[found[entry].__module__].__file__
    return found[entry]


@pytest.fixture(scope="session")
def lm_eval_site(tmp_path_factory) -> Path:
    """plugins/registry-lm-eval, installed (the reference recipe's eval: section names its evaluator)."""
    return install_plugin(tmp_path_factory, "registry-lm-eval", "registry_lm_eval", "lm-eval")
