"""Where templates come from: the team's folder, then plugins' folders, then the packaged defaults.

A team template can extend the default one it replaces through the `default:` prefix, e.g.
`{% extends "default:model_card.md.j2" %}`. The card (Markdown) and the catalog (HTML) each build
their own jinja2 environment on this loader.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import UsageError

DEFAULT_PREFIX = "default"


def default_template_dir() -> Path:
    """The packaged templates: `registry/templates` in a wheel, the repo's `templates/` in a checkout."""
    packaged = Path(__file__).parent / "templates"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "templates"


def template_dirs(team: Path | None = None, *, holding: str = "") -> list[Path]:
    """Folders searched before the packaged default: the team's (`./templates` unless given), then plugins'.

    `holding` names what a team folder must contain (e.g. "catalog") for it to count.
    """
    dirs: list[Path] = []
    if team is not None:
        if not (team / holding).is_dir():
            what = f"no {holding}/ folder of templates" if holding else "no such templates folder"
            raise UsageError(f"{team}: {what}", "give --templates the team's templates folder")
        dirs.append(team)
    elif (Path("templates") / holding).is_dir():
        dirs.append(Path("templates"))
    from .plugins import get_plugin_manager

    for found in get_plugin_manager().hook.register_template_dirs():
        for folder in [found] if isinstance(found, (str, os.PathLike)) else found or []:
            dirs.append(Path(folder))
    return dirs


def template_loader(dirs: Sequence[Path | str] = ()):
    """The given folders, then the packaged defaults; `default:NAME` always names the packaged NAME."""
    from jinja2 import ChoiceLoader, FileSystemLoader, PrefixLoader

    default = FileSystemLoader(str(default_template_dir()))
    return ChoiceLoader([
        PrefixLoader({DEFAULT_PREFIX: default}, delimiter=":"),
        FileSystemLoader([str(d) for d in dirs]),
        default,
    ])
