"""The `sweep:` section: a recipe that is a family of merges, its points, and every way it can be wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from registry.errors import RecipeError
from registry.recipe import format_weight, load_recipe, parse_recipe, parse_selection

ROOT = Path(__file__).parent.parent
TOY_SWEEP = ROOT / "recipes" / "examples" / "toy_sweep.yaml"

HEAD = """\
repo_id: {repo_id}
sources:
  cos: {{model: org/cos}}
  fmt: {{model: org/fmt}}
merge:
  merge_method: linear
  models:
    - model: cos
    - model: fmt
  parameters: {{normalize: {normalize}}}
sweep:
  family: cos-fmt
"""


MISSING_WEIGHTS = ["8:7: merge.models[0]: missing weight: add 'parameters: {weight: ...}'",
                   "9:7: merge.models[1]: missing weight: add 'parameters: {weight: ...}'"]


def recipe(sweep: str, *, repo_id: str = "team/m-cos{cos}-fmt{fmt}", normalize: str = "true"):
    return parse_recipe(HEAD.format(repo_id=repo_id, normalize=normalize) + sweep, "s.yaml")


def problems(sweep: str, **kwargs) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe(sweep, **kwargs)
    return [f"{p.line}:{p.col}: {p.loc + ': ' if p.loc else ''}{p.message}" for p in info.value.problems]


def test_the_toy_sweep_is_five_plain_recipes_with_the_weights_as_people_write_them():
    family = load_recipe(TOY_SWEEP)
    points = family.points()
    assert [(p.label, p.recipe.repo_id) for p in points] == [
        ("cos=0 fmt=1", "registry-examples/toy-cos0-fmt1"),
        ("cos=0.25 fmt=0.75", "registry-examples/toy-cos0.25-fmt0.75"),
        ("cos=0.5 fmt=0.5", "registry-examples/toy-cos0.5-fmt0.5"),
        ("cos=0.75 fmt=0.25", "registry-examples/toy-cos0.75-fmt0.25"),
        ("cos=1 fmt=0", "registry-examples/toy-cos1-fmt0"),
    ]
    for p in points:
        assert p.recipe.sweep is None and p.recipe.points() == [p.recipe.points()[0]]
        assert [(i.name, i.weight) for i in p.recipe.inputs()] == list(p.weights.items())
    # A point is the plain recipe that merges those weights: same hash, so the same merge identity.
    plain = load_recipe(ROOT / "recipes" / "examples" / "toy_cos_fmt.yaml")
    text = TOY_SWEEP.read_text().replace("cos: [0, 0.25, 0.5, 0.75, 1]", "cos: [0.3]")
    [point] = parse_recipe(text, str(TOY_SWEEP)).points()
    assert point.recipe.repo_id == plain.repo_id == "registry-examples/toy-cos0.3-fmt0.7"
    assert point.recipe.merge == plain.merge
    assert point.recipe.sha256 == plain.sha256


def test_a_plain_recipe_is_a_family_of_one():
    plain = load_recipe(ROOT / "recipes" / "examples" / "toy_cos_fmt.yaml")
    assert plain.family is None
    [only] = plain.points()
    assert only.recipe is plain and only.weights == {} and only.label == ""


@pytest.mark.parametrize(("written", "expected"), [
    (0.3, "0.3"), (0.1 + 0.2, "0.30000000000000004"), (1.0, "1"), (0.0, "0"), (-0.0, "0"),
    (0.25, "0.25"), (2.5e-05, "0.000025"), (10.0, "10"), (1e6, "1000000"),
])
def test_weights_format_as_written(written, expected):
    assert format_weight(written) == expected


def test_the_complement_is_exact_in_decimal():
    points = recipe("  grid:\n    cos: [0.1, 0.3, 0.7, 0.9]\n    fmt: 1 - cos\n").points()
    assert [p.recipe.repo_id for p in points] == ["team/m-cos0.1-fmt0.9", "team/m-cos0.3-fmt0.7", "team/m-cos0.7-fmt0.3",
                                                  "team/m-cos0.9-fmt0.1"]
    assert [p.weights["fmt"] for p in points] == [0.9, 0.7, 0.3, 0.1]


def test_a_grid_is_the_product_of_its_lists_first_alias_slowest():
    points = recipe("  grid:\n    cos: [1, 2]\n    fmt: [3, 4, 5]\n").points()
    assert [p.label for p in points] == ["cos=1 fmt=3", "cos=1 fmt=4", "cos=1 fmt=5", "cos=2 fmt=3", "cos=2 fmt=4", "cos=2 fmt=5"]


def test_explicit_points_may_use_the_complement():
    points = recipe("  points:\n    - {cos: 0.3, fmt: 1 - cos}\n    - {cos: 0.6, fmt: 0.4}\n").points()
    assert [p.weights for p in points] == [{"cos": 0.3, "fmt": 0.7}, {"cos": 0.6, "fmt": 0.4}]


@pytest.mark.parametrize(("sweep", "kwargs", "expected"), [
    ("  grid:\n    cos: [0.3, 0.7]\n    fmt: 1 - cos\n", {"repo_id": "team/m-{cos}-{fmtt}"},
     ["1:10: repo_id: placeholder {fmtt} in repo_id is not a swept alias (did you mean 'fmt'?); swept: cos, fmt"]),
    ("  grid:\n    cos: [0.3, 0.7]\n    fmt: 1 - cos\n", {"repo_id": "team/m-{cos:.2f}"},
     ["1:10: repo_id: repo_id placeholders are plain {alias}: weights are written as people write them (0.3)"]),
    ("  grid:\n    cos: [0.3, 0.7]\n    fmt: 1 - cos\n", {"repo_id": "team/m-{cos"},
     ["1:10: repo_id: repo_id 'team/m-{cos' is not a template: expected '}' before end of string"]),
    ("  grid:\n    cos: [0.3]\n    fmt: [0.5, 0.6]\n", {"repo_id": "team/m-cos{cos}"},
     ["1:10: repo_id: points cos=0.3 fmt=0.5 and cos=0.3 fmt=0.6 both publish to 'team/m-cos0.3'; put each swept alias in repo_id as {alias}"]),
    ("  points:\n    - {cos: 0.3, fmt: 0.7}\n    - {cos: 0.30, fmt: 0.7}\n", {},
     ["1:10: repo_id: points cos=0.3 fmt=0.7 and cos=0.3 fmt=0.7 both publish to 'team/m-cos0.3-fmt0.7'; "
      "put each swept alias in repo_id as {alias}"]),
    ("  grid:\n    cos: [0, 0.5]\n    fmt: [0, 1]\n", {},
     ["14:5: sweep.grid: point cos=0 fmt=0: weights sum to 0; with normalize: true every merged tensor would be NaN"]),
    ("  points:\n    - {cos: 0.5, fmt: 0.5}\n    - {cos: 0, fmt: 1 - 1}\n", {},
     ["15:21: sweep.points[1].fmt: 'fmt: 1 - 1' refers to '1', which is not given as numbers here; write '1 - ALIAS' of an alias with weights"]),
    ("  points:\n    - {cos: 0.5, fmt: 0.5}\n    - {cos: 0, fmt: 0}\n", {},
     ["15:7: sweep.points[1]: point cos=0 fmt=0: weights sum to 0; with normalize: true every merged tensor would be NaN"]),
    ("  grid:\n    cos: []\n    fmt: 1 - cos\n", {}, ["14:10: sweep.grid.cos: empty grid: 'cos' lists no weights"]),
    ("  grid: {}\n", {}, [*MISSING_WEIGHTS,
      "13:9: sweep.grid: empty grid: give each swept alias a list of weights"]),
    ("  points: []\n", {}, [*MISSING_WEIGHTS,
      "13:11: sweep.points: empty grid: points lists no points"]),
    ("  grid:\n    cos: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]\n    fmt: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]\n", {},
     ["14:5: sweep.grid: the sweep has 72 points, more than max_points (64); sweep fewer weights, or raise sweep.max_points"]),
    ("  max_points: 3\n  grid:\n    cos: [0.1, 0.2, 0.3, 0.4]\n    fmt: 1 - cos\n", {},
     ["15:5: sweep.grid: the sweep has 4 points, more than max_points (3); sweep fewer weights, or raise sweep.max_points"]),
    ("  grid:\n    cos: [0.3]\n    fmt: 1 - coss\n", {},
     ["15:10: sweep.grid.fmt: 'fmt: 1 - coss' refers to 'coss', which is not given as numbers here (did you mean 'cos'?); "
      "write '1 - ALIAS' of an alias with weights"]),
    ("  grid:\n    cos: [0.3]\n    fmt: half\n", {}, ["15:10: sweep.grid.fmt: 'fmt' must be a list of weights or '1 - ALIAS', got 'half'"]),
    ("  grid:\n    cos: [0.3, -0.2]\n    fmt: 1 - cos\n", {},
     ["14:16: sweep.grid.cos[1]: negative weight -0.2 with normalize: true; if you mean it, set 'parameters: {normalize: false}' under merge"]),
    ("  grid:\n    cos: [0.3, 2.0e+7]\n    fmt: 1 - cos\n", {},
     ["14:16: sweep.grid.cos[1]: weight must be at most 1,000,000 in magnitude, got 2e+07; weights are relative, so scale them all down"]),
    ("  grid:\n    cos: [0.3]\n    fmtt: 1 - cos\n", {"repo_id": "team/m-{cos}"},
     ["9:7: merge.models[1]: missing weight: add 'parameters: {weight: ...}'",
      "15:5: sweep.grid.fmtt: 'fmtt' is not a model of the merge (did you mean 'fmt'?); merge models: cos, fmt"]),
    ("  points:\n    - {cos: 0.3, fmt: 0.7}\n    - {cos: 0.6}\n", {},
     ["15:7: sweep.points[1]: point gives no weight for 'fmt'; every point weights every swept alias"]),
    ("  grid:\n    cos: [0.3]\n    fmt: 1 - cos\n  points: [{cos: 1, fmt: 1}]\n", {},
     ["12:3: sweep: give the weights either as grid: (alias: [weights]) or as points: ([{alias: weight}]), not both"]),
    ("  grid:\n    cos: [0.3]\n    fmt: 1 - cos\n  select: best:nlll\n", {},
     ["16:11: sweep.select: unknown metric 'nlll' (did you mean 'nll'?); use one of nll, kl, top1, retrieved or score:TASK/METRIC"]),
    ("  grid:\n    cos: [0, 0.5]\n    fmt: 1 - cos\n", {"normalize": "false"}, []),
])
def test_each_sweep_problem_is_located(sweep, kwargs, expected):
    if not expected:
        assert len(recipe(sweep, **kwargs).points()) == 2
        return
    assert problems(sweep, **kwargs) == expected


def test_a_swept_model_takes_no_weight_of_its_own():
    text = HEAD.format(repo_id="team/m-{cos}", normalize="true").replace(
        "    - model: cos\n", "    - model: cos\n      parameters: {weight: 0.5}\n")
    with pytest.raises(RecipeError) as info:
        parse_recipe(text + "  grid:\n    cos: [0.3, 0.4]\n", "s.yaml")
    assert [f"{p.line}:{p.col}: {p.loc}: {p.message}" for p in info.value.problems] == [
        "9:19: merge.models[0].parameters: 'cos' is swept: its weights come from sweep:; remove its parameters here",
        "10:7: merge.models[1]: missing weight: add 'parameters: {weight: ...}'",
    ]


def test_placeholders_without_a_sweep_are_named_as_such():
    text = HEAD.format(repo_id="team/m-{cos}", normalize="true").replace("sweep:\n  family: cos-fmt\n", "")
    weighted = "    - {model: cos, parameters: {weight: 1}}\n    - {model: fmt, parameters: {weight: 1}}\n"
    text = text.replace("    - model: cos\n    - model: fmt\n", weighted)
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "s.yaml")
    assert [p.message for p in info.value.problems] == [
        "repo_id 'team/m-{cos}' has placeholders, but the recipe has no sweep: section to fill them"]


@pytest.mark.parametrize(("text", "expected"), [
    ("passed", (None, 1)), ("best:nll", ("nll", 1)), ("best:top1:3", ("top1", 3)),
    ("best:score:aime24/exact_match", ("score:aime24/exact_match", 1)), ("best:score:aime24/exact_match:2", ("score:aime24/exact_match", 2)),
])
def test_selection_syntax(text, expected):
    chosen = parse_selection(text)
    assert (chosen.metric, chosen.top) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("best:kl:0", "select 'best:kl:0': the number of points must be a positive integer, got '0'"),
    ("best:nll:x", "unknown metric 'nll:x' (did you mean 'nll'?); use one of nll, kl, top1, retrieved or score:TASK/METRIC"),
    ("best", "select 'best' is not one of: passed, best:METRIC, best:METRIC:N"),
    ("top:nll", "select 'top:nll' is not one of: passed, best:METRIC, best:METRIC:N"),
])
def test_bad_selections_say_what_is_accepted(text, message):
    with pytest.raises(ValueError) as info:
        parse_selection(text)
    assert str(info.value) == message


def test_validate_shows_the_family_and_exits_1_on_a_bad_sweep(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(HEAD.format(repo_id="team/m-{cos}-{fmtt}", normalize="true") + "  grid:\n    cos: [0.3]\n    fmt: 1 - cos\n")
    run = subprocess.run([sys.executable, "-m", "registry", "validate", str(TOY_SWEEP), str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1
    assert run.stdout.splitlines() == [
        f"ok    {TOY_SWEEP}  (registry-examples/toy-cos{{cos}}-fmt{{fmt}}; family toy-cos-fmt, 5 points)",
        f"error {bad}:1:10: repo_id: placeholder {{fmtt}} in repo_id is not a swept alias (did you mean 'fmt'?); swept: cos, fmt",
        "1 of 2 recipes invalid",
    ]
    assert "Traceback" not in run.stderr
