"""Evaluation: benchmark scores of a merge and of its parents, through an evaluator plugin.

An evaluator is a class registered through the `register_evaluators` hook (the lm-evaluation-harness
one ships as the `registry-lm-eval` distribution); the core never imports an evaluator's library.
It receives an `EvalRequest` and returns each task's scores; this module turns them into eval.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel

from .reports import TaskScores


@dataclass(frozen=True)
class EvalRequest:
    """One evaluation of one model folder: what an evaluator is asked to score."""

    model_dir: Path
    tasks: tuple[str, ...]
    limit: int | None  # samples per task; None: all
    # Generation settings as the recipe gives them (temperature, top_p, do_sample, max_gen_toks, seed, ...).
    generation: Mapping[str, Any]
    batch_size: int | str  # a number, or the evaluator's own word such as "auto"
    device: str
    options: BaseModel  # the evaluator's own Options, validated
    recipe_dir: Path | None = None  # relative paths in options resolve against it


@runtime_checkable
class Evaluator(Protocol):
    """What an evaluator plugin registers: a class with a name, its distribution, its Options model, and two methods."""

    name: ClassVar[str]
    package: ClassVar[str]  # the distribution that provides it, named in error messages
    Options: ClassVar[type[BaseModel]]

    def version(self) -> str:
        """The evaluator's version as eval.json records it (its library's version, for instance)."""
        ...

    def evaluate(self, request: EvalRequest) -> dict[str, TaskScores]:
        """Score `request.model_dir` on each of `request.tasks`: task name → its scores."""
        ...
