"""Fixtures shared by the test files: the registry's own (registry.testing.fixtures) and the lm-eval plugin, installed once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["registry.testing.fixtures"]


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """The plugin built from plugins/registry-lm-eval and pip-installed into a folder of its own (not the venv)."""
    site = tmp_path_factory.mktemp("lm-eval-plugin-site")
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(Path(__file__).parent.parent / "plugins" / "registry-lm-eval")],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert (site / "registry_lm_eval-0.1.0.dist-info" / "entry_points.txt").read_text().split() == [
        "[registry]", "lm-eval", "=", "registry_lm_eval",
    ]
    return site
