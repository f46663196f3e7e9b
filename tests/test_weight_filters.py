"""One rule for filtered weights: the recipe's static check and the smoke test's weight check resolve them as mergekit does."""

from __future__ import annotations

import pytest

from registry.recipe import WeightFilter as F
from registry.recipe import weight_for

NAMES = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.10.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
    "",
]
WEIGHTS = [
    0.3,
    [F(filter="attn", value=0.1), F(value=0.5)],
    [F(filter="*", value=0.2), F(filter="mlp", value=0.9)],
    [F(filter="self_attn", value=0.4), F(filter="attn", value=0.7)],
    [F(filter="mlp", value=1.0)],
    [F(value=0.6), F(filter="mlp", value=0.1)],
    [F(filter="layers.1", value=0.25), F(filter="mlp", value=0.75), F(value=0.5)],
]


@pytest.mark.parametrize("weight", WEIGHTS, ids=range(len(WEIGHTS)))
def test_weight_for_resolves_filters_as_mergekit_does(weight):
    from mergekit.config import ConditionalParameter, evaluate_setting

    setting = weight if not isinstance(weight, list) else [ConditionalParameter(filter=w.filter, value=w.value) for w in weight]
    for name in NAMES:
        assert weight_for(weight, name) == evaluate_setting(name, setting, validate=float), name


def test_the_smoke_weight_check_uses_the_same_rule():
    from registry import smoke

    # smoke had its own copy; the static check matched filters by equality and ignored '*'.
    assert smoke.weight_for is weight_for
