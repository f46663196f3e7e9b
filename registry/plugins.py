"""The plugin manager: built-ins and installed plugins (entry-point group `registry`) alike."""

from __future__ import annotations

import importlib
import os
from typing import Any

import pluggy

from . import hookspecs
from .errors import RegistryError

ENTRY_POINT_GROUP = "registry"
DEFAULT_PLUGINS = ("registry.publish.local", "registry.publish.hf", "registry.smoke_checks", "registry.signing")

_pm: pluggy.PluginManager | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and installed plugins loaded once."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("registry")
        pm.add_hookspecs(hookspecs)
        # REGISTRY_LOAD_PLUGINS="" loads no installed plugin; "a,b" loads only those distributions.
        only = os.environ.get("REGISTRY_LOAD_PLUGINS")
        if only is None:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        else:
            _load_some(pm, {name.strip() for name in only.split(",") if name.strip()})
        for name in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(name), name=name)
        _pm = pm
    return _pm


def _load_some(pm: pluggy.PluginManager, names: set[str]) -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.dist is not None and ep.dist.name in names:
            pm.register(ep.load(), name=ep.name)


def collect(hook: str, what: str) -> dict[str, Any]:
    """Everything plugins register through the `register(thing)` hook `hook`, by name; a name twice is an error."""
    found: dict[str, Any] = {}

    def register(thing: Any) -> None:
        if thing.name in found:
            raise RegistryError(f"{what} '{thing.name}' is registered twice")
        found[thing.name] = thing

    getattr(get_plugin_manager().hook, hook)(register=register)
    return found


def get_targets() -> dict[str, Any]:
    """Publish targets by name, from every plugin; a name registered twice is an error."""
    return collect("register_targets", "publish target")


def get_smoke_checks() -> list[Any]:
    """Every registered smoke check, built-ins included, in running order; a name registered twice is an error."""
    checks = collect("register_smoke_checks", "smoke check")
    return sorted(checks.values(), key=lambda c: getattr(c, "order", 100))


def get_evaluators() -> dict[str, Any]:
    """Evaluators (classes following registry.evaluate.Evaluator) by name, from every plugin; a name registered twice is an error."""
    return collect("register_evaluators", "evaluator")


def get_signers() -> dict[str, Any]:
    """Bundle signers by name (`key`, `sigstore`, plugins'); a name registered twice is an error."""
    return collect("register_signers", "signer")


def get_verify_sources() -> dict[str, Any]:
    """`registry verify` target schemes from plugins (`hf:` is built in), by scheme; a scheme registered twice is an error."""
    return collect("register_verify_sources", "verify source")


def list_plugins() -> list[dict[str, Any]]:
    """Every loaded plugin with the hooks it implements and the version of its distribution."""
    pm = get_plugin_manager()
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    out = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin) or repr(plugin)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        dist = dists.get(id(plugin))
        entry = {"name": name, "hooks": hooks}
        if dist is not None:
            entry["package"] = dist.project_name
            entry["version"] = dist.version
        else:
            from . import __version__

            entry["package"] = "registry (built-in)"
            entry["version"] = __version__
        out.append(entry)
    return sorted(out, key=lambda e: (e["package"] != "registry (built-in)", e["name"]))
