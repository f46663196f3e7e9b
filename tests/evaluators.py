"""A small, real evaluator for the evaluation tests: pass-key retrieval on the toy, by transformers generation.

It is what an evaluator plugin is (a class with a name, a package, an Options model, `version` and
`evaluate`), registered through the plugin manager by `registered()`; the core never sees the
difference from the lm-eval plugin.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from registry.errors import EvalError
from registry.evaluate import EvalRequest
from registry.hookspecs import hookimpl
from registry.recipe import DEFAULT_FILLER, DEFAULT_NEEDLE, DEFAULT_QUESTION
from registry.reports import MetricScore, TaskScores

TASK = "passkey"


class PassKeyOptions(BaseModel):
    """How long the prompts are and how many digits a key has."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tokens: int = Field(default=256, ge=64, le=4096)
    digits: int = Field(default=5, ge=1, le=16)


class PassKeyEvaluator:
    """Exact match of a pass key hidden at evenly spread depths of a filler text (one sample per depth)."""

    name: ClassVar[str] = "passkey"
    package: ClassVar[str] = "registry-tests"
    Options: ClassVar[type[BaseModel]] = PassKeyOptions
    # Every request this process made, for tests that assert what was (not) evaluated.
    calls: ClassVar[list[EvalRequest]] = []

    def version(self) -> str:
        """The task's version: its prompts change only when this does."""
        return "1"

    def evaluate(self, request: EvalRequest) -> dict[str, TaskScores]:
        """Score `request.model_dir` on the pass-key task."""
        from registry.smoke import NeedlePromptBuilder, eos_token_ids, greedy_generate, load_model, pass_key

        unknown = [t for t in request.tasks if t != TASK]
        if unknown:
            raise EvalError(f"unknown task '{unknown[0]}'; this evaluator has '{TASK}'")
        type(self).calls.append(request)
        options = request.options
        assert isinstance(options, PassKeyOptions)
        model, tokenizer = load_model(request.model_dir, request.device)
        builder = NeedlePromptBuilder(tokenizer, DEFAULT_FILLER, DEFAULT_NEEDLE, DEFAULT_QUESTION)
        n = request.limit or 8
        max_new = int(request.generation.get("max_gen_toks", options.digits + 4))
        hits = 0
        for i in range(n):
            depth = (i + 0.5) / n
            key = pass_key(options.tokens, depth, options.digits)
            prompt = builder.build(options.tokens, depth, key)
            gen = greedy_generate(model, prompt.ids, max_new, eos_token_ids(model, tokenizer))
            hits += key in tokenizer.decode(gen.tokens, skip_special_tokens=True)
        p = hits / n
        stderr = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None
        return {TASK: TaskScores(version=self.version(), samples=n, metrics={"exact_match": MetricScore(value=p, stderr=stderr)})}


class Plugin:
    """Registers the pass-key evaluator."""

    @hookimpl
    def register_evaluators(self, register):
        register(PassKeyEvaluator)


@contextmanager
def registered() -> Iterator[type[PassKeyEvaluator]]:
    """The pass-key evaluator registered with the process's plugin manager for the duration."""
    from registry.plugins import get_plugin_manager

    pm = get_plugin_manager()
    name = pm.register(Plugin())
    PassKeyEvaluator.calls.clear()
    try:
        yield PassKeyEvaluator
    finally:
        pm.unregister(name=name)
