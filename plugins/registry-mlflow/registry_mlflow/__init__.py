"""registry-mlflow: the `mlflow` publish target, registering merged models in an MLflow Model Registry.

Installed, it is found through the `registry` entry-point group like any third-party plugin. This
module stays light (no mlflow import) because `registry validate` loads every plugin to check the
recipe's `publish:` options.
"""

from __future__ import annotations

from registry.hookspecs import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_targets(register):
    """Register the `mlflow` publish target."""
    from .target import MlflowTarget

    register(MlflowTarget)


@hookimpl
def register_verify_sources(register):
    """Register `mlflow:MODEL/VERSION` for `registry verify`: the version's artifacts, downloaded."""
    from registry.verify import VerifySource

    from .target import fetch_version

    register(VerifySource("mlflow", fetch_version))


@hookimpl
def register_commands(cli):
    """Add `registry mlflow ...` (inspect a registered model's versions, with --registry-uri)."""
    from .commands import mlflow_app

    # main() may run more than once in a process (tests); add the group once.
    if not any(group.name == "mlflow" for group in cli.registered_groups):
        cli.add_typer(mlflow_app, name="mlflow")
