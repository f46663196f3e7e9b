"""CI: `registry ci changed|summary` against real git repositories, and the workflows checked three ways.

The git repositories are made with real commits: an upstream with `main`, a clone with a pull request
branch that adds, modifies, renames and deletes recipes and changes a template, while `main` moves on.
The workflows are linted by actionlint and audited by zizmor, and every `registry ...` line in them
is checked against the command tree of the CLI itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
import yaml

from registry import ci
from registry.card import render_card
from registry.cli import app
from registry.output import GuardedStream, console, esc, guard
from registry.recipe import load_recipe, parse_recipe
from registry.reports import Smoke
from registry.reports import read as read_report
from registry.reports import write as write_report

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Recipe Author",
    "GIT_AUTHOR_EMAIL": "author@example.com",
    "GIT_COMMITTER_NAME": "Recipe Author",
    "GIT_COMMITTER_EMAIL": "author@example.com",
    "GIT_AUTHOR_DATE": "2026-01-02T03:04:05Z",
    "GIT_COMMITTER_DATE": "2026-01-02T03:04:05Z",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}

ALPHA = """\
repo_id: team/alpha
summary: Alpha merge
license: mit
sources:
  a: {model: "${CHECKPOINTS}/a", label: Checkpoint A}
  b: {model: "${CHECKPOINTS}/b", label: Checkpoint B}
merge:
  merge_method: linear
  models:
    - {model: a, parameters: {weight: 0.3}}
    - {model: b, parameters: {weight: 0.7}}
  parameters: {normalize: true}
  dtype: bfloat16
"""
BETA = ALPHA.replace("team/alpha", "team/beta").replace("Alpha merge", "Beta merge")
# Different enough from the others that git does not pair its deletion with an added file as a rename.
GONE = "".join(f"# retired recipe, note {i}: kept in history only\n" for i in range(12)) + ALPHA.replace(
    "team/alpha", "team/gone").replace("Alpha merge", "Gone merge")
OLD_NAME = ALPHA.replace("team/alpha", "team/renamed").replace("Alpha merge", "A merge whose file moves")
TOY = """\
repo_id: registry-examples/toy
summary: Toy merge
license: mit
sources:
  cos: {model: ./toy/ft_cos, label: Toy A}
  fmt: {model: ./toy/ft_fmt, label: Toy B}
merge:
  merge_method: linear
  models:
    - {model: cos, parameters: {weight: 0.3}}
    - {model: fmt, parameters: {weight: 0.7}}
  dtype: bfloat16
publish:
  - target: local
"""
TEMPLATE = """\
{% extends "default:model_card.md.j2" %}
{% block title %}

# {{ name }} (team card v1)
{% endblock %}
"""


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, env={**os.environ, **GIT_ENV})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def write(repo: Path, files: dict[str, str | None]) -> None:
    for name, text in files.items():
        path = repo / name
        if text is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")


def commit(repo: Path, message: str, files: dict[str, str | None] | None = None) -> str:
    write(repo, files or {})
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def registry(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI as users and workflows run it: a separate process."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GITHUB_")}
    environ.update({"REGISTRY_LOAD_PLUGINS": "", "COLUMNS": "200", **GIT_ENV, **(env or {})})
    return subprocess.run([sys.executable, "-m", "registry", *args], cwd=cwd, capture_output=True, text=True, env=environ, timeout=120)


@pytest.fixture
def upstream(tmp_path: Path) -> Path:
    """The team's repository: recipes and a card template on main."""
    repo = tmp_path / "upstream"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    commit(repo, "recipes", {
        "README.md": "team recipes\n",
        "recipes/alpha.yaml": ALPHA,
        "recipes/beta.yaml": BETA,
        "recipes/gone.yaml": GONE,
        "recipes/old_name.yaml": OLD_NAME,
        "recipes/examples/toy.yaml": TOY,
        "templates/model_card.md.j2": TEMPLATE,
    })
    return repo


@pytest.fixture
def pr(upstream: Path, tmp_path: Path) -> Path:
    """A clone on branch `pr` (one commit of recipe changes) while upstream main gains a recipe the PR lacks."""
    work = tmp_path / "work"
    git(tmp_path, "clone", "-q", str(upstream), str(work))
    git(work, "checkout", "-q", "-b", "pr")
    commit(work, "change recipes", {
        "README.md": "team recipes, edited\n",
        "recipes/alpha.yaml": ALPHA.replace("weight: 0.3", "weight: 0.4").replace("weight: 0.7", "weight: 0.6")
        .replace("dtype: bfloat16", "dtype: float16"),
        "recipes/added.yaml": ALPHA.replace("team/alpha", "team/added").replace("Alpha merge", "Added merge"),
        "recipes/gone.yaml": None,
        "recipes/old_name.yaml": None,
        "recipes/team/new_name.yaml": OLD_NAME.replace("normalize: true", "normalize: false"),
    })
    # main moves on after the branch was made: its new recipe is no part of the pull request.
    commit(upstream, "another recipe on main", {"recipes/main_only.yaml": BETA.replace("team/beta", "team/main-only")})
    git(work, "fetch", "-q", "origin")
    return work


def entry(recipe: str, reason: str, *, example: bool = False, plan: bool = False, dry_run: bool = False,
          note: str = "local source 'a' is not in the checkout; local source 'b' is not in the checkout",
          renamed_from: str = "", repo_id: str = "", point: str = "", label: str = "", family: str = "") -> dict:
    return {
        "recipe": recipe,
        "slug": ci.slug(recipe),
        "lock": recipe.rsplit(".", 1)[0] + ".lock.json",
        "reason": reason,
        "renamed_from": renamed_from,
        "example": example,
        "valid": True,
        "plan": plan,
        "dry_run": dry_run,
        "note": note,
        "point": point,
        "label": label,
        "family": family,
        "repo_id": repo_id,
    }


