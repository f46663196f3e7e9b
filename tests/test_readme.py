"""The README's two set-up commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup_commands() -> list[str]:
    block = re.search(r"## Set up and run.*?```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README has a 'Set up and run' section with a sh block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_has_two_setup_commands_with_pinned_cpu_torch():
    main_job, tests = setup_commands()
    for command in (main_job, tests):
        assert "torch==2.13.0" in command
    assert tests.endswith("pytest -q")


def test_readme_test_command_installs_the_browser_the_catalog_tests_drive():
    tests = setup_commands()[1]
    assert tests.startswith("(command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)) && ")


def test_ci_runs_exactly_the_readme_test_command_and_nothing_else():
    commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd ", "#!"))]
    assert commands == [setup_commands()[1]]
