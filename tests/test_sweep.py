"""Running a family: `registry publish SWEEP.yaml`, `registry sweep show|build|report`, run as users run them (subprocesses)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from registry import reports

ROOT = Path(__file__).parent.parent
TOY = ROOT / "tests" / "fixtures" / "toy"
TOY_SWEEP = ROOT / "recipes" / "examples" / "toy_sweep.yaml"
REPOS = ["registry-examples/toy-cos0-fmt1", "registry-examples/toy-cos0.5-fmt0.5", "registry-examples/toy-cos1-fmt0"]


def sweep_text(family: str = "toy-cos-fmt", repo: str = "toy") -> str:
    """The shipped toy sweep with three points (cos 0, 0.5, 1), its sources named by absolute path."""
    text = TOY_SWEEP.read_text()
    text = text.replace("../../tests/fixtures/toy", str(TOY)).replace("cos: [0, 0.25, 0.5, 0.75, 1]", "cos: [0, 0.5, 1]")
    text = text.replace("family: toy-cos-fmt", f"family: {family}").replace("registry-examples/toy-", f"registry-examples/{repo}-")
    assert "cos: [0, 0.5, 1]" in text and str(TOY) in text
    return text


def registry(home: Path, *args: str, importtime: bool = False) -> subprocess.CompletedProcess:
    python = [sys.executable, "-X", "importtime"] if importtime else [sys.executable]
    return subprocess.run([*python, "-m", "registry", *args], cwd=home.parent, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "REGISTRY_HOME": str(home), "COLUMNS": "200"})


def heavy_imports(run: subprocess.CompletedProcess) -> set[str]:
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "registry.cli" in imported  # the import log is complete, so the check on it means something
    return imported & {"torch", "transformers", "mergekit"}


def as_json(run: subprocess.CompletedProcess) -> dict:
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def states(run: subprocess.CompletedProcess) -> list[tuple[int, str, str, str]]:
    return [(p["index"], p["label"], p["repo_id"], p["state"]) for p in as_json(run)["points"]]


@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
    """One sweep run through its life: listed, one point built (an interrupted run), published, published again."""
    root = tmp_path_factory.mktemp("sweep")
    home = root / ".registry"
    recipe = root / "toy_sweep.yaml"
    recipe.write_text(sweep_text())
    runs = {"show_before": registry(home, "sweep", "show", str(recipe), "--format", "json")}
    runs["build_0"] = registry(home, "sweep", "build", str(recipe), "--point", "0", "--device", "cpu", "--format", "json")
    runs["show_built"] = registry(home, "sweep", "show", str(recipe), "--format", "json")
    runs["publish"] = registry(home, "publish", str(recipe), "--device", "cpu", "--format", "json")
    runs["again"] = registry(home, "publish", str(recipe), "--device", "cpu", importtime=True)
    runs["show_after"] = registry(home, "sweep", "show", str(recipe), "--format", "json", importtime=True)
    runs["report"] = registry(home, "sweep", "report", str(recipe), "--format", "json", importtime=True)
    runs["markdown"] = registry(home, "sweep", "report", str(recipe), "--format", "markdown")
    return root, home, recipe, runs


def test_sweep_show_lists_every_point_with_its_repo_and_state_as_it_goes(family_run):
    _, _, _, runs = family_run
    labels = [(0, "cos=0 fmt=1"), (1, "cos=0.5 fmt=0.5"), (2, "cos=1 fmt=0")]
    expect = lambda *s: [(i, label, repo, state) for (i, label), repo, state in zip(labels, REPOS, s, strict=True)]  # noqa: E731
    assert states(runs["show_before"]) == expect("not built", "not built", "not built")
    assert states(runs["show_built"]) == expect("smoke passed", "not built", "not built")
    assert states(runs["show_after"]) == expect("published", "published", "published")
    # Listing reads reports; it never loads a model.
    assert heavy_imports(runs["show_after"]) == set() and heavy_imports(runs["report"]) == set()


def test_an_interrupted_sweep_resumes_where_it_stopped(family_run):
    _, home, _, runs = family_run
    built = as_json(runs["build_0"])
    assert [(p["index"], p["merge"], p["smoke"]["passed"]) for p in built["points"]] == [(0, "merged", True)]
    assert built["points"][0]["results"] == []  # built, not published
    outcome = as_json(runs["publish"])
    # Point 0's build folder holds its merge and smoke report: reused; the others are merged here.
    assert [(p["merge"], p["smoke"]["reused"]) for p in outcome["points"]] == [("reused", True), ("merged", False), ("merged", False)]
    assert [p["model_dir"] for p in outcome["points"]][0] == built["points"][0]["model_dir"]
    assert [(p["state"], p["selected"], [(r["target"], r["changed"]) for r in p["results"]]) for p in outcome["points"]] == \
        [("published", True, [("local", True)])] * 3
    assert len({p["model_dir"] for p in outcome["points"]}) == 3
    assert all(Path(p["model_dir"]).parent == home / "build" for p in outcome["points"])


def test_a_second_publish_merges_nothing_pins_once_and_sends_nothing(family_run):
    _, _, _, runs = family_run
    again = runs["again"]
    assert again.returncode == 0, again.stderr
    # One plan for the family: the sources are pinned (and hashed) once, not once per point.
    assert len(re.findall(r"^pinned 2 sources: cos [0-9a-f]{12}, fmt [0-9a-f]{12}$", again.stderr, re.M)) == 1
    assert "merged into" not in again.stderr and "loading the model" not in again.stderr
    assert heavy_imports(again) == set()
    for k, label in enumerate(["cos=0 fmt=1", "cos=0.5 fmt=0.5", "cos=1 fmt=0"], start=1):
        assert re.search(rf"^point {k}/3 {re.escape(label)}: planning \(elapsed \d+:\d\d(, about \d+:\d\d left)?\)$", again.stderr, re.M)
        assert f"point {k}/3: reused the merge and its reports in" in again.stderr
    for repo in REPOS:
        assert f"{repo} is already published from recipe" in again.stdout


def test_the_endpoints_are_the_parents_bit_for_bit(family_run):
    from safetensors.torch import load_file

    _, _, _, runs = family_run
    points = as_json(runs["publish"])["points"]
    for point, parent in ((points[0], "ft_fmt"), (points[2], "ft_cos")):
        merged = load_file(Path(point["model_dir"]) / "model.safetensors")
        source = load_file(TOY / parent / "model.safetensors")
        assert merged.keys() == source.keys()
        assert all(merged[name].dtype == source[name].dtype and merged[name].equal(source[name]) for name in source)
        smoke = reports.read(reports.Smoke, Path(point["model_dir"]))
        assert [(c.name, c.status) for c in smoke.checks if c.name == "weights"] == [("weights", "passed")]


def test_every_published_point_carries_the_family_report_and_its_card_refers_to_the_chart(family_run):
    _, home, _, runs = family_run
    family = reports.Family.model_validate(as_json(runs["report"]))
    assert [(r.label, r.state, r.smoke_passed, r.selected) for r in family.points] == [
        ("cos=0 fmt=1", "published", True, True), ("cos=0.5 fmt=0.5", "published", True, True), ("cos=1 fmt=0", "published", True, True)]
    # The endpoints measure as their parents do.
    parents = {r.label: r for r in family.parents}
    assert family.points[0].nll == parents["fmt"].nll and family.points[2].nll == parents["cos"].nll
    table = [[c.strip() for c in row.strip().strip("|").split("|")] for row in runs["markdown"].stdout.splitlines()]
    assert table[0][:4] == ["point", "state", "NLL", "retrieved"]
    assert [row[:4] for row in table[2:]] == [
        ["cos=0 fmt=1", "published", "0.324", "6/6"],
        ["cos=0.5 fmt=0.5", "published", "0.312", "6/6"],
        ["cos=1 fmt=0", "published", "0.296", "6/6"],
        ["parent cos", "parent", "0.296", "6/6"],
        ["parent fmt", "parent", "0.324", "6/6"],
    ]
    local = reports.read(reports.Family, home / "build" / "families" / "toy-cos-fmt")
    assert [r.published for r in local.points] == [[f"local:{repo}"] for repo in REPOS]
    for repo in REPOS:
        (version,) = (home / "models" / repo).iterdir()
        bundled = reports.read(reports.Family, version)
        assert [(r.repo_id, r.selected) for r in bundled.points] == [(r, True) for r in REPOS]
        card = (version / "README.md").read_text()
        assert "\n## Family\n" in card and "**this model**" in card
        if (version / "family.svg").is_file():
            assert "](family.svg)" in card
    # The family's files are the bundle's own: a published point verifies.
    verified = registry(home, "verify", REPOS[1])
    assert verified.returncode == 0 and verified.stdout.rstrip().endswith(": verified"), verified.stdout


def test_select_best_nll_publishes_the_point_with_the_lowest_nll(family_run):
    root, home, _, _ = family_run
    recipe = root / "select.yaml"
    recipe.write_text(sweep_text(family="toy-select", repo="sel"))
    outcome = as_json(registry(home, "publish", str(recipe), "--select", "best:nll", "--device", "cpu", "--format", "json"))
    # Same merges as the family above (repo ids are not part of a merge): nothing merged again.
    assert [p["merge"] for p in outcome["points"]] == ["reused"] * 3
    family = reports.read(reports.Family, home / "build" / "families" / "toy-select")
    best = min(family.points, key=lambda r: r.nll)
    assert best.label == "cos=1 fmt=0" and best.nll < min(r.nll for r in family.points if r is not best)
    assert [(p["label"], p["selected"], p["state"]) for p in outcome["points"]] == [
        ("cos=0 fmt=1", False, "smoke passed"), ("cos=0.5 fmt=0.5", False, "smoke passed"), ("cos=1 fmt=0", True, "published")]
    listed = as_json(registry(home, "list", "--format", "json"))
    assert sorted(e["repo_id"] for e in listed if "/sel-" in e["repo_id"]) == ["registry-examples/sel-cos1-fmt0"]


BROKEN = """\
repo_id: registry-examples/toy-b-cos{{cos}}-fmt{{fmt}}
sources:
  cos: {{model: {toy}/ft_cos}}
  fmt: {{model: {toy}/ft_fmt}}
