"""The `hf` target: the Hugging Face Hub (or any server speaking its API, via HF_ENDPOINT)."""

from __future__ import annotations

from ..hookspecs import hookimpl
from . import Target, TargetOptions


class HfOptions(TargetOptions):
    """Options of the `hf` target."""

    private: bool = False
    revision: str | None = None
    create_pr: bool = False


class HfTarget(Target):
    """Publishes to a Hub model repo in one atomic commit."""

    name = "hf"
    Options = HfOptions


@hookimpl
def register_targets(register):
    register(HfTarget)
