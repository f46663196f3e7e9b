"""Did-you-mean hints for names a user mistyped: recipe keys, dtypes, merge methods, publish targets, evaluators.

A leaf module (it imports nothing from registry), so the recipe schema and the plugin manager can
both use it without importing each other.
"""

from __future__ import annotations

import difflib

# Words people write for the ones mergekit and the recipe expect.
SYNONYMS = {
    "alpha": "weight", "weights": "weight", "normalise": "normalize", "normalized": "normalize",
    "fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
    "float": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16",
    "torch.float32": "float32", "method": "merge_method",
}
# Targets provided by packages we know of, so an unknown target can say what to install.
KNOWN_PROVIDERS = {"mlflow": "registry-mlflow"}
# The evaluator an `eval:` section uses unless it names another, and where it comes from.
DEFAULT_EVALUATOR = "lm-eval"
KNOWN_EVALUATORS = {DEFAULT_EVALUATOR: ("registry-lm-eval", "./plugins/registry-lm-eval")}


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The closest of `choices` to `word` (or a known synonym), if any is close."""
    if word in SYNONYMS and SYNONYMS[word] in choices:
        return SYNONYMS[word]
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def missing_target_message(name: str, available: list[str]) -> str:
    """One line saying a target is unknown, what provides it, or what exists instead."""
    if name in KNOWN_PROVIDERS:
        package = KNOWN_PROVIDERS[name]
        return f"unknown publish target '{name}': it is provided by the plugin package '{package}' (pip install {package})"
    hint = suggest(name, available)
    near = f" (did you mean '{hint}'?)" if hint else ""
    return f"unknown publish target '{name}'{near}; available: {', '.join(sorted(available))}"


def missing_evaluator_message(name: str, available: list[str]) -> str:
    """One line saying an evaluator is unknown, which package provides it, or what exists instead."""
    if name in KNOWN_EVALUATORS:
        package, source = KNOWN_EVALUATORS[name]
        return f"unknown evaluator '{name}': it is provided by the plugin package '{package}' (pip install {source})"
    hint = suggest(name, [*available, *KNOWN_EVALUATORS])
    near = f" (did you mean '{hint}'?)" if hint else ""
    have = f"available: {', '.join(sorted(available))}" if available else "none is installed"
    return f"unknown evaluator '{name}'{near}; {have}"
