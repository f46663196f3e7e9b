"""The identities that decide what is redone: merge, smoke and card.

- The merge identity covers everything that can change a weight bit or a file of the merged model:
  the `merge:` block with every model reference replaced by its pin, the config donor's pin, the
  hashes of the files carried over from the sources (config, tokenizer, templates), and the inputs'
  names (provenance is keyed by them). It keys the build folder, merge reuse and provenance. Text fields (summary, tags,
  labels, license) and templates are not part of it.
- The smoke identity is the merge identity plus the `smoke:` settings; it keys smoke reuse.
- The eval identity is the merge identity (or a parent's pin) plus the `eval:` settings that change a
  score (the config hash: all but the gate) and the evaluator's name and version; it keys eval reuse.
- The card identity is the rendered card's own hash; with the merge identity it decides whether a
  target is current.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .recipe import Recipe
    from .sources import Plan

# Bumped when what an identity covers changes, so old builds and reports stop matching.
_MERGE_SCHEME = "registry.merge/1"
_SMOKE_SCHEME = "registry.smoke/1"
_EVAL_SCHEME = "registry.eval/1"


def _digest(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def merge_identity(recipe: Recipe, plan: Plan) -> str:
    """Hash of what changes a weight bit: the merge block with references resolved to pins."""
    pinned = {}
    for item in recipe.inputs():
        src = plan.source(item.key)
        pinned[item.name] = f"{src.kind}:{src.pin}"
    block = _resolve(recipe.merge.model_dump(mode="json", exclude_defaults=True), pinned)
    donor = plan.source(plan.donor)
    inputs = [item.key for item in recipe.inputs()]
    carried = {src.name: src.carried for src in plan.sources}
    return _digest(_MERGE_SCHEME, block, inputs, f"{donor.kind}:{donor.pin}", carried)


def smoke_identity(merge_id: str, recipe: Recipe) -> str:
    """Hash of the merge identity and every smoke setting (defaults included)."""
    return _digest(_SMOKE_SCHEME, merge_id, recipe.smoke.model_dump(mode="json"))


def eval_config_sha256(settings: dict[str, Any]) -> str:
    """Hash of the eval settings that change a score (`EvalSpec.settings()`): eval.json's `config_sha256`."""
    return _digest(_EVAL_SCHEME, settings)


def eval_identity(model_id: str, config_sha256: str, evaluator: str, version: str) -> str:
    """Hash of what a score depends on: the model (a merge identity, or `kind:pin` for a parent), the settings, the evaluator."""
    return _digest(_EVAL_SCHEME, model_id, config_sha256, evaluator, version)


def card_identity(text: str) -> str:
    """Hash of the rendered card: templates, text fields and reports all show in it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _resolve(value: Any, pinned: dict[str, str]) -> Any:
    """`value` with every string naming a merge input replaced by that input's pin."""
    if isinstance(value, str):
        return {"pin": pinned[value]} if value in pinned else value
    if isinstance(value, dict):
        return {key: _resolve(v, pinned) for key, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, pinned) for v in value]
    return value
