"""Publish targets: where a merged, smoke-tested model and its card go."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class TargetOptions(BaseModel):
    """Base for a target's options in a recipe's `publish:` list: strict, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Target:
    """A publish target; plugins subclass it and register it through `register_targets`."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = TargetOptions
