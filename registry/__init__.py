"""Declarative LLM merge recipes, turned into published, documented, smoke-tested models."""

__version__ = "0.1.0"


def registry_home():
    """Where builds, caches and the local registry live: $REGISTRY_HOME, else .registry/ in the current directory."""
    import os
    from pathlib import Path

    return Path(os.environ.get("REGISTRY_HOME") or ".registry").expanduser().absolute()


def build_root():
    """Where merges go by default: `<registry home>/build`, one folder per merge identity."""
    return registry_home() / "build"
