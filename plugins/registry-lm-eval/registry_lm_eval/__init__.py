"""registry-lm-eval: the `lm-eval` evaluator, scoring merges and their parents with lm-evaluation-harness.

Installed, it is found through the `registry` entry-point group like any third-party plugin. This
module and `evaluator.py` stay light (no lm_eval or torch import) because `registry validate` loads
every plugin to check a recipe's `eval:` options.
"""

from __future__ import annotations

from registry.hookspecs import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_evaluators(register):
    """Register the `lm-eval` evaluator."""
    from .evaluator import LmEvalEvaluator

    register(LmEvalEvaluator)
