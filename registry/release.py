"""The recipe as published beside the model: `recipe.yaml` and `recipe.lock.json`, written and read only here.

`recipe.yaml` is the recipe as validated, ready to merge again: sources are named by alias, a Hub
source is pinned by its commit sha (`revision:`), and a local source's `model:` becomes the
environment reference `${REGISTRY_SOURCE_<ALIAS>}`, never a path or an environment value, so
`registry plan recipe.yaml` with that variable set to a folder holding the same weights rebuilds the
merge. `recipe.lock.json` is the lock `registry plan` wrote, with each entry's `model` as the
published recipe names it: `plan` reads it as that recipe's lock (the file name is the one it looks
for), so a local folder whose weights differ from the pin is refused, naming the source. The
`publish:` list (targets, signing keys) stays out of both: where to publish is not what was built.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ReportError
from .files import replace_atomically

if TYPE_CHECKING:
    from .recipe import Recipe
    from .sources import Plan

RECIPE_FILE = "recipe.yaml"
LOCK_FILE = "recipe.lock.json"
SOURCE_VARIABLE_PREFIX = "REGISTRY_SOURCE_"
_HEADER = (
    "# The recipe this model was merged from, as `registry publish` validated it. Sources are pinned:\n"
    "# a Hub source by commit, a local one by the content hash in recipe.lock.json; to merge it again, set\n"
    "# each ${" + SOURCE_VARIABLE_PREFIX + "...} variable to a folder holding those weights and run\n"
    "# `registry merge recipe.yaml`.\n"
)


class LockEntry(BaseModel):
    """One source's pin in a published lock (the format `registry plan` writes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["local", "hub"]
    model: str
    revision: str | None = None  # Hub: the revision the recipe asks for
    commit: str | None = None  # Hub: the commit sha it resolved to
    content_sha256: str | None = None  # local: the weights' content hash
    files: dict[str, str] | None = None  # local: weight file name -> sha256


class Lock(BaseModel):
    """A published `recipe.lock.json`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int
    sources: dict[str, LockEntry]


def source_variable(key: str) -> str:
    """The environment variable a published recipe reads a local source's folder from: `cos` -> REGISTRY_SOURCE_COS."""
    return SOURCE_VARIABLE_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", key).upper()


def release_texts(recipe: Recipe, plan: Plan) -> dict[str, str]:
    """The published recipe and lock, by file name: pinned, without a local path or the publish settings."""
    import yaml

    from .recipe import PUBLISH_SETTINGS, is_local_path, parse_recipe
    from .sources import LOCK_FORMAT, lock_entry

    data = recipe.model_dump(mode="json", exclude=PUBLISH_SETTINGS, exclude_defaults=True)
    sources: dict[str, Any] = data.setdefault("sources", {})
    renamed: dict[str, str] = {}  # a local model written in the merge block itself -> the alias it gets here
    lock: dict[str, Any] = {}
    variables = {}
    for item in recipe.inputs():
        src = plan.source(item.key)
        entry = lock_entry(src)
        if item.ref.kind == "local":
            variable = source_variable(item.key)
            if variables.setdefault(variable, item.key) != item.key:
                from .errors import PublishError

                raise PublishError(
                    f"sources '{variables[variable]}' and '{item.key}' would both read ${{{variable}}} in the published recipe",
                    "rename one of them",
                )
            model = "${" + variable + "}"
            if item.source is None:
                renamed[item.name] = item.key
                sources[item.key] = {"model": model}
            else:
                sources[item.key]["model"] = model
            entry["model"] = model
        elif item.source is not None:
            # Pinned by commit: the recipe asks for exactly the revision that was merged.
            sources[item.key]["model"] = src.repo_id
            sources[item.key]["revision"] = src.revision
            entry.update(model=src.repo_id, revision=src.revision)
        lock[item.key] = entry
    for alias, source in recipe.sources.items():
        if alias not in lock and is_local_path(source.model):
            sources[alias]["model"] = "${" + source_variable(alias) + "}"  # declared, not merged: no path either
    if renamed:
        data["merge"] = _renamed(data["merge"], renamed)
    if not sources:
        data.pop("sources")
    text = _HEADER + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
    # It must be an input, not only a record: a published recipe that would not validate is our bug.
    parse_recipe(text, RECIPE_FILE)
    lock_text = json.dumps({"format": LOCK_FORMAT, "sources": lock}, indent=2, sort_keys=True) + "\n"
    return {RECIPE_FILE: text, LOCK_FILE: lock_text}


def write_release(folder: Path, recipe: Recipe, plan: Plan) -> list[Path]:
    """Write `recipe.yaml` and `recipe.lock.json` into `folder` (each whole or not at all); returns their paths."""
    written = []
    for name, text in release_texts(recipe, plan).items():
        replace_atomically(folder / name, text.encode("utf-8"))
        written.append(folder / name)
    return written


def read_lock(folder: Path) -> Lock | None:
    """The published lock in `folder`, typed; None when there is none. ReportError when it is not one."""
    path = folder / LOCK_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot read the lock: {exc}") from None
    try:
        return Lock.model_validate_json(text)
    except ValidationError as exc:
        raise ReportError(f"{path}: not a registry lock ({exc.errors()[0]['msg']})", "publish the model again") from None


def read_recipe(folder: Path) -> Recipe | None:
    """The published recipe in `folder`, validated; None when there is none. RecipeError when it is invalid."""
    from .recipe import load_recipe

    path = folder / RECIPE_FILE
    if not path.is_file():
        return None
    return load_recipe(path)


def _renamed(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        return names.get(value, value)
    if isinstance(value, dict):
        return {key: _renamed(v, names) for key, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v, names) for v in value]
    return value
