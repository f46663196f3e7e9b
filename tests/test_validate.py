"""Recipe validation: every invalid recipe in the corpus gets its exact message and position."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import typer.main
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.errors import RecipeError
from registry.output import shown
from registry.plugins import get_targets
from registry.recipe import Recipe, json_schema, load_recipe, parse_recipe

HERE = Path(__file__).parent
INVALID = HERE / "recipes" / "invalid"
VALID = HERE / "recipes" / "valid"
ROOT = HERE.parent

# Hand-written: file -> every problem, as "line:col: loc: message".
EXPECTED = {
    "01_typo_dtype.yaml": ["7:3: merge.dtpye: unknown key 'dtpye' (did you mean 'dtype'?)"],
    "02_typo_normalise.yaml": ["7:16: merge.parameters.normalise: unknown key 'normalise' (did you mean 'normalize'?)"],
    "03_alpha_for_weight.yaml": ["8:9: merge.models[1].parameters.alpha: unknown key 'alpha' (did you mean 'weight'?)"],
    "04_missing_weight.yaml": ["6:7: merge.models[1]: missing weight: add 'parameters: {weight: ...}'"],
    "05_nan_weight.yaml": ["5:43: merge.models[0].parameters.weight: weight must be a finite number, got .nan"],
    "06_inf_weight.yaml": ["6:43: merge.models[1].parameters.weight: weight must be a finite number, got -.inf"],
    "07_string_weight.yaml": [
        "5:43: merge.models[0].parameters.weight: weight must be a number or a list of {filter, value} entries, got '0.3'"
    ],
    "08_bool_weight.yaml": [
        "5:43: merge.models[0].parameters.weight: weight must be a number or a list of {filter, value} entries, got true"
    ],
    "09_zero_sum.yaml": ["5:5: merge.models: weights sum to 0; with normalize: true every merged tensor would be NaN"],
    "10_negative_normalized.yaml": [
        "6:43: merge.models[1].parameters.weight: negative weight -0.5 with normalize: true; "
        "if you mean it, set 'parameters: {normalize: false}' under merge"
    ],
    "11_one_model.yaml": ["5:5: merge.models: a merge needs at least two models, got 1"],
    "12_no_models.yaml": ["4:11: merge.models: a merge needs at least two models, got 0"],
    "13_duplicate_model.yaml": [
        "7:15: merge.models[2].model: 'org/a@v1' is the same model as merge.models[0]; list each model once"
    ],
    "14_duplicate_via_alias.yaml": ["9:15: merge.models[1].model: 'b' is the same model as merge.models[0]; list each model once"],
    "15_plus_in_local_path.yaml": [
        "3:14: sources.a.model: local path '/data/ckpt+lora' contains '+', which mergekit reads as a LoRA adapter; "
        "rename or symlink the directory"
    ],
    "16_at_in_local_path.yaml": [
        "5:15: merge.models[0].model: local path './runs/exp@2' contains '@', which mergekit reads as a revision; "
        "rename or symlink the directory"
    ],
    "17_unknown_dtype.yaml": [
        "7:10: merge.dtype: unknown dtype 'bf16' (did you mean 'bfloat16'?); expected one of float32, float16, bfloat16"
    ],
    "18_unknown_out_dtype.yaml": ["7:14: merge.out_dtype: unknown dtype 'int8'; expected one of float32, float16, bfloat16"],
    "19_bad_repo_id_chars.yaml": [
        "1:10: repo_id: 'team/my model' is not a Hub repo id: use letters, digits, '-', '_' and '.', "
        "without '--' or '..' and not starting or ending with '-' or '.'"
    ],
    "20_repo_id_too_long.yaml": [
        "1:10: repo_id: 'team/" + "a" * 102 + "' is not a Hub repo id: 'aaaaaaaaaaaa...' is longer than 96 characters"
    ],
    "21_repo_id_no_namespace.yaml": ["1:10: repo_id: 'mymodel' is not a Hub repo id: expected 'owner/name'"],
    "22_model_bad_hub_id.yaml": [
        "6:15: merge.models[1].model: 'org--x/b' is not a Hub repo id: use letters, digits, '-', '_' and '.', "
        "without '--' or '..' and not starting or ending with '-' or '.' (local paths start with '/', './', '../', '~' or '${')"
    ],
    "23_not_mapping_list.yaml": ["1:1: recipe must be a mapping of keys, got a list"],
    "24_not_mapping_scalar.yaml": ["1:1: recipe must be a mapping of keys, got the scalar 'just a string'"],
    "25_syntax_error.yaml": ["6:5: YAML syntax error: did not find expected ',' or '}'"],
    "26_tab_indent.yaml": ["3:1: YAML syntax error: found character that cannot start any token"],
    "27_alias_bomb.yaml": ["1:44: document expands to more than 100,000 nodes (an alias bomb?)"],
    "28_empty.yaml": ["1:1: recipe is empty; expected a mapping of keys such as repo_id, sources, merge"],
    "29_duplicate_key.yaml": ["8:3: merge.dtype: duplicate key 'dtype'"],
    "30_unsupported_method.yaml": ["3:17: merge.merge_method: merge method 'ties' is not supported yet; registry executes: linear"],
    "31_misspelled_method.yaml": ["3:17: merge.merge_method: unknown merge method 'linaer' (did you mean 'linear'?)"],
    "32_unknown_alias.yaml": [
        "9:15: merge.models[1].model: 'fmtt' is not a declared source (did you mean 'fmt'?); "
        "declared sources: cos, fmt; a Hub model is written 'owner/name'"
    ],
    "33_bad_env_ref.yaml": [
        "3:16: sources.cos.model: '${CHECK POINTS}' is not a valid environment reference: use ${NAME} with letters, digits and '_'"
    ],
    "34_bare_dollar.yaml": ["3:16: sources.cos.model: '${ROOT}/$RUN/cos': write environment references as ${NAME}"],
    "35_unknown_top_key.yaml": ["2:1: sumary: unknown key 'sumary' (did you mean 'summary'?)"],
    "36_missing_merge.yaml": ["1:1: missing required key 'merge'"],
    "37_unknown_target.yaml": ["8:13: publish[0].target: unknown publish target 'hff' (did you mean 'hf'?); available: hf, local"],
    "38_plugin_target_missing.yaml": [
        "8:13: publish[0].target: unknown publish target 'mlflow': it is provided by the plugin package "
        "'registry-mlflow' (pip install registry-mlflow)"
    ],
    "39_target_option_typo.yaml": ["9:5: publish[0].privte: unknown key 'privte' (did you mean 'private'?)"],
    "40_target_option_type.yaml": ["9:14: publish[0].private: private must be true or false, got 'yes'"],
    "41_filtered_weight_nan.yaml": ["9:21: merge.models[0].parameters.weight[1].value: value must be a finite number, got .nan"],
    "42_filtered_zero_sum.yaml": [
        "5:5: merge.models: weights sum to 0 for tensors matching 'mlp'; with normalize: true every merged tensor would be NaN"
    ],
    "43_filter_entry_typo.yaml": ["8:14: merge.models[0].parameters.weight[0].filtr: unknown key 'filtr' (did you mean 'filter'?)"],
    "44_unknown_license.yaml": [
        "2:10: license: unknown license 'apache2' (did you mean 'apache-2.0'?); "
        "use a Hub license id, or 'other' with license_name and license_link"
    ],
    "45_other_license_incomplete.yaml": ["2:10: license: license 'other' needs license_name and license_link"],
    "46_revision_twice.yaml": ["3:36: sources.a.revision: revision given twice: '@main' in model and revision: 'v2'"],
    "47_revision_on_local.yaml": ["3:34: sources.a.revision: revision applies to Hub models only; this source is a local path"],
    "48_lora_hub.yaml": ["5:15: merge.models[0].model: 'org/a+org/lora': LoRA adapters ('model+adapter') are not supported yet"],
    "49_tokenizer_both.yaml": ["9:5: merge.tokenizer: give either tokenizer_source or tokenizer, not both"],
    "50_mergekit_config_typo.yaml": ["9:7: models[1].parameters.wieght: unknown key 'wieght' (did you mean 'weight'?)"],
    "51_mergekit_slices.yaml": ["1:1: slices: slices are not supported yet; list whole models under 'models:'"],
    "52_smoke_bounds.yaml": [
        "8:27: smoke.short.max_new_tokens: max_new_tokens should be greater than or equal to 1, got 0",
        "9:24: smoke.long.depths[1]: depths should be less than or equal to 1, got 1.5",
    ],
    "53_merge_keys.yaml": ["6:35: YAML merge keys ('<<') are not supported in recipes; write the keys out"],
    "54_bad_alias_name.yaml": [
        "3:3: sources.my model: source alias 'my model' must start with a letter or '_' and use letters, digits, '_', '-' and '.'"
    ],
    "55_too_large.yaml": ["1:1: file is 1,048,605 bytes; recipes are limited to 1 MiB"],
    "56_not_utf8.yaml": ["2:1: recipe is not UTF-8 text; save it as UTF-8"],
    "57_huge_weights.yaml": [
        "5:43: merge.models[0].parameters.weight: weight must be at most 1,000,000 in magnitude, got 1.7e+308; "
        "weights are relative, so scale them all down",
        "6:43: merge.models[1].parameters.weight: weight must be at most 1,000,000 in magnitude, got 1.7e+308; "
        "weights are relative, so scale them all down",
    ],
    "58_huge_filtered_weight.yaml": [
        "8:34: merge.models[0].parameters.weight[0].value: value must be at most 1,000,000 in magnitude, got -2e+06; "
        "weights are relative, so scale them all down"
    ],
    "59_weights_vanish_in_float32.yaml": [
        "5:5: merge.models: weights sum to 4e-46, which is 0 in float32, the precision mergekit merges in; "
        "with normalize: true every merged tensor would be NaN; scale the weights up"
    ],
    "60_allow_unrelated_not_bool.yaml": ["2:18: allow_unrelated: allow_unrelated must be true or false, got 'yes'"],
    # mergekit matches a filter anywhere in a tensor's name and takes the first match: self_attn tensors
    # get 0 from both models ('attn' is part of 'self_attn'); '*' listed first wins over 'mlp'.
    "61_filter_substring_zero_sum.yaml": [
        "5:5: merge.models: weights sum to 0 for tensors matching 'self_attn'; with normalize: true every merged tensor would be NaN"
    ],
    "62_filter_star_first_zero_sum.yaml": [
        "5:5: merge.models: weights sum to 0 for tensors matching 'mlp'; with normalize: true every merged tensor would be NaN"
    ],
}


def problems_of(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, targets=get_targets())
    for p in info.value.problems:
        assert p.file == str(path)
    return [f"{p.line}:{p.col}: {p.loc + ': ' if p.loc else ''}{p.message}" for p in info.value.problems]


def test_corpus_is_complete():
    on_disk = sorted(p.name for p in INVALID.glob("*.yaml"))
    assert on_disk == sorted(EXPECTED)
    assert len(on_disk) >= 40


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_invalid_recipe(name):
    assert problems_of(INVALID / name) == EXPECTED[name]


NEWLINE_BASE = {
    "repo_id": "team/x",
    "ancestor": "org/base",
    "sources": {"a": {"model": "org/a", "revision": "main", "hub_id": "org/a-public"}, "b": {"model": "org/b"}},
    "merge": {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.5}},
                                                   {"model": "b", "parameters": {"weight": 0.5}}]},
}
HUB_ID_RULE = "use letters, digits, '-', '_' and '.', without '--' or '..' and not starting or ending with '-' or '.'"


@pytest.mark.parametrize(("field", "expected"), [
    ("repo_id", f"repo_id: 'team/x\\n' is not a Hub repo id: {HUB_ID_RULE}"),
    ("ancestor", f"ancestor: 'org/base\\n' is not a Hub repo id: {HUB_ID_RULE}"),
    ("alias", "sources.a\n: source alias 'a\\n' must start with a letter or '_' and use letters, digits, '_', '-' and '.'"),
    ("model", "sources.a.model: model reference contains a control character"),
    ("revision", "sources.a.revision: revision must be a branch, tag or commit sha"),
    ("hub_id", f"sources.a.hub_id: 'org/a-public\\n' is not a Hub repo id: {HUB_ID_RULE}"),
    ("model@revision", "merge.models[1].model: model reference contains a control character"),
])
def test_a_trailing_newline_is_refused_in_every_id(field, expected):
    """`$` matches before a final newline: every id pattern must match the whole string."""
    data = json.loads(json.dumps(NEWLINE_BASE))
    if field in ("repo_id", "ancestor"):
        data[field] += "\n"
    elif field == "alias":
        data["sources"]["a\n"] = data["sources"].pop("a")
        data["merge"]["models"][0]["model"] = "a\n"
    elif field == "model@revision":
        data["merge"]["models"][1]["model"] = "org/b@main\n"
    else:
        data["sources"]["a"][field] += "\n"
    with pytest.raises(RecipeError) as info:
        parse_recipe(json.dumps(data), "nl.yaml")
    assert [f"{p.loc}: {p.message}" for p in info.value.problems] == [expected]


@pytest.mark.parametrize("path", sorted(VALID.glob("*.yaml")), ids=lambda p: p.name)
def test_real_world_configs_validate(path):
    recipe = load_recipe(path, targets=get_targets())
    assert len(recipe.merge.models) >= 2


def test_shipped_recipes_validate():
    ref = load_recipe(ROOT / "recipes" / "cos_fmt.yaml", targets=get_targets())
    assert ref.repo_id == "Zachary1150/merge_linear_cos0.3fmt0.7_MRL4096_ROLLOUT4_LR1e-6"
    assert [(i.name, i.weight, i.ref.kind) for i in ref.inputs()] == [("cos", 0.3, "local"), ("fmt", 0.7, "local")]
    assert ref.merge.parameters.normalize is True
    assert ref.merge.dtype == "bfloat16"
    assert ref.smoke.long.context_tokens == 131072
    assert ref.ancestor == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    for path in (ROOT / "recipes" / "examples").glob("*.yaml"):
        load_recipe(path, targets=get_targets())


def test_mergekit_config_is_read_as_recipe():
    recipe = load_recipe(VALID / "mergekit_tokenizer_union.yaml")
    assert recipe.repo_id == "local/mergekit_tokenizer_union"
    assert recipe.merge.tokenizer_source == "union"
    assert recipe.merge.out_dtype == "bfloat16"
    refs = [i.ref for i in recipe.inputs()]
    assert [(r.kind, r.value, r.revision) for r in refs] == [
        ("hub", "Qwen/Qwen2.5-1.5B-Instruct", None),
        ("hub", "Qwen/Qwen2.5-Math-1.5B", "main"),
    ]


def test_windows_and_home_paths_are_local():
    recipe = load_recipe(VALID / "mergekit_windows_paths.yaml")
    assert [(i.ref.kind, i.ref.value) for i in recipe.inputs()] == [
        ("local", "C:\\Models\\My Checkpoints\\run 1"),
        ("local", "D:/Models/My Checkpoints/run 2"),
    ]


def test_aliases_resolve_with_revisions_and_options():
    recipe = load_recipe(VALID / "recipe_hub_sources.yaml", targets=get_targets())
    assert [str(i.ref) for i in recipe.inputs()] == [
        "Qwen/Qwen2.5-Math-1.5B@4a83ca6e4526a4f2da3aa259ec36c259f66b2ab2",
        "Qwen/Qwen2.5-Coder-1.5B@v1.0",
        "~/checkpoints/ft-3",
    ]
    hf = recipe.publish[0].options
    assert (hf.private, hf.revision, hf.create_pr) == (True, "staging", False)


def test_sha256_ignores_formatting_and_publish_settings():
    a = parse_recipe(
        "repo_id: t/m\nmerge: {merge_method: linear, models: [{model: o/a, parameters: {weight: 1}}, {model: o/b, parameters: {weight: 1}}]}\n"
    )
    b = parse_recipe(
        "# comment\nrepo_id: t/m\npublish: [{target: local}]\nmerge:\n  merge_method: linear\n"
        "  models:\n    - {model: o/a, parameters: {weight: 1}}\n    - {model: o/b, parameters: {weight: 1}}\n"
    )
    c = parse_recipe(
        "repo_id: t/m\nmerge: {merge_method: linear, models: [{model: o/a, parameters: {weight: 1}}, {model: o/b, parameters: {weight: 2}}]}\n"
    )
    assert a.sha256 == b.sha256 != c.sha256


def test_json_schema_knows_targets_and_forbids_unknown_keys():
    schema = json_schema(get_targets())
    assert schema["additionalProperties"] is False
    targets = {v["properties"]["target"]["const"] for v in schema["properties"]["publish"]["items"]["anyOf"]}
    assert targets == {"hf", "local"}
    assert schema["$defs"]["MergeConfig"]["additionalProperties"] is False


# ---------------------------------------------------------------------------------------------
# Property: whatever the document, the result is a Recipe or a RecipeError with a position.

KEYS = ["repo_id", "summary", "license", "sources", "merge", "merge_method", "models", "model", "parameters",
        "weight", "normalize", "dtype", "filter", "value", "smoke", "publish", "target", "label", "revision",
        "tokenizer", "tokenizer_source", "base_model", "depths", "x"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["linear", "org/a", "./ckpt", "${HOME}/x", "bfloat16", "cos", "a+b", "@", "", "hf", "local", "mit"]),
    st.text(max_size=8),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(KEYS), children, max_size=5),
    ),
    max_leaves=25,
)


def _mutations(text: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(text),
        st.integers(0, max(len(text) - 1, 0)).map(lambda i: text[:i]),
        st.tuples(st.integers(0, len(text)), st.sampled_from(["{", "]", ":", "&a ", "*a", "\t", "- ", "'", "\n  "])).map(
            lambda t: text[: t[0]] + t[1] + text[t[0]:]
        ),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_document_is_a_recipe_or_a_located_error(data):
    doc = data.draw(documents)
    if data.draw(st.booleans()):
        # Start from a valid recipe and overwrite parts of it, to reach the deeper checks.
        base = yaml.safe_load((ROOT / "recipes" / "cos_fmt.yaml").read_text())
        if isinstance(doc, dict):
            base["merge"].update(doc) if data.draw(st.booleans()) else base.update(doc)
        doc = base
    text = yaml.safe_dump(doc, allow_unicode=True)
    text = data.draw(_mutations(text))
    try:
        recipe = parse_recipe(text, "fuzz.yaml")
    except RecipeError as exc:
        assert exc.problems
        for p in exc.problems:
            assert p.file == "fuzz.yaml" and p.line >= 1 and p.col >= 1 and p.message
    else:
        assert isinstance(recipe, Recipe)
        for entry in recipe.merge.models:
            weight = entry.parameters.weight
            values = [weight] if isinstance(weight, float) else [w.value for w in weight]
            assert all(math.isfinite(v) and abs(v) <= 1e6 for v in values)


# ---------------------------------------------------------------------------------------------
# The command line


def registry(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "registry", *args], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, **(env or {})}, timeout=60,
    )


def test_validate_reports_each_problem_and_exits_1():
    run = registry("validate", str(INVALID / "10_negative_normalized.yaml"), str(VALID / "mergekit_three_fp16.yaml"))
    assert run.returncode == 1
    assert run.stdout.splitlines() == [
        f"error {INVALID / '10_negative_normalized.yaml'}:6:43: merge.models[1].parameters.weight: negative weight -0.5 "
        "with normalize: true; if you mean it, set 'parameters: {normalize: false}' under merge",
        f"ok    {VALID / 'mergekit_three_fp16.yaml'}  (local/mergekit_three_fp16)",
        "1 of 2 recipes invalid",
    ]
    assert "Traceback" not in run.stderr


def test_validate_json_is_machine_readable():
    run = registry("validate", "--format", "json", str(INVALID / "01_typo_dtype.yaml"))
    assert run.returncode == 1
    report = json.loads(run.stdout)
    assert report["valid"] is False
    assert report["recipes"][0]["problems"] == [
        {"file": str(INVALID / "01_typo_dtype.yaml"), "line": 7, "col": 3, "loc": "merge.dtpye",
         "message": "unknown key 'dtpye' (did you mean 'dtype'?)"}
    ]


def test_validate_defaults_to_recipes_folder(lm_eval_site):
    # The reference recipe's eval: section names the lm-eval evaluator, which its plugin provides.
    run = registry("validate", "--format", "json", env={"PYTHONPATH": os.pathsep.join([str(ROOT), str(lm_eval_site)])})
    assert run.returncode == 0, run.stdout + run.stderr
    files = [r["file"] for r in json.loads(run.stdout)["recipes"]]
    assert "recipes/cos_fmt.yaml" in files and any(f.startswith("recipes/examples/") for f in files)


def test_missing_path_is_a_usage_error():
    run = registry("validate", "no/such/recipe.yaml")
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr.strip() == "error: no/such/recipe.yaml: no such file or directory"


def test_bad_option_is_a_usage_error():
    run = registry("validate", "--format", "xml")
    assert run.returncode == 2
    assert "Traceback" not in run.stderr


def test_traceback_only_with_registry_debug():
    quiet = registry("validate", "missing.yaml")
    loud = registry("validate", "missing.yaml", env={"REGISTRY_DEBUG": "1"})
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "UsageError" in loud.stderr


def test_version_and_help():
    run = registry("--version")
    assert run.returncode == 0 and run.stdout.startswith("registry ")
    run = registry("--help")
    assert run.returncode == 0
    for command in ("validate", "schema", "plugins"):
        assert command in run.stdout


def test_schema_command_prints_json_schema():
    run = registry("schema")
    assert run.returncode == 0
    assert json.loads(run.stdout)["title"] == "Recipe"


def test_validate_imports_no_heavy_library(lm_eval_site):
    # With the lm-eval plugin the reference recipe's eval: section needs: validating its options imports no lm_eval either.
    code = (
        "import sys\n"
        "from registry.cli import main\n"
        "try:\n    main(['validate', 'recipes'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'mergekit', 'huggingface_hub', 'safetensors',\n"
        "                           'registry.smoke', 'registry.sources', 'rich', 'lm_eval') if m in sys.modules)\n"
        "assert 'registry.publish.hf' in sys.modules  # the plugins were loaded, so the check above means something\n"
        "print('HEAVY', heavy)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(lm_eval_site)])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "HEAVY []"


# ---------------------------------------------------------------------------------------------
# Property: user text in any field or file name is printed literally and never drives the terminal
# or a CI runner, whichever command shows it and in either format.

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Recipe Author", "GIT_AUTHOR_EMAIL": "author@example.com",
    "GIT_COMMITTER_NAME": "Recipe Author", "GIT_COMMITTER_EMAIL": "author@example.com",
    "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
}
HOSTILE_PIECES = [
    "[/red]", "[bold]", "[/]", "[draft] ", "[link=http://x]", "\\", ":smile:", "::error ::x", "\n::error file=a::b",
    "\n::set-output name=x::y", "\n::add-mask::s", "\r::warning::w", "\n  ::notice::n", "\u00a0::group::g", "\n##[error]e",
    "\x1b[31m", "\x1b]0;title\x07", "\x07", "\x00", "\x7f", "\x9b2J", "\u2028", "\u202e", "\t", "`", "|", "*", "#", "'", '"',
]
hostile = st.lists(
    st.one_of(st.sampled_from(HOSTILE_PIECES), st.text(alphabet="ab/[]:#\n\r\t\x1b\\ ", max_size=4)), min_size=1, max_size=4,
).map("".join)
markup_words = st.lists(st.sampled_from(["[/red]", "[bold]", "[/]", "::error::x", "##[error]", ":smile:", "\\", "*", "a"]),
                        min_size=1, max_size=3).map("".join)
file_names = st.lists(
    st.one_of(st.sampled_from([p.replace("\x00", "") for p in HOSTILE_PIECES]), st.text(alphabet="ab[]:#\n\r\t\x1b\\ '", max_size=4)),
    min_size=1, max_size=3,
).map(lambda parts: "".join(parts).replace("/", "").lstrip(".")).filter(bool).map(lambda stem: stem + ".yaml")
# Control characters other than \t and \n (and the C1 set, line separators and bidi controls) must never be printed raw.
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def hostile_recipe(data: st.DataObject) -> tuple[str, dict]:
    """A recipe with hostile text in every string field; half of them valid, so that the card renders."""
    valid = data.draw(st.booleans())

    def text(word: bool = False) -> str:
        # Paths, tags and ids refuse control characters and spaces: a recipe meant to be valid gets markup there.
        return data.draw(markup_words if word and valid else hostile)

    fields = {
        "repo_id": data.draw(st.sampled_from(["team/merge", "team/m.v2"])) if valid else text(),
        "summary": text(),
        "license": "other", "license_name": text(), "license_link": text(),
        "ancestor": text(),
        "tags": [text(word=True), text(word=True)],
        "sources": {
            "a": {"model": "${CHECKPOINTS}/" + text(word=True), "label": text()},
            "b": {"model": "./" + text(word=True), "label": text()},
        },
        "merge": {"merge_method": "linear", "models": [
            {"model": "a", "parameters": {"weight": 0.3}}, {"model": "b", "parameters": {"weight": 0.7}}]},
        "smoke": {"short": {"prompt": text()}},
    }
    if valid:
        for key in ("ancestor", "license", "license_name", "license_link"):  # Hub ids and URLs: no room for markup
            fields.pop(key)
    return fields["repo_id"], fields


def run_cli(*args: str) -> tuple[int, str, str]:
    """The CLI in this process (as fast as a property test needs), its exit code and both streams."""
    from registry.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    built_once = mock.patch.object(typer.main, "get_command", _build_command_once)
    with built_once, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


# typer rebuilds the click command tree on every call (0.1 s): the property test builds it once.
_build_command_once = functools.cache(typer.main.get_command)


def assert_inert(code: int, out: str, err: str) -> None:
    assert code in (0, 1), (code, out, err)
    assert "Traceback" not in err and "internal error" not in err, err
    for stream in (out, err):
        assert not RAW_CONTROL.search(stream), stream
        for line in stream.split("\n"):
            assert not line.lstrip().startswith(("::", "##[")), line


def git_run(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, env={**os.environ, **GIT_ENV}, check=True)
    return done.stdout.decode().strip()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_user_text_is_printed_literally_and_never_as_a_workflow_command(data):
    repo_id, fields = hostile_recipe(data)
    name = data.draw(file_names)
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        repo = Path(tmp)
        git_run(repo, "init", "-q", "-b", "main")
        git_run(repo, "commit", "-q", "--allow-empty", "-m", "base")
        base = git_run(repo, "rev-parse", "HEAD")
        (repo / "recipes").mkdir()
        (repo / "recipes" / name).write_text(yaml.safe_dump(fields, allow_unicode=True), encoding="utf-8")
        git_run(repo, "add", "-A")
        git_run(repo, "commit", "-q", "-m", "hostile recipe")
        path = f"recipes/{name}"

        code, out, err = run_cli("validate", "recipes")
        assert_inert(code, out, err)
        valid = code == 0
        lines = out.splitlines()
        if valid:
            assert lines == [f"ok    {shown(path)}  ({shown(repo_id)})", "1 recipe valid"]
        else:
            assert lines[-1] == "1 of 1 recipe invalid"
            assert all(line.startswith(f"error {shown(path)}:") for line in lines[:-1])
        code, out, err = run_cli("validate", "--format", "json", "recipes")
        assert_inert(code, out, err)
        assert [r["file"] for r in json.loads(out)["recipes"]] == [path]

        for args in (["card", path], ["card", path, "--format", "json"], ["card", path, "-o", f"{name}.md"]):
            code, out, err = run_cli(*args)
            assert_inert(code, out, err)
            if code == 1:  # an invalid recipe, or a card refused (say, for text that looks like a path)
                assert out == "" and err and all(line.startswith("error: ") for line in err.splitlines()), (args, out, err)
                continue
            assert valid
            if "--format" in args:
                assert json.loads(out)["repo_id"] == repo_id
            if "-o" in args:
                assert out.startswith(f"wrote {shown(name)}.md for {shown(repo_id)} (")

        code, out, err = run_cli("ci", "changed", "--base", base)
        assert_inert(code, out, err)
        assert f"\n  {shown(path)}  added  [validate only]\n" in out
        code, out, err = run_cli("ci", "changed", "--base", base, "--format", "json")
        assert_inert(code, out, err)
        assert [(e["recipe"], e["valid"]) for e in json.loads(out)["include"]] == [(path, valid)]
        for fmt in ("text", "json"):
            code, out, err = run_cli("ci", "summary", "--base", base, "--format", fmt)
            assert_inert(code, out, err)


# ---------------------------------------------------------------------------------------------
# User text in the human output: literal, escaped, one line

TWO_MODELS = "merge: {merge_method: linear, models: [{model: o/a, parameters: {weight: 1}}, {model: o/b, parameters: {weight: 1}}]}\n"
HUB_ID_RULE = "use letters, digits, '-', '_' and '.', without '--' or '..' and not starting or ending with '-' or '.'"


def test_markup_and_control_characters_in_names_and_values_print_literally(tmp_path):
    recipes = tmp_path / "recipes"
    (recipes / "[").mkdir(parents=True)
    (recipes / "[draft] merge.yaml").write_text("repo_id: team/draft\n" + TWO_MODELS)
    (recipes / "[" / "x].yaml").write_text('repo_id: "[/red]\\e[31m\\n::error::x"\n' + TWO_MODELS)
    run = registry("validate", "recipes", cwd=tmp_path)
    assert (run.returncode, run.stderr) == (1, "")
    assert run.stdout.splitlines() == [
        f"error recipes/[/x].yaml:1:10: repo_id: '[/red]\\x1b[31m\\n::error::x' is not a Hub repo id: {HUB_ID_RULE}",
        "ok    recipes/[draft] merge.yaml  (team/draft)",
        "1 of 2 recipes invalid",
    ]


def test_plan_reports_a_markup_repo_id_as_one_error_line(tmp_path):
    (tmp_path / "r.yaml").write_text('repo_id: "[/red]"\n' + TWO_MODELS)
    run = registry("plan", "r.yaml", cwd=tmp_path)
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == f"error: r.yaml:1:10: repo_id: '[/red]' is not a Hub repo id: {HUB_ID_RULE}\n"


def test_error_messages_quoting_a_path_stay_on_their_line():
    run = registry("validate", "no/such\n::error::x[/b].yaml")
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr == "error: no/such\\n::error::x[/b].yaml: no such file or directory\n"
