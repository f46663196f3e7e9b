"""The `local` target: a directory registry, the embedded default that works offline."""

from __future__ import annotations

from ..hookspecs import hookimpl
from . import Target, TargetOptions


class LocalOptions(TargetOptions):
    """Options of the `local` target."""


class LocalTarget(Target):
    """Publishes into a directory registry (`.registry/` or `$REGISTRY_HOME`)."""

    name = "local"
    Options = LocalOptions


@hookimpl
def register_targets(register):
    register(LocalTarget)