merge:
  merge_method: linear
  models:
    - model: cos
    - model: fmt
  parameters: {{normalize: false}}
  dtype: bfloat16
sweep:
  family: toy-broken
  points:
{points}
smoke:
  short: {{max_new_tokens: 32}}
  long: {{lengths: [256]}}
"""


def test_a_point_that_fails_its_smoke_test_is_reported_and_not_published(family_run):
    root, home, _, _ = family_run
    recipe = root / "broken.yaml"
    recipe.write_text(BROKEN.format(toy=TOY, points="    - {cos: 0.5, fmt: 0.5}\n    - {cos: 1, fmt: -1}"))
    run = registry(home, "publish", str(recipe), "--device", "cpu", "--format", "json")
    outcome = as_json(run)  # exit 0: the family is published, without its failed point
    good, bad = outcome["points"]
    assert (good["label"], good["state"], good["selected"], [r["target"] for r in good["results"]]) == \
        ("cos=0.5 fmt=0.5", "published", True, ["local"])
    assert (bad["label"], bad["state"], bad["selected"], bad["results"], bad["smoke"]["passed"]) == \
        ("cos=1 fmt=-1", "smoke failed", False, [], False)
    assert "parity" in bad["smoke"]["failed"]
    # It stays in its build folder with its reports; the family report lists it.
    assert reports.read(reports.Smoke, Path(bad["model_dir"])).passed is False
    family = reports.read(reports.Family, home / "build" / "families" / "toy-broken")
    assert [(r.label, r.smoke_passed, r.selected, r.published) for r in family.points] == [
        ("cos=0.5 fmt=0.5", True, True, ["local:registry-examples/toy-b-cos0.5-fmt0.5"]), ("cos=1 fmt=-1", False, False, [])]
    listed = {e["repo_id"] for e in as_json(registry(home, "list", "--format", "json"))}
    assert "registry-examples/toy-b-cos0.5-fmt0.5" in listed and "registry-examples/toy-b-cos1-fmt-1" not in listed
    assert states(registry(home, "sweep", "show", str(recipe), "--format", "json")) == [
        (0, "cos=0.5 fmt=0.5", "registry-examples/toy-b-cos0.5-fmt0.5", "published"),
        (1, "cos=1 fmt=-1", "registry-examples/toy-b-cos1-fmt-1", "smoke failed")]

    # A family none of whose points passed publishes nothing and exits 1 (the broken merge is reused, not redone).
    only = root / "only_broken.yaml"
    only.write_text(BROKEN.format(toy=TOY, points="    - {cos: 1, fmt: -1}").replace("toy-broken", "toy-all-broken"))
    failed = registry(home, "publish", str(only), "--device", "cpu")
    assert failed.returncode == 1, failed.stderr
    assert "no point of family toy-all-broken was selected (passed): nothing was published" in failed.stdout
    assert "point 1/1 cos=1 fmt=-1  registry-examples/toy-b-cos1-fmt-1: smoke failed" in failed.stdout
    assert "point 1/1: reused the merge and its reports in" in failed.stderr


def test_single_merge_commands_refuse_a_sweep_in_one_line_and_take_a_point(tmp_path):
    home = tmp_path / ".registry"
    recipe = tmp_path / "toy_sweep.yaml"
    recipe.write_text(sweep_text())
    for command in ("plan", "merge", "card"):
        run = registry(home, command, str(recipe))
        assert run.returncode == 2, run.stderr
        assert run.stderr.splitlines() == [
            f"error: {recipe} is a sweep (family toy-cos-fmt, 3 points): `registry {command}` works on one merge (use "
            f"`registry sweep build {recipe}` for every point, or `registry {command} --point K` for one; `registry sweep show` "
            "lists them)"]
    run = registry(home, "smoke", str(tmp_path), "--recipe", str(recipe))
    assert "`registry smoke` works on one merge" in run.stderr and run.returncode == 2
    plan = as_json(registry(home, "plan", str(recipe), "--point", "1", "--format", "json"))
    assert plan["repo_id"] == "registry-examples/toy-cos0.5-fmt0.5"
    assert {name: s["weight"] for name, s in plan["sources"].items()} == {"cos": 0.5, "fmt": 0.5}
    merged = as_json(registry(home, "merge", str(recipe), "--point", "1", "--device", "cpu", "--format", "json"))
    assert [p["state"] for p in as_json(registry(home, "sweep", "show", str(recipe), "--format", "json"))["points"]] == \
        ["not built", "merged", "not built"]
    assert Path(merged["out"]).parent == home / "build"
    card = registry(home, "card", str(recipe), "--point", "2")
    assert card.returncode == 0 and "registry-examples/toy-cos1-fmt0" in card.stdout
    bad = registry(home, "plan", str(recipe), "--point", "3")
    assert bad.stderr.splitlines() == [
        f"error: --point 3: {recipe} has points 0 to 2; `registry sweep show` lists them"]
    shutil.rmtree(home, ignore_errors=True)