def compact(data: object) -> str:
    return json.dumps(data, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# registry ci changed


def test_changed_reports_added_modified_renamed_and_deleted_recipes_against_the_merge_base(pr: Path, tmp_path: Path) -> None:
    output, summary = tmp_path / "github_output", tmp_path / "step_summary"
    output.write_text("earlier=kept\n")
    run = registry("ci", "changed", "--format", "json", cwd=pr, env={
        "GITHUB_BASE_REF": "main", "GITHUB_OUTPUT": str(output), "GITHUB_STEP_SUMMARY": str(summary),
    })
    assert run.returncode == 0, run.stderr
    base = git(pr, "merge-base", "origin/main", "HEAD")
    assert base != git(pr, "rev-parse", "origin/main")  # main moved on: the merge base is what counts
    include = [
        entry("recipes/added.yaml", "added", repo_id="team/added"),
        entry("recipes/alpha.yaml", "modified", repo_id="team/alpha"),
        entry("recipes/team/new_name.yaml", "renamed from recipes/old_name.yaml", renamed_from="recipes/old_name.yaml",
              repo_id="team/renamed"),
    ]
    assert json.loads(run.stdout) == {
        "base": "origin/main",
        "base_sha": base,
        "head_sha": git(pr, "rev-parse", "HEAD"),
        "count": 3,
        "include": include,
        "families": [],
        "deleted": ["recipes/gone.yaml"],
        "templates": [],
    }
    assert output.read_text() == (
        "earlier=kept\n"
        f"matrix={compact({'include': include})}\n"
        "count=3\n"
        'families={"include":[]}\n'
        "family_count=0\n"
        'deleted=["recipes/gone.yaml"]\n'
        f"base={base}\n"
    )
    note = "local source 'a' is not in the checkout; local source 'b' is not in the checkout"
    assert summary.read_text() == (
        f"### Recipes changed since `{base[:12]}`\n"
        "\n"
        "| Recipe | Why | Plan | Dry run | Notes |\n"
        "|---|---|---|---|---|\n"
        f"| `recipes/added.yaml` | added | no | no | {note} |\n"
        f"| `recipes/alpha.yaml` | modified | no | no | {note} |\n"
        f"| `recipes/team/new_name.yaml` | renamed from `recipes/old_name.yaml` | no | no | {note} |\n"
        "\n"
        "Deleted: `recipes/gone.yaml` (published models are left as they are).\n"
    )


def test_the_merge_commit_actions_checks_out_for_a_pull_request_gives_the_same_recipes(pr: Path) -> None:
    # actions/checkout checks out refs/pull/N/merge: the PR merged into the current base branch.
    git(pr, "checkout", "-q", "--detach", "origin/main")
    git(pr, "merge", "-q", "--no-ff", "-m", "Merge pr into main", "pr")
    data = json.loads(registry("ci", "changed", "--format", "json", cwd=pr, env={"GITHUB_BASE_REF": "main"}).stdout)
    assert data["base_sha"] == git(pr, "rev-parse", "origin/main")
    assert [(e["recipe"], e["reason"]) for e in data["include"]] == [
        ("recipes/added.yaml", "added"),
        ("recipes/alpha.yaml", "modified"),
        ("recipes/team/new_name.yaml", "renamed from recipes/old_name.yaml"),
    ]
    assert data["deleted"] == ["recipes/gone.yaml"]


def test_a_template_change_touches_every_recipe_and_text_output_lists_them(pr: Path) -> None:
    commit(pr, "team card v2", {"templates/model_card.md.j2": TEMPLATE.replace("v1", "v2")})
    run = registry("ci", "changed", "--base", "main", cwd=pr)
    assert run.returncode == 0, run.stderr
    base = git(pr, "merge-base", "main", "HEAD")
    assert run.stdout == (
        f"5 recipe(s) changed since {base[:12]} (merge base of main and HEAD)\n"
        "  recipes/added.yaml  added; templates changed  [validate only]\n"
        "  recipes/alpha.yaml  modified; templates changed  [validate only]\n"
        "  recipes/beta.yaml  templates changed  [validate only]\n"
        "  recipes/examples/toy.yaml  templates changed  [plan, dry run]\n"
        "  recipes/team/new_name.yaml  renamed from recipes/old_name.yaml; templates changed  [validate only]\n"
        "  recipes/gone.yaml  deleted\n"
    )
    data = json.loads(registry("ci", "changed", "--base", "main", "--no-examples", "--format", "json", cwd=pr).stdout)
    assert [e["recipe"] for e in data["include"]] == [
        "recipes/added.yaml", "recipes/alpha.yaml", "recipes/beta.yaml", "recipes/team/new_name.yaml",
    ]
    assert data["templates"] == ["templates/model_card.md.j2"]


def test_a_lock_file_touches_its_recipe_a_recipe_moved_away_is_deleted_and_a_push_compares_with_before(upstream: Path) -> None:
    before = git(upstream, "rev-parse", "HEAD")
    commit(upstream, "pin, archive", {"recipes/beta.lock.json": "{}\n", "recipes/notes.txt": "not a recipe\n",
                                       "recipes/gone.yaml": None, "archive/gone.yaml": GONE})
    data = json.loads(registry("ci", "changed", "--base", before, "--format", "json", cwd=upstream).stdout)
    assert [(e["recipe"], e["reason"]) for e in data["include"]] == [("recipes/beta.yaml", "lock file changed")]
    assert data["deleted"] == ["recipes/gone.yaml"]  # moved out of recipes/: a rename for git, a deletion here
    assert data["base_sha"] == before


def test_a_push_that_created_the_branch_counts_every_recipe_as_added(upstream: Path) -> None:
    data = json.loads(registry("ci", "changed", "--base", "0" * 40, "--format", "json", cwd=upstream).stdout)
    assert [(e["recipe"], e["reason"]) for e in data["include"]] == [
        ("recipes/alpha.yaml", "added"), ("recipes/beta.yaml", "added"), ("recipes/examples/toy.yaml", "added"),
        ("recipes/gone.yaml", "added"), ("recipes/old_name.yaml", "added"),
    ]
    assert data["include"][2]["note"] == "example recipe: sources shipped in the repo"


def test_an_invalid_recipe_is_listed_and_marked_invalid(pr: Path) -> None:
    commit(pr, "typo", {"recipes/alpha.yaml": ALPHA.replace("dtype:", "dtpye:")})
    data = json.loads(registry("ci", "changed", "--base", "main", "--format", "json", cwd=pr).stdout)
    alpha = next(e for e in data["include"] if e["recipe"] == "recipes/alpha.yaml")
    assert (alpha["valid"], alpha["plan"], alpha["dry_run"], alpha["note"]) == (False, False, False, "invalid recipe: see registry validate")


@pytest.mark.parametrize(
    ("args", "cwd", "message"),
    [
        (["--base", "nope"], "pr", "error: base 'nope' is not a commit in this clone (fetch the history "
         "(actions/checkout with fetch-depth: 0) or pass --base REF)\n"),
        (["--base", "--all"], "pr", "error: --base '--all' is not a git ref\n"),
        ([], "outside", "error: {outside} is not inside a git repository (run registry ci from a clone of the recipes repo)\n"),
    ],
)
def test_changed_errors_are_one_line(pr: Path, tmp_path: Path, args: list[str], cwd: str, message: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    run = registry("ci", "changed", *args, cwd=pr if cwd == "pr" else outside)
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr == message.format(outside=outside.resolve())


def test_hub_sources_are_sized_from_the_hub_to_decide_the_dry_run(hub_server, hub_api, upstream: Path) -> None:
    for name, size in (("alice/small-a", 1_000_000), ("alice/small-b", 3_000_000)):
        hub_api.create_repo(name)
        hub_api.upload_file(path_or_fileobj=b"\1" * size, path_in_repo="model.safetensors", repo_id=name)
        hub_api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=name)
    base = git(upstream, "rev-parse", "HEAD")
    recipe = ALPHA.replace('"${CHECKPOINTS}/a"', "alice/small-a").replace('"${CHECKPOINTS}/b"', "alice/small-b")
    commit(upstream, "hub recipe", {"recipes/hub.yaml": recipe, "recipes/missing.yaml": recipe.replace("small-b", "nowhere")})
    env = hub_server.client_env()

    def run(limit: str) -> dict:
        done = registry("ci", "changed", "--base", base, "--max-source-gb", limit, "--format", "json", cwd=upstream, env=env)
        assert done.returncode == 0, done.stderr
        return {e["recipe"]: (e["plan"], e["dry_run"], e["note"]) for e in json.loads(done.stdout)["include"]}

    fits = run("0.005")
    assert fits["recipes/hub.yaml"] == (True, True, "sources total 0.00 GB")
    plan, dry_run, note = fits["recipes/missing.yaml"]
    assert (plan, dry_run) == (True, False)
    assert note.startswith("size of 'b' unknown: ") and "alice/nowhere" in note
    assert run("0.003")["recipes/hub.yaml"] == (True, False, "sources total 0.00 GB, over the 0.00 GB a hosted runner takes")


def test_hub_size_uses_only_safetensors(hub_server, hub_api) -> None:
    hub_api.create_repo("alice/mixed")
    for path, size in (("model-00001-of-00002.safetensors", 700), ("model-00002-of-00002.safetensors", 300), ("pytorch_model.bin", 5000)):
        hub_api.upload_file(path_or_fileobj=b"\2" * size, path_in_repo=path, repo_id="alice/mixed")
    assert ci.hub_weight_bytes(ci.ModelRef("hub", "alice/mixed")) == 1000


def test_local_sources_in_the_checkout_are_sized_from_disk(upstream: Path) -> None:
    base = git(upstream, "rev-parse", "HEAD")
    recipe = ALPHA.replace('"${CHECKPOINTS}/a"', "./ckpt/a").replace('"${CHECKPOINTS}/b"', "./ckpt/b")
    commit(upstream, "local", {"recipes/local.yaml": recipe, "recipes/ckpt/a/config.json": "{}", "recipes/ckpt/b/config.json": "{}",
                               "recipes/ckpt/a/model.safetensors": "x" * 1500, "recipes/ckpt/b/model.safetensors": "y" * 2500})
    data = json.loads(registry("ci", "changed", "--base", base, "--format", "json", cwd=upstream).stdout)
    assert [(e["plan"], e["dry_run"], e["note"]) for e in data["include"]] == [(True, True, "sources total 0.00 GB")]
    changes = ci.compute_changes(base, root=upstream, max_source_bytes=3999)
    assert changes.recipes[0].notes == ["sources total 0.00 GB, over the 0.00 GB a hosted runner takes"]
    assert ci.compute_changes(base, root=upstream, max_source_bytes=4000).recipes[0].dry_run is True


def test_local_sources_are_sized_from_the_files_plan_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ${VAR}, ~ and relative paths expand as the plan expands them; a shard index limits the files to the
    # shards it lists; stray .safetensors files beside them (an old export) are not the model's weights.
    def checkpoint(folder: Path, sharded: bool) -> None:
        folder.mkdir(parents=True)
        if sharded:
            weight_map = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
            (folder / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
            (folder / "model-00002-of-00002.safetensors").write_bytes(b"y" * 2000)
        else:
            (folder / "model.safetensors").write_bytes(b"z" * 3000)
        (folder / "consolidated.safetensors").write_bytes(b"s" * 5000)

    monkeypatch.setenv("CKPT", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("UNSET_CKPT", raising=False)
    recipe_dir = tmp_path / "recipes"
    checkpoint(tmp_path / "env" / "a", sharded=True)
    checkpoint(tmp_path / "home" / "b", sharded=False)
    checkpoint(recipe_dir / "c", sharded=True)
    sizes = {text: ci._local_weight_bytes(text, recipe_dir) for text in ("${CKPT}/a", "~/b", "./c", "${UNSET_CKPT}/a", "./missing")}
    assert sizes == {"${CKPT}/a": 3000, "~/b": 3000, "./c": 3000, "${UNSET_CKPT}/a": None, "./missing": None}


# ---------------------------------------------------------------------------------------------
# registry ci summary


def card_of(repo: Path, path: str) -> str:
    old = Path.cwd()
    os.chdir(repo)
    try:
        return render_card(load_recipe(repo / path), None, None, [repo / "templates"])
    finally:
        os.chdir(old)


def details(card: str) -> str:
    fence = "`" * max(3, max(map(len, re.findall("`+", card)), default=0) + 1)
    return f"\n<details><summary>Card preview (README.md, {len(card):,} characters)</summary>\n\n{fence}markdown\n{card}{fence}\n\n</details>\n"


def test_summary_shows_validation_weight_diffs_dry_runs_and_card_previews(pr: Path, tmp_path: Path) -> None:
    commit(pr, "team card v2", {"templates/model_card.md.j2": TEMPLATE.replace("v1", "v2")})
    reports = tmp_path / "reports" / "report-recipes-examples-toy.yaml"
    reports.mkdir(parents=True)
    # The workflow's artifact for recipes/examples/toy.yaml: the folder's name says which recipe it belongs to.
    (reports / "smoke.json").write_text(json.dumps({
        "format": 3, "passed": False, "device": "cpu",
        "checks": [
            {"name": "short", "status": "passed", "reason": "coherent", "details": {}},
            {"name": "long", "status": "failed", "reason": "0 of 6 needles retrieved", "details": {}},
        ],
        "short": None, "long": [], "parity": [],
    }))
    output, step = tmp_path / "github_output", tmp_path / "step_summary"
    out_file = tmp_path / "summary.md"
    run = registry("ci", "summary", "--base", "main", "--reports", str(tmp_path / "reports"), "-o", str(out_file), cwd=pr,
                   env={"GITHUB_OUTPUT": str(output), "GITHUB_STEP_SUMMARY": str(step)})
    assert run.returncode == 0, run.stderr
    base = git(pr, "merge-base", "main", "HEAD")
    cards = {p: card_of(pr, p) for p in ("recipes/added.yaml", "recipes/alpha.yaml", "recipes/beta.yaml",
                                          "recipes/examples/toy.yaml", "recipes/team/new_name.yaml")}
    assert all("(team card v2)" in card for card in cards.values())  # the template at HEAD, not main's
    not_run = ("**Dry run:** not run: local source 'a' is not in the checkout; local source 'b' is not in the checkout\n")

    def valid(path: str, repo_id: str, why: str) -> str:
        sha = load_recipe(pr / path).sha256[:12]
        return f"\n### `{path}`\n\n**Valid** · `{repo_id}` · recipe sha256 `{sha}` · {why}\n"

    expected = (
        "## Recipe check\n"
        "\n"
        "5 recipes checked, all valid.\n"
        f"Compared with `main` at `{base[:12]}`.\n"
        "\n"
        "**Deleted:** `recipes/gone.yaml` (published models are left as they are).\n"
        + valid("recipes/added.yaml", "team/added", "added; templates changed")
        + "\nNew recipe.\n\n" + not_run + details(cards["recipes/added.yaml"])
        + valid("recipes/alpha.yaml", "team/alpha", "modified; templates changed")
        + "\nMerge settings against `main`:\n\n| Setting | Before | After |\n|---|---|---|\n"
        "| weight of a | `0.3` | `0.4` |\n| weight of b | `0.7` | `0.6` |\n| dtype | `bfloat16` | `float16` |\n"
        "\n" + not_run + details(cards["recipes/alpha.yaml"])
        + valid("recipes/beta.yaml", "team/beta", "templates changed")
        + "\nWeights, dtype and normalize are unchanged against `main`.\n\n" + not_run + details(cards["recipes/beta.yaml"])
        + valid("recipes/examples/toy.yaml", "registry-examples/toy", "templates changed")
        + "\nWeights, dtype and normalize are unchanged against `main`.\n\n"
        "**Dry run:** smoke tests FAILED: short passed, long failed (0 of 6 needles retrieved)\n"
        + details(render_with_smoke(pr, "recipes/examples/toy.yaml", reports))
        + valid("recipes/team/new_name.yaml", "team/renamed", "renamed from `recipes/old_name.yaml`; templates changed")
        + "\nMerge settings against `main`:\n\n| Setting | Before | After |\n|---|---|---|\n| normalize | `true` | `false` |\n"
        "\n" + not_run + details(cards["recipes/team/new_name.yaml"])
    )
    assert run.stdout == expected
    assert out_file.read_text() == expected
    assert step.read_text() == expected
    delimiter = "ghadelimiter_" + hashlib.sha256(expected.encode()).hexdigest()[:24]
    assert output.read_text() == f"summary<<{delimiter}\n{expected}\n{delimiter}\ninvalid=0\n"
    assert parse_github_output(output.read_text()) == {"summary": expected, "invalid": "0"}


def test_recipe_diff_names_added_and_removed_models_and_filtered_weights() -> None:
    before = parse_recipe(ALPHA)
    after = parse_recipe(
        ALPHA.replace("- {model: b, parameters: {weight: 0.7}}",
                      "- {model: ./c, parameters: {weight: [{filter: mlp, value: 0.5}, {value: 0.7}]}}")
        .replace("dtype: bfloat16", "dtype: bfloat16\n  out_dtype: float32")
    )
    assert ci.recipe_diff(before, after) == [
        ("weight of ./c", "—", '[{filter: "mlp", value: 0.5}, {value: 0.7}]'),
        ("weight of b", "0.7", "—"),
        ("out_dtype", "not set", "float32"),
    ]
    assert ci.recipe_diff(before, parse_recipe(ALPHA.replace("label: Checkpoint A", "label: Renamed"))) == []


def render_with_smoke(repo: Path, path: str, reports: Path) -> str:
    old = Path.cwd()
    os.chdir(repo)
    try:
        smoke = read_report(Smoke, reports)
        return render_card(load_recipe(repo / path), None, smoke, [repo / "templates"])
    finally:
        os.chdir(old)


def parse_github_output(text: str) -> dict[str, str]:
    """Read a GITHUB_OUTPUT file the way the Actions runner does."""
    values: dict[str, str] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            end = lines.index(delimiter, i + 1)
            values[name] = "\n".join(lines[i + 1:end])
            i = end + 1
        elif line:
            name, value = line.split("=", 1)
            values[name] = value
            i += 1
        else:
            i += 1
    return values


def test_summary_of_named_recipes_reports_invalid_ones_with_their_problems(pr: Path) -> None:
    commit(pr, "typo", {"recipes/alpha.yaml": ALPHA.replace("dtype:", "dtpye:")})
    run = registry("ci", "summary", "recipes/alpha.yaml", "--base", "main", "--format", "json", cwd=pr)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["valid"] is False
    assert data["recipes"][0]["problems"] == ["recipes/alpha.yaml:13:3: merge.dtpye: unknown key 'dtpye' (did you mean 'dtype'?)"]
    base = git(pr, "merge-base", "main", "HEAD")
    assert data["markdown"] == (
        "## Recipe check\n\n1 recipe checked, 1 invalid.\n"
        f"Compared with `main` at `{base[:12]}`.\n\n"
        "**Deleted:** `recipes/gone.yaml` (published models are left as they are).\n"
        "\n### `recipes/alpha.yaml`\n\n**Invalid** · modified\n\n"
        "```text\nrecipes/alpha.yaml:13:3: merge.dtpye: unknown key 'dtpye' (did you mean 'dtype'?)\n```\n"
    )


def test_summary_cuts_a_huge_card_preview_safely_under_the_comment_limit(pr: Path) -> None:
    # A team template that renders a card of ~240 KB: multi-byte text inside its own code fences.
    filler = "{% for i in range(2500) %}line {{ i }}: é€😀 and e\u0301 ``` not a fence\n{% endfor %}"
    big = TEMPLATE + "{% block merge_details %}\n\n```text\n" + filler + "```\n\n~~~\n" + filler + "~~~\n{% endblock %}\n"
    commit(pr, "huge card", {"templates/model_card.md.j2": big})
    run = registry("ci", "summary", "--base", "main", cwd=pr)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert len(text.encode()) <= ci.SUMMARY_LIMIT
    assert ci.SUMMARY_LIMIT + len(ci.COMMENT_MARKER) + 200 < ci.COMMENT_LIMIT
    assert text.count("<details>") == text.count("</details>") == 5
    previews = re.findall(r"\n(`{4,})markdown\n(.*?)\n\1\n\n</details>\n", text, flags=re.S)
    assert len(previews) == 5
    for fence, body in previews:
        assert fence == "````"  # longer than the ``` runs inside the card, so nothing inside can close it
        assert re.search(r"… card preview cut at [\d,]+ of [\d,]+ characters to fit GitHub's comment limit$", body)
        inner = body.rsplit("\n", 1)[0]
        assert fences_balanced(inner), inner[-300:]
        assert "\ufffd" not in body
    # Each card got an equal share of the room and used nearly all of it.
    assert min(len(b.encode()) for _, b in previews) > (ci.SUMMARY_LIMIT // 5) - 3000


def fences_balanced(text: str) -> bool:
    fence = None
    for line in text.split("\n"):
        fence = ci._fence_after(line, fence)
    return fence is None


# ---------------------------------------------------------------------------------------------
# Markdown truncation


NOTE = "*cut*"


def test_truncate_keeps_text_that_fits() -> None:
    text = "a\n```\nb\n```\n"
    assert ci.truncate_markdown(text, len(text), NOTE) == text


def test_truncate_closes_an_open_backtick_fence() -> None:
    text = "intro\n```python\nprint('é')\nprint('ü')\n```\nafter\n"
    # 38 bytes hold the first print line, the closing fence and the note; 2 more show part of the next line.
    assert ci.truncate_markdown(text, 38, NOTE) == "intro\n```python\nprint('é')\n```\n*cut*\n"
    assert ci.truncate_markdown(text, 40, NOTE) == "intro\n```python\nprint('é')\np\n```\n*cut*\n"


def test_truncate_honours_longer_and_tilde_fences() -> None:
    text = "````md\n```\ninner\n```\nmore\n````\n~~~~\nx\n~~~\ny\nlonger line\n~~~~\nend\n"
    # ``` does not close a ```` fence, nor ~~~ a ~~~~ one: the closer added is the opening fence's own.
    assert ci.truncate_markdown(text, 32, NOTE) == "````md\n```\ninner\n```\n````\n*cut*\n"
    assert ci.truncate_markdown(text, 55, NOTE) == "````md\n```\ninner\n```\nmore\n````\n~~~~\nx\n~~~\ny\n~~~~\n*cut*\n"


def test_truncate_never_splits_a_character_or_leaves_a_fence_open() -> None:
    line = "😀" * 50 + "e\u0301" * 10
    text = "```\n" + line + "\n```\n"
    shown = set()
    for limit in range(len("```\n```\n*cut*\n"), len(text.encode())):
        out = ci.truncate_markdown(text, limit, NOTE)
        assert len(out.encode()) <= limit
        assert fences_balanced(out)
        part = out.split("\n")[1] if out.count("\n") == 4 else ""
        assert line.startswith(part)
        assert not part.endswith("e")  # never a base letter without its combining accent
        shown.add(part)
    # Every cut between whole characters is used, up to the longest part that leaves room for the fence and note.
    longest = len(text.encode()) - 1 - len("```\n\n```\n*cut*\n")
    cuts = ["😀" * i for i in range(51)] + ["😀" * 50 + "e\u0301" * k for k in range(1, 11)]
    assert shown == {c for c in cuts if len(c.encode()) <= longest}
    assert len(shown) == 1 + 50 + 7


def test_truncate_closes_details() -> None:
    text = "<details><summary>s</summary>\n\nline one\nline two\n</details>\n"
    assert ci.truncate_markdown(text, 59, NOTE) == "<details><summary>s</summary>\n\nline one\n\n</details>\n*cut*\n"


@pytest.mark.parametrize(("text", "limit", "expected"), [
    ("aé€😀", 1, "a"), ("aé€😀", 2, "a"), ("aé€😀", 3, "aé"), ("aé€😀", 6, "aé€"), ("aé€😀", 9, "aé€"), ("aé€😀", 10, "aé€😀"),
    ("xe\u0301", 2, "x"), ("xe\u0301", 4, "xe\u0301"), ("a👍\ufe0f", 5, "a"),
])
def test_cut_utf8(text: str, limit: int, expected: str) -> None:
    assert ci.cut_utf8(text, limit) == expected


def test_step_output_names_are_checked_and_multiline_values_use_a_heredoc(tmp_path: Path) -> None:
    target = tmp_path / "out"
    assert ci.write_outputs({"a": "1"}, environ={}) is False
    assert ci.write_outputs({"one": "x=y", "two": "l1\nl2"}, environ={"GITHUB_OUTPUT": str(target)}) is True
    delimiter = "ghadelimiter_" + hashlib.sha256(b"l1\nl2").hexdigest()[:24]
    assert target.read_text() == f"one=x=y\ntwo<<{delimiter}\nl1\nl2\n{delimiter}\n"
    with pytest.raises(ValueError):
        ci.write_outputs({"bad name": "x"}, environ={"GITHUB_OUTPUT": str(target)})


def test_summary_limit_option_default_matches_the_library() -> None:
    summary = typer.main.get_command(app).commands["ci"].commands["summary"]
    assert next(p.default for p in summary.params if p.name == "limit") == ci.SUMMARY_LIMIT


# ---------------------------------------------------------------------------------------------
# The workflows


def workflows() -> dict[str, dict]:
    return {p.name: yaml.load(p.read_text(), Loader=yaml.BaseLoader) for p in sorted(WORKFLOWS.glob("*.yml"))}


def steps(workflow: dict):
    for job_id, job in workflow["jobs"].items():
        for step in job.get("steps", []):
            yield job_id, step


def registry_commands() -> list[tuple[str, list[str]]]:
    """Every `registry ...` command in the workflows' run: scripts, as argument lists (redirections dropped)."""
    found = []
    for name, workflow in workflows().items():
        for _, step in steps(workflow):
            for line in step.get("run", "").replace("\\\n", " ").split("\n"):
                lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
                lexer.whitespace_split = True
                command: list[str] = []
                for word in [*lexer, ";"]:
                    if word in (";", "&&", "||", "|", "&", "(", ")", ";;"):
                        if command and command[0] == "registry":
                            found.append((name, strip_redirects(command[1:])))
                        command = []
                    else:
                        command.append(word)
    return found


def strip_redirects(args: list[str]) -> list[str]:
    out, skip = [], False
    for word in args:
        if skip:
            skip = False
        elif word in (">", ">>", "<"):
            skip = True
        else:
            out.append(word)
    return out


def check_command(args: list[str]) -> tuple[str, list[str]]:
    """Walk the CLI's click tree along `args`; return the command path and a list of problems."""
    # typer builds the tree from its own copy of click, so groups and parameters are told apart by duck typing.
    cmd = typer.main.get_command(app)
    path: list[str] = []
    rest = list(args)
    while hasattr(cmd, "commands"):
        if not rest or rest[0].startswith("-"):
            return " ".join(path), [f"'registry {' '.join(path)}' needs a subcommand"]
        name = rest.pop(0)
        sub = cmd.commands.get(name)
        if sub is None:
            return " ".join([*path, name]), [f"'registry {' '.join([*path, name])}' is not a command"]
        path.append(name)
        cmd = sub
    problems = []
    options = {opt: p for p in cmd.params if p.param_type_name == "option" for opt in (*p.opts, *p.secondary_opts)}
    arguments = [p for p in cmd.params if p.param_type_name == "argument"]
    positional = 0
    i = 0
    while i < len(rest):
        word = rest[i]
        if word.startswith("-"):
            flag = word.split("=", 1)[0]
            param = options.get(flag)
            if param is None:
                problems.append(f"'registry {' '.join(path)}' has no option {flag}")
            elif not param.is_flag and not param.count and "=" not in word:
                i += 1
        else:
            positional += 1
        i += 1
    capacity = sum(10**6 if a.nargs == -1 else a.nargs for a in arguments)
    if positional > capacity:
        problems.append(f"'registry {' '.join(path)}' takes {capacity} argument(s), the workflow gives {positional}")
    return " ".join(path), problems


def test_the_command_extraction_sees_every_registry_line() -> None:
    seen = {(name, check_command(args)[0]) for name, args in registry_commands()}
    assert seen == {
        ("publish.yml", "ci changed"),
        ("publish.yml", "publish"),
        ("publish.yml", "sweep build"),
        ("publish.yml", "ci point"),
        ("publish.yml", "sweep report"),
        ("recipe-pr.yml", "validate"),
        ("recipe-pr.yml", "ci changed"),
        ("recipe-pr.yml", "plan"),
        ("recipe-pr.yml", "card"),
        ("recipe-pr.yml", "merge"),
        ("recipe-pr.yml", "smoke"),
        ("recipe-pr.yml", "sweep build"),
        ("recipe-pr.yml", "ci point"),
        ("recipe-pr.yml", "ci summary"),
    }


def test_the_command_check_catches_unknown_commands_and_flags() -> None:
    assert check_command(["ci", "changed", "--base", "x", "--bogus"]) == ("ci changed", ["'registry ci changed' has no option --bogus"])
    assert check_command(["nonsense"]) == ("nonsense", ["'registry nonsense' is not a command"])
    assert check_command(["validate", "a", "b"]) == ("validate", [])
    assert check_command(["card", "a", "b"]) == ("card", ["'registry card' takes 1 argument(s), the workflow gives 2"])


@pytest.mark.parametrize(("workflow", "args"), registry_commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_workflows_call_only_commands_and_flags_the_cli_has(workflow: str, args: list[str]) -> None:
    _path, problems = check_command(args)
    assert problems == [], f"{workflow}: registry {' '.join(args)}"


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail(f"{name} is not installed; pip install -e '.[test]'")
    return found


def test_actionlint_finds_nothing() -> None:
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    assert len(files) == 3
    run = subprocess.run([tool("actionlint"), "-no-color", *files], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")


def test_zizmor_finds_nothing_beyond_inline_suppressions_with_reasons() -> None:
    run = subprocess.run(
        [tool("zizmor"), "--offline", "--strict-collection", "--format", "json", str(WORKFLOWS)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert (run.returncode, json.loads(run.stdout or "null")) == (0, []), run.stderr
    for name in ("publish.yml", "recipe-pr-comment.yml", "recipe-pr.yml"):
        assert f"completed {WORKFLOWS / name}" in run.stderr
    ignores = [m for p in WORKFLOWS.glob("*.yml") for m in re.findall(r"# zizmor: ignore\[[a-z-]+\](.*)", p.read_text())]
    assert len(ignores) == 3
    assert all(len(reason.strip()) > 20 for reason in ignores)


PINS = {
    "actions/checkout": ("3d3c42e5aac5ba805825da76410c181273ba90b1", "v7.0.1"),
    "actions/setup-python": ("5fda3b95a4ea91299a34e894583c3862153e4b97", "v7.0.0"),
    "actions/upload-artifact": ("bbbca2ddaa5d8feaa63e36b76fdaad77386f024f", "v7.0.0"),
    "actions/download-artifact": ("3e5f45b2cfb9172054b4087a40e8e0b5a5461e7c", "v8.0.1"),
    "actions/cache": ("27d5ce7f107fe9357f9df03efb73ab90386fccae", "v5.0.5"),
    "actions/github-script": ("ed597411d8f924073f98dfc5c65a23a2325f34cd", "v8.0.0"),
}


def test_actions_are_pinned_to_release_commits_named_beside_them() -> None:
    uses = [line.strip() for p in WORKFLOWS.glob("*.yml") for line in p.read_text().splitlines() if "uses:" in line]
    assert len(uses) == 18
    for line in uses:
        m = re.fullmatch(r"(?:- )?uses: ([\w-]+/[\w-]+)@([0-9a-f]{40}) # (v[\d.]+)", line)
        assert m, line
        assert (m[2], m[3]) == PINS[m[1]], line


def test_workflow_policies() -> None:
    found = workflows()
    assert set(found) == {"publish.yml", "recipe-pr-comment.yml", "recipe-pr.yml"}
    for name, workflow in found.items():
        assert "pull_request_target" not in workflow["on"], name
        for job_id, step in steps(workflow):
            assert "${{" not in step.get("run", ""), f"{name}:{job_id}: pass ${{{{ }}}} through env:"
            assert "${{" not in step.get("with", {}).get("script", ""), f"{name}:{job_id}"
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] == "false", f"{name}:{job_id}"
    pr, comment, publish = found["recipe-pr.yml"], found["recipe-pr-comment.yml"], found["publish.yml"]
    assert pr["permissions"] == {"contents": "read"} and pr["concurrency"]["cancel-in-progress"] == "true"
    assert "secrets." not in (WORKFLOWS / "recipe-pr.yml").read_text()
    assert pr["jobs"]["gate"]["if"] == "always()"
    assert set(pr["jobs"]["gate"]["needs"]) == set(pr["jobs"]) - {"gate"}
    assert comment["permissions"] == {} and comment["jobs"]["comment"]["permissions"] == {"actions": "read", "pull-requests": "write"}
    assert not any("actions/checkout@" in step.get("uses", "") for _, step in steps(comment))
    assert publish["concurrency"]["cancel-in-progress"] == "false"
    job = publish["jobs"]["publish"]
    assert job["environment"] == "hub-publish"
    with_token = [(j, s.get("name")) for j, s in steps(publish) if "secrets." in json.dumps(s)]
    assert with_token == [("publish", "Publish"), ("family", "Publish the family")]
    for _, step in steps(publish):
        if step.get("name") in ("Publish", "Publish the family"):
            assert "HF_TOKEN" in step["env"]
    # A plain recipe publishes in its matrix job; a sweep point only builds there, with no token.
    assert next(s for _, s in steps(publish) if s.get("name") == "Publish")["if"] == "matrix.point == ''"
    assert job["strategy"]["max-parallel"] == "${{ fromJSON(vars.REGISTRY_MAX_PARALLEL || '1') }}"
    family = publish["jobs"]["family"]
    assert family["environment"] == "hub-publish" and family["needs"] == ["changed", "publish"]
    assert family["strategy"]["matrix"] == "${{ fromJSON(needs.changed.outputs.families) }}"
    for held in (job, family):
        assert "secrets" not in json.dumps({k: v for k, v in held.items() if k != "steps"})


# ---------------------------------------------------------------------------------------------
# File names as git stores them: read as bytes, shown escaped, never a workflow command

HOSTILE_NAMES = [
    "recipes/a\n::error ::x.yaml",
    "recipes/cr\rname.yaml",
    "recipes/esc\x1b[31m.yaml",
    'recipes/quote"d \'name\'.yaml',
    "recipes/tab\tname.yaml",
    "recipes/[draft] merge.yaml",
]


def no_workflow_command(*streams: str) -> bool:
    return not any(line.lstrip().startswith(("::", "##[")) for s in streams for line in re.split(r"\r\n|\r|\n", s))


def test_file_names_are_read_from_git_as_bytes_and_shown_escaped(upstream: Path, tmp_path: Path) -> None:
    before = git(upstream, "rev-parse", "HEAD")
    files: dict[str, str | None] = {
        name: ALPHA.replace("team/alpha", f"team/hostile-{i}") for i, name in enumerate(HOSTILE_NAMES)
    }
    # A rename to a hostile name, and a file name that is not UTF-8 outside recipes/ (never shown, so it does no harm).
    files.update({"recipes/old_name.yaml": None, "recipes/new\r::warning ::w.yaml": OLD_NAME, "docs/\udcff.txt": "x\n"})
    commit(upstream, "hostile names", files)
    summary = tmp_path / "step_summary"
    data = json.loads(registry("ci", "changed", "--base", before, "--format", "json", cwd=upstream).stdout)
    assert [(e["recipe"], e["reason"]) for e in data["include"]] == sorted(
        [(name, "added") for name in HOSTILE_NAMES]
        + [("recipes/new\r::warning ::w.yaml", "renamed from recipes/old_name.yaml")]
    )

    run = registry("ci", "changed", "--base", before, cwd=upstream, env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[1:] == [
        "  recipes/[draft] merge.yaml  added  [validate only]",
        "  recipes/a\\n::error ::x.yaml  added  [validate only]",
        "  recipes/cr\\rname.yaml  added  [validate only]",
        "  recipes/esc\\x1b[31m.yaml  added  [validate only]",
        "  recipes/new\\r::warning ::w.yaml  renamed from recipes/old_name.yaml  [validate only]",
        '  recipes/quote"d \'name\'.yaml  added  [validate only]',
        "  recipes/tab\\tname.yaml  added  [validate only]",
    ]
    assert no_workflow_command(run.stdout, run.stderr)
    # Markdown: names as code spans (whitespace folded to one line), never a line of their own.
    assert "| `recipes/a ::error ::x.yaml` | added |" in summary.read_text()
    assert "| `recipes/new ::warning ::w.yaml` | renamed from `recipes/old_name.yaml` |" in summary.read_text()

    run = registry("ci", "summary", "--base", before, cwd=upstream)
    assert run.returncode == 0, run.stderr
    assert no_workflow_command(run.stdout, run.stderr)
    assert "\n### `recipes/new ::warning ::w.yaml`\n" in run.stdout


def test_a_renamed_recipe_names_its_old_path_as_code(upstream: Path) -> None:
    # The old path holds Markdown that would make a link, bold text and a code span if it were inserted as it is.
    old = "recipes/[x](http:evil) **b** `c`.yaml"
    commit(upstream, "hostile name", {"recipes/old_name.yaml": None, old: OLD_NAME})
    before = git(upstream, "rev-parse", "HEAD")
    commit(upstream, "rename", {old: None, "recipes/renamed.yaml": OLD_NAME})
    run = registry("ci", "summary", "--base", before, cwd=upstream)
    assert run.returncode == 0, run.stderr
    sha = load_recipe(upstream / "recipes/renamed.yaml").sha256[:12]
    assert (f"\n**Valid** · `team/renamed` · recipe sha256 `{sha}` · renamed from ``recipes/[x](http:evil) **b** `c`.yaml``\n"
            in run.stdout)


def test_a_recipe_file_name_that_is_not_utf8_is_refused(upstream: Path) -> None:
    before = git(upstream, "rev-parse", "HEAD")
    commit(upstream, "bad name", {"recipes/caf\udce9.yaml": ALPHA.replace("team/alpha", "team/cafe")})
    for fmt in ("text", "json"):
        run = registry("ci", "changed", "--base", before, "--format", fmt, cwd=upstream)
        assert (run.returncode, run.stdout) == (1, "")
        assert run.stderr == (
            "error: the file name 'recipes/caf\\xe9.yaml' is not UTF-8 (rename it: recipe and template file names "
            "appear in job names, summaries and JSON)\n"
        )


@pytest.mark.parametrize(("text", "expected"), [
    ("::error::x\n", "\\::error::x\n"),
    ("ok\n::set-output name=a::b\n", "ok\n\\::set-output name=a::b\n"),
    ("ok\r::add-mask::s\r\n", "ok\r\\::add-mask::s\r\n"),  # a runner splits lines at \r too
    ("  \t::warning::w", "  \t\\::warning::w"),  # and trims leading whitespace, Unicode spaces included
    ("\u00a0\u2003::notice::n", "\u00a0\u2003\\::notice::n"),
    ("##[error]old syntax\n", "\\##[error]old syntax\n"),
    ("ok ::error::x\nan ##[error]\n", "ok ::error::x\nan ##[error]\n"),  # not at a line start: left alone
    ("a line\n:", "a line\n\\:"),  # a cut-short start that the next write could complete
    ("## Heading\n", "## Heading\n"),
])
def test_guard_makes_every_workflow_command_inert(text: str, expected: str) -> None:
    assert guard(text) == expected


def test_guarded_stream_remembers_line_starts_across_writes() -> None:
    buffer = io.StringIO()
    stream = GuardedStream(buffer)
    for piece in ("  ", "::error::a\n", "ok", "::b\n", "\t", "##[group]c\n"):
        stream.write(piece)
    assert buffer.getvalue() == "  \\::error::a\nok::b\n\t\\##[group]c\n"


@pytest.mark.parametrize(("value", "expected"), [
    ("[/red]", "[/red]"),
    ("[draft] merge.yaml", "[draft] merge.yaml"),
    ("\\[bold]x\\", "\\[bold]x\\"),
    ("C:\\dir\\", "C:\\dir\\"),
    ("recipes/\\[.yaml", "recipes/\\[.yaml"),  # rich drops a backslash before a '[' that starts no tag
    ("a\\\\[b c\\\\[/d]", "a\\\\[b c\\\\[/d]"),
    ("[a", "[a"),  # an unclosed tag stays text
    (":smile: [link=http://x]y", ":smile: [link=http://x]y"),
    ("a\x1b[31m\x07\x00\x7f\x9b", "a\\x1b[31m\\x07\\x00\\x7f\\x9b"),
    ("one\ntwo\rthree\tfour", "one\\ntwo\\rthree\\tfour"),
    ("\u202eevil\u2028", "\\u202eevil\\u2028"),
    ("caf\udce9", "caf\\xe9"),
])
def test_user_text_in_markup_prints_literally(value: str, expected: str) -> None:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        console().print(f"[green]ok[/green] {esc(value)}[red]|[/red]{esc(value)} end")
    assert buffer.getvalue() == f"ok {expected}|{expected} end\n"


def test_dry_run_reports_are_found_by_their_recipe_folder_and_a_bad_one_is_one_line(tmp_path: Path) -> None:
    good, bad = tmp_path / ci.report_folder("recipes/a.yaml"), tmp_path / ci.report_folder("recipes/b.yaml")
    good.mkdir()
    bad.mkdir()
    write_report(Smoke(passed=True, device="cpu", checks=[]), good)
    (bad / "provenance.json").write_text('{"format": 1}')
    found = ci.find_reports(tmp_path)
    assert sorted(found) == ["report-recipes-a.yaml", "report-recipes-b.yaml"]
    assert (found["report-recipes-a.yaml"].smoke.passed, found["report-recipes-a.yaml"].provenance) == (True, None)
    assert found["report-recipes-b.yaml"].problem == (
        f"{bad / 'provenance.json'}: unknown provenance.json format 1 (this registry reads format 2) "
        "(run `registry merge` again to rewrite it)"
    )


# ---------------------------------------------------------------------------------------------
# Sweeps: one matrix entry per point, a family job, the family table in the summary

TOY_SWEEP = (ROOT / "recipes" / "examples" / "toy_sweep.yaml").read_text()
# A team sweep whose sources live on the GPU machine: planned and built there, never on a hosted runner.
FAMILY = ALPHA.replace("team/alpha", "team/alpha-a{a}-b{b}").replace("{model: a, parameters: {weight: 0.3}}", "{model: a}").replace(
    "{model: b, parameters: {weight: 0.7}}", "{model: b}") + "sweep:\n  family: alpha-mix\n  grid:\n    a: [0.25, 0.75]\n    b: 1 - a\n"
TOY_POINTS = [("0", "cos=0 fmt=1", "registry-examples/toy-cos0-fmt1"), ("1", "cos=0.25 fmt=0.75", "registry-examples/toy-cos0.25-fmt0.75"),
              ("2", "cos=0.5 fmt=0.5", "registry-examples/toy-cos0.5-fmt0.5"), ("3", "cos=0.75 fmt=0.25", "registry-examples/toy-cos0.75-fmt0.25"),
              ("4", "cos=1 fmt=0", "registry-examples/toy-cos1-fmt0")]
TOY_NOTE = "example recipe: sources shipped in the repo"


def point_entries(recipe: str, reason: str, points, family: str, **kwargs) -> list[dict]:
    return [{**entry(recipe, reason, point=index, label=label, repo_id=repo_id, family=family, **kwargs),
             "slug": f"{ci.slug(recipe)}-p{index}"} for index, label, repo_id in points]


def test_a_changed_sweep_is_one_matrix_entry_per_point_and_a_plain_recipe_stays_one(pr: Path, tmp_path: Path) -> None:
    commit(pr, "a toy family", {"recipes/examples/toy_sweep.yaml": TOY_SWEEP})
    output, summary = tmp_path / "github_output", tmp_path / "step_summary"
    run = registry("ci", "changed", "--base", "main", "--format", "json", cwd=pr,
                   env={"GITHUB_OUTPUT": str(output), "GITHUB_STEP_SUMMARY": str(summary)})
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    sweep = "recipes/examples/toy_sweep.yaml"
    include = [
        entry("recipes/added.yaml", "added", repo_id="team/added"),
        entry("recipes/alpha.yaml", "modified", repo_id="team/alpha"),
        *point_entries(sweep, "added", TOY_POINTS, "toy-cos-fmt", example=True, plan=True, dry_run=True, note=TOY_NOTE),
        entry("recipes/team/new_name.yaml", "renamed from recipes/old_name.yaml", renamed_from="recipes/old_name.yaml",
              repo_id="team/renamed"),
    ]
    assert include[2]["slug"] == "recipes-examples-toy_sweep.yaml-p0"
    assert data["include"] == include
    assert data["count"] == 8
    families = [{"recipe": sweep, "slug": "recipes-examples-toy_sweep.yaml", "family": "toy-cos-fmt", "points": "5"}]
    assert data["families"] == families
    outputs = parse_github_output(output.read_text())
    assert outputs["count"] == "8" and outputs["family_count"] == "1"
    assert json.loads(outputs["matrix"]) == {"include": include}
    assert json.loads(outputs["families"]) == {"include": families}
    # Flat strings and booleans only: workflow expressions read every field.
    assert all(isinstance(v, (str, bool)) for e in include for v in e.values())
    assert len({e["slug"] for e in include}) == len(include)
    assert f"| `{sweep}` (family `toy-cos-fmt`, 5 points) | added | yes | yes | {TOY_NOTE} |\n" in summary.read_text()
    text = registry("ci", "changed", "--base", "main", cwd=pr).stdout
    assert f"  {sweep}  added  [plan, dry run]  family toy-cos-fmt, 5 points\n" in text


def test_a_template_change_touches_every_point_of_every_sweep(upstream: Path) -> None:
    commit(upstream, "a team family", {"recipes/family.yaml": FAMILY})
    before = git(upstream, "rev-parse", "HEAD")
    commit(upstream, "team card v2", {"templates/model_card.md.j2": TEMPLATE.replace("v1", "v2")})
    data = json.loads(registry("ci", "changed", "--base", before, "--no-examples", "--format", "json", cwd=upstream).stdout)
    points = [("0", "a=0.25 b=0.75", "team/alpha-a0.25-b0.75"), ("1", "a=0.75 b=0.25", "team/alpha-a0.75-b0.25")]
    assert data["include"] == [
        entry("recipes/alpha.yaml", "templates changed", repo_id="team/alpha"),
        entry("recipes/beta.yaml", "templates changed", repo_id="team/beta"),
        *point_entries("recipes/family.yaml", "templates changed", points, "alpha-mix"),
        entry("recipes/gone.yaml", "templates changed", repo_id="team/gone"),
        entry("recipes/old_name.yaml", "templates changed", repo_id="team/renamed"),
    ]
    assert (data["count"], data["families"]) == (6, [{"recipe": "recipes/family.yaml", "slug": "recipes-family.yaml",
                                                       "family": "alpha-mix", "points": "2"}])


def toy_smoke(passed: bool, nll: float, kl_cos: float, kl_fmt: float) -> dict:
    return {
        "format": 3, "passed": passed, "device": "cpu",
        "checks": [{"name": "short", "status": "passed", "reason": "coherent", "details": {}},
                   {"name": "long", "status": "passed" if passed else "failed", "reason": "retrieval", "details": {}}],
        "long": [{"tokens": 256, "depth": 0.5, "status": "retrieved"}, {"tokens": 512, "depth": 0.5, "status": "retrieved" if passed else "missed"}],
        "parity": [{"model": "merged", "nll": nll, "long_retrieved": 2 if passed else 1, "long_total": 2},
                   {"model": "cos", "nll": 2.5, "long_retrieved": 2, "long_total": 2, "kl": kl_cos, "top1_agreement": 0.9},
                   {"model": "fmt", "nll": 2.25, "long_retrieved": 2, "long_total": 2, "kl": kl_fmt, "top1_agreement": 0.8}],
    }


def test_summary_groups_a_sweep_under_one_heading_with_its_family_table(pr: Path, tmp_path: Path) -> None:
    sweep = "recipes/examples/toy_sweep.yaml"
    commit(pr, "a toy family", {sweep: TOY_SWEEP, "recipes/family.yaml": FAMILY})
    reports = tmp_path / "reports"
    # The dry runs of points 1 and 3 left reports (report-<slug>-p<K>, as the workflow names them); the others none.
    for index, smoke in ((1, toy_smoke(True, 2.375, 0.125, 0.0625)), (3, toy_smoke(False, 9.5, 1.5, 2.25))):
        folder = reports / f"report-recipes-examples-toy_sweep.yaml-p{index}"
        folder.mkdir(parents=True)
        (folder / "smoke.json").write_text(json.dumps(smoke))
    run = registry("ci", "summary", sweep, "recipes/family.yaml", "--base", "main", "--reports", str(reports), cwd=pr)
    assert run.returncode == 0, run.stderr
    recipes = {path: load_recipe(pr / path) for path in (sweep, "recipes/family.yaml")}
    old = Path.cwd()
    os.chdir(pr)
    try:
        cards = {path: render_card(r.points()[0].recipe, None, None, [pr / "templates"]) for path, r in recipes.items()}
    finally:
        os.chdir(old)
    base = git(pr, "merge-base", "main", "HEAD")

    def preview(path: str, label: str) -> str:
        return details(cards[path]).replace("Card preview (README.md,", f"Card preview (point 0, {label}, README.md,")

    expected = (
        "## Recipe check\n"
        "\n"
        "2 recipes checked, all valid.\n"
        f"Compared with `main` at `{base[:12]}`.\n"
        "\n"
        "**Deleted:** `recipes/gone.yaml` (published models are left as they are).\n"
        "\n"
        f"### `{sweep}`\n"
        "\n"
        f"**Valid** · family `toy-cos-fmt`, 5 points · recipe sha256 `{recipes[sweep].sha256[:12]}` · added\n"
        "\n"
        "New recipe.\n"
        "\n"
        "**Dry run:** 2 of 5 points merged and smoke-tested on the CPU, 1 passed; no report for points 0, 2, 4: "
        "the dry run failed or did not finish; see their job logs\n"
        "\n"
        "| point | state | NLL | retrieved | KL cos | KL fmt | top1 cos | top1 fmt | selected |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---|\n"
        "| cos=0 fmt=1 | planned | n/a | n/a | n/a | n/a | n/a | n/a | no |\n"
        "| cos=0.25 fmt=0.75 | passed | 2.375 | 2/2 | 0.1250 | 0.0625 | 0.900 | 0.800 | yes |\n"
        "| cos=0.5 fmt=0.5 | planned | n/a | n/a | n/a | n/a | n/a | n/a | no |\n"
        "| cos=0.75 fmt=0.25 | failed | 9.500 | 1/2 | 1.5000 | 2.2500 | 0.900 | 0.800 | no |\n"
        "| cos=1 fmt=0 | planned | n/a | n/a | n/a | n/a | n/a | n/a | no |\n"
        "| parent cos | parent | 2.500 | 2/2 | 0.0000 | n/a | 1.000 | n/a |   |\n"
        "| parent fmt | parent | 2.250 | 2/2 | n/a | 0.0000 | n/a | 1.000 |   |\n"
        + preview(sweep, "cos=0 fmt=1")
        + "\n"
        "### `recipes/family.yaml`\n"
        "\n"
        f"**Valid** · family `alpha-mix`, 2 points · recipe sha256 `{recipes['recipes/family.yaml'].sha256[:12]}` · added\n"
        "\n"
        "New recipe.\n"
        "\n"
        "**Dry run:** not run: local source 'a' is not in the checkout; local source 'b' is not in the checkout; "
        "the points are listed unmerged\n"
        "\n"
        "| point | state | NLL | retrieved | selected |\n"
        "|---|---|---:|---:|---|\n"
        "| a=0.25 b=0.75 | planned | n/a | n/a | no |\n"
        "| a=0.75 b=0.25 | planned | n/a | n/a | no |\n"
        "| parent a | parent | n/a | n/a |   |\n"
        "| parent b | parent | n/a | n/a |   |\n"
        + preview("recipes/family.yaml", "a=0.25 b=0.75")
    )
    assert run.stdout == expected
    data = json.loads(registry("ci", "summary", sweep, "--base", "main", "--reports", str(reports), "--format", "json", cwd=pr).stdout)
    assert [(p["index"], p["repo_id"], p["smoke_passed"]) for p in data["recipes"][0]["points"]] == [
        (0, TOY_POINTS[0][2], None), (1, TOY_POINTS[1][2], True), (2, TOY_POINTS[2][2], None), (3, TOY_POINTS[3][2], False),
        (4, TOY_POINTS[4][2], None)]


def test_a_sweep_diff_names_its_points() -> None:
    before = parse_recipe(FAMILY)
    after = parse_recipe(FAMILY.replace("a: [0.25, 0.75]", "a: [0.25, 0.5]"))
    assert ci.recipe_diff(before, after) == [("sweep points", "a=0.25 b=0.75; a=0.75 b=0.25", "a=0.25 b=0.75; a=0.5 b=0.5")]
    assert ci.recipe_diff(parse_recipe(ALPHA), before)[-1] == ("sweep points", "no sweep", "a=0.25 b=0.75; a=0.75 b=0.25")


def test_points_built_on_separate_runners_are_published_by_the_family_job_without_torch(tmp_path: Path) -> None:
    """publish.yml's flow on the CPU: each point job builds its point and hands over its build folder; the family job publishes them all."""
    toy = ROOT / "tests" / "fixtures" / "toy"
    recipe = tmp_path / "toy_sweep.yaml"
    recipe.write_text(TOY_SWEEP.replace("../../tests/fixtures/toy", str(toy)).replace("[0, 0.25, 0.5, 0.75, 1]", "[0.25, 0.75]"))
    gathered = tmp_path / "family" / "build"
    gathered.mkdir(parents=True)
    for point in (0, 1):
        runner = {"REGISTRY_HOME": f"runner{point}"}
        built = registry("sweep", "build", str(recipe), "--point", str(point), "--device", "cpu", cwd=tmp_path, env=runner)
        assert built.returncode == 0, built.stderr
        output = tmp_path / f"output{point}"
        found = registry("ci", "point", str(recipe), "--point", str(point), "--format", "json", cwd=tmp_path,
                         env={**runner, "GITHUB_OUTPUT": str(output)})
        assert found.returncode == 0, found.stderr
        outputs = parse_github_output(output.read_text())
        assert outputs == json.loads(found.stdout)
        assert re.fullmatch(r"[0-9a-f]{12}", outputs["id"])
        assert (outputs["point"], outputs["label"], outputs["state"], outputs["folder"]) == (
            str(point), ["cos=0.25 fmt=0.75", "cos=0.75 fmt=0.25"][point], "smoke passed", f"runner{point}/build/{outputs['id']}")
        # The artifact holds <merge identity>/; downloading every point's with merge-multiple puts them in the build root.
        shutil.move(tmp_path / outputs["folder"], gathered / outputs["id"])
    # The family job: torch, transformers and mergekit cannot even be imported, so nothing is merged or smoke-tested.
    block = "import sys\nfor m in ('torch', 'transformers', 'mergekit'): sys.modules[m] = None\nfrom registry.cli import main\nmain(sys.argv[1:])"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GITHUB_")}
    environ.update({"REGISTRY_LOAD_PLUGINS": "", "REGISTRY_HOME": "family"})
    run = subprocess.run([sys.executable, "-c", block, "publish", str(recipe), "--device", "cpu", "--format", "json"],
                         cwd=tmp_path, capture_output=True, text=True, env=environ, timeout=300)
    assert run.returncode == 0, run.stderr
    points = json.loads(run.stdout)["points"]
    assert [(p["state"], p["merge"], p["smoke"]["reused"]) for p in points] == [("published", "reused", True)] * 2
    report = registry("sweep", "report", str(recipe), "--format", "markdown", cwd=tmp_path, env={"REGISTRY_HOME": "family"})
    assert [line.split(" | ")[:2] for line in report.stdout.splitlines()[2:4]] == [
        ["| cos=0.25 fmt=0.75", "published"], ["| cos=0.75 fmt=0.25", "published"]]
