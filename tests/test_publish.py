"""`registry publish` end to end, run as users run it: a subprocess, against the local Hub test server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from models import TinyConfig, build_family

from registry import reports
from registry.smoke_checks import builtin_checks
from registry.testing.fixtures import HUB_ORG, HUB_TOKEN, LIMITED_TOKENS, ORG_WRITERS, hub_client

RECIPE = """\
repo_id: {repo_id}
summary: Tiny linear merge for the publish tests
license: mit
ancestor: registry-team/tiny-base
sources:
  a: {{model: ./models/a, label: Fine-tune A}}
  b: {{model: ./models/b, label: Fine-tune B}}
merge:
  merge_method: linear
  models:
    - {{model: a, parameters: {{weight: {wa}}}}}
    - {{model: b, parameters: {{weight: {wb}}}}}
  parameters: {{normalize: {normalize}}}
  dtype: bfloat16
smoke:
  short: {{max_new_tokens: 8}}
  long: {{lengths: [128], depths: [0.5]}}
"""


REPO_ID = f"{HUB_ORG}/tiny-merge"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A recipe folder with two tiny fine-tunes, and a registry home whose merges the tests share."""
    root = tmp_path_factory.mktemp("publish")
    build_family(root / "models", TinyConfig(vocab_size=320))
    return root


def write_recipe(workspace: Path, name: str, repo_id: str, *, wa=0.3, wb=0.7, normalize="true") -> Path:
    """The same name and content give the same recipe sha256, so its merge is shared by the tests."""
    path = workspace / f"{name}.yaml"
    path.write_text(RECIPE.format(repo_id=repo_id, wa=wa, wb=wb, normalize=normalize))
    return path


def publish(workspace: Path, recipe: Path, *args: str, env: dict | None = None, importtime: bool = False):
    python = [sys.executable, "-X", "importtime"] if importtime else [sys.executable]
    run = subprocess.run(
        [*python, "-m", "registry", "publish", str(recipe), *args],
        cwd=workspace, capture_output=True, text=True, timeout=600,
        env={**os.environ, "REGISTRY_HOME": str(workspace / ".registry"), **(env or {})},
    )
    return run


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_publish_to_the_hub_then_nothing_to_do(hub_server, workspace):
    repo_id, recipe = REPO_ID, write_recipe(workspace, "tiny", REPO_ID)
    env = hub_server.client_env(HUB_TOKEN)
    first = publish(workspace, recipe, "--target", "hf", "--private", "--format", "json", env=env)
    assert first.returncode == 0, first.stderr
    outcome = json.loads(first.stdout)
    assert outcome["merge"] in ("merged", "reused") and outcome["smoke"]["passed"] is True
    model_dir = Path(outcome["model_dir"])
    [result] = outcome["results"]
    assert result["changed"] and result["detail"].startswith("tagged recipe-")

    api = hub_client(hub_server)
    info = api.model_info(repo_id, files_metadata=True)
    assert info.private is True
    local_files = sorted(p.name for p in model_dir.iterdir() if p.is_file())
    assert sorted(s.rfilename for s in info.siblings if s.rfilename != ".gitattributes") == local_files
    for name in local_files:
        remote = Path(api.hf_hub_download(repo_id, name, revision=info.sha))
        assert sha256(remote) == sha256(model_dir / name), name
    card = info.card_data.to_dict()
    assert (card["base_model"], card["base_model_relation"]) == (["registry-team/tiny-base"], "merge")
    assert card["registry"]["recipe_sha256"] == outcome["recipe_sha256"]
    assert hub_server.count(r"^POST /api/models/.*/commit/") == 1
    assert HUB_TOKEN not in first.stdout + first.stderr

    hub_server.clear_requests()
    again = publish(workspace, recipe, "--target", "hf", env=env, importtime=True)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"{repo_id} is already published from recipe {outcome['recipe_sha256'][:12]} on hf: nothing to do"
    imported = {line.rsplit("|", 1)[-1].strip() for line in again.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "transformers", "mergekit"}
    assert hub_server.count(r"^POST .*/(commit|preupload)/") == 0
    assert hub_server.count(r"^PUT ") == 0
    assert HUB_TOKEN not in again.stdout + again.stderr

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(repo_id, token=HUB_TOKEN)
    assert model.config.model_type == "qwen2"


def test_pull_request_and_branch(hub_server, workspace):
    repo_id, recipe = REPO_ID, write_recipe(workspace, "tiny", REPO_ID)
    env = hub_server.client_env(HUB_TOKEN)
    hub_client(hub_server).create_repo(repo_id)
    pr = publish(workspace, recipe, "--target", "hf", "--create-pr", "--format", "json", env=env)
    assert pr.returncode == 0, pr.stderr
    assert json.loads(pr.stdout)["results"][0]["revision"] == "refs/pr/1"
    branch = publish(workspace, recipe, "--target", "hf", "--revision", "staging", "--format", "json", env=env)
    assert branch.returncode == 0, branch.stderr
    api = hub_client(hub_server)
    assert "README.md" in api.list_repo_files(repo_id, revision="staging")
    assert api.list_repo_files(repo_id) == [".gitattributes"]


def test_rate_limits_and_server_errors_are_retried(hub_server, workspace):
    recipe = write_recipe(workspace, "tiny", REPO_ID)
    hub_server.inject(r"^POST /api/models/.*/commit/", 429, retry_after=1)
    hub_server.inject(r"^POST /api/models/.*/commit/", 503, retry_after=1)
    run = publish(workspace, recipe, "--target", "hf", env=hub_server.client_env(HUB_TOKEN))
    assert run.returncode == 0, run.stderr
    statuses = [r.status for r in hub_server.find(r"^POST /api/models/.*/commit/")]
    assert statuses == [429, 503, 200]


@pytest.mark.parametrize("fault", [412, "drop"])
def test_conflict_or_dropped_connection_leaves_the_repo_as_before(hub_server, workspace, fault):
    repo_id, recipe = REPO_ID, write_recipe(workspace, "tiny", REPO_ID)
    api = hub_client(hub_server)
    api.create_repo(repo_id)
    before = api.model_info(repo_id, files_metadata=True)
    if fault == 412:
        hub_server.inject(r"^POST /api/models/.*/commit/", 412)
    else:
        # The commit carries the small files; dropped every time, it never lands.
        hub_server.inject(r"^POST /api/models/.*/commit/", "drop", times=5)
    env = hub_server.client_env(HUB_TOKEN)
    failed = publish(workspace, recipe, "--target", "hf", env=env)
    assert failed.returncode == 1
    [line] = failed.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: ") and "Traceback" not in failed.stderr
    assert line == {
        412: f"error: hf: {repo_id}@main changed while publishing (someone else pushed); nothing was committed: "
        "run `registry publish` again to publish on top of it",
        "drop": "error: hf: the connection to the Hub dropped 5 times during the commit; nothing was committed "
        "(check the network and run `registry publish` again)",
    }[fault]
    after = api.model_info(repo_id, files_metadata=True)
    assert (after.sha, [s.rfilename for s in after.siblings]) == (before.sha, [s.rfilename for s in before.siblings])
    rerun = publish(workspace, recipe, "--target", "hf", env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert "README.md" in api.list_repo_files(repo_id)


def test_missing_or_rejected_token_is_one_line(hub_server, workspace):
    recipe = write_recipe(workspace, "tiny", REPO_ID)
    env = hub_server.client_env("hf_this_token_is_not_valid")
    run = publish(workspace, recipe, "--target", "hf", env=env)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "error: hf: the Hub rejected the token (401): run `hf auth login` or set a valid HF_TOKEN"
    )
    assert "hf_this_token_is_not_valid" not in run.stdout + run.stderr


@pytest.mark.parametrize("dry_run", [False, True], ids=["publish", "dry-run"])
@pytest.mark.parametrize("kind", sorted(LIMITED_TOKENS))
def test_a_token_that_cannot_write_is_refused_before_any_merge(hub_server, workspace, kind, dry_run):
    recipe = write_recipe(workspace, "read-only", REPO_ID, wa=0.45, wb=0.55)
    builds = workspace / ".registry" / "build"

    def built() -> set[str]:
        return {p.name for p in builds.iterdir()} if builds.is_dir() else set()

    before = built()
    token = LIMITED_TOKENS[kind]
    run = publish(workspace, recipe, "--target", "hf", *(["--dry-run"] if dry_run else []), env=hub_server.client_env(token))
    reason = {
        "read token": "it is a read-only token",
        "fine-grained token scoped to the user": f"the fine-grained token has no repo.write permission on {HUB_ORG}",
        "org member with the read role": f"carol has the read role in {HUB_ORG}",
    }[kind]
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: hf: the token cannot write to {HUB_ORG}: {reason}; nothing was merged or sent "
        f"(use a token with write access to {HUB_ORG}: `hf auth login` or HF_TOKEN)"
    )
    assert "Traceback" not in run.stderr and token not in run.stdout + run.stderr
    assert built() == before and not recipe.with_name("read-only.lock.json").exists()
    assert [r.line for r in hub_server.requests if r.path != "/api/agent-harnesses"] == ["GET /api/whoami-v2"]


def test_republishing_keeps_files_someone_else_committed_and_says_so(hub_server, workspace):
    env = hub_server.client_env(HUB_TOKEN)
    first = publish(workspace, write_recipe(workspace, "tiny", REPO_ID), "--target", "hf", env=env)
    assert first.returncode == 0, first.stderr
    colleague = hub_client(hub_server, ORG_WRITERS["admin"])
    colleague.upload_file(path_or_fileobj=b"# Notes", path_in_repo="notes.md", repo_id=REPO_ID)
    colleague.upload_file(path_or_fileobj=b"usage", path_in_repo="docs/usage.md", repo_id=REPO_ID)

    changed = write_recipe(workspace, "tiny-changed", REPO_ID, wa=0.4, wb=0.6)
    dry = publish(workspace, changed, "--target", "hf", "--dry-run", "--format", "json", env=env)
    assert dry.returncode == 0, dry.stderr
    [plan] = json.loads(dry.stdout)["plans"]
    assert (plan["delete"], plan["kept"]) == ([], ["docs/usage.md", "notes.md"])
    again = publish(workspace, changed, "--target", "hf", env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == (
        "hf: kept 2 files that registry did not publish: docs/usage.md, notes.md"
    )
    files = hub_client(hub_server).list_repo_files(REPO_ID)
    assert {"notes.md", "docs/usage.md", "README.md", "model.safetensors"} <= set(files)
    assert Path(hub_client(hub_server).hf_hub_download(REPO_ID, "notes.md")).read_bytes() == b"# Notes"


def test_publish_to_the_local_registry_loads_with_transformers(workspace):
    recipe = write_recipe(workspace, "tiny", REPO_ID)
    first = publish(workspace, recipe, "--format", "json")
    assert first.returncode == 0, first.stderr
    [result] = json.loads(first.stdout)["results"]
    assert result["target"] == "local" and result["changed"]
    folder = Path(result["location"])
    if not folder.is_absolute():
        folder = workspace / folder
    index = json.loads((workspace / ".registry" / "index.json").read_text())
    [entry] = [m for m in index["models"] if m["repo_id"] == REPO_ID]
    for name, meta in entry["files"].items():
        assert sha256(folder / name) == meta["sha256"]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "qwen2"

    listed = subprocess.run([sys.executable, "-m", "registry", "list", "--format", "json"], cwd=workspace,
                            capture_output=True, text=True, env={**os.environ, "REGISTRY_HOME": str(workspace / ".registry")})
    assert REPO_ID in [m["repo_id"] for m in json.loads(listed.stdout)]


def test_dry_run_shows_what_would_be_sent_and_sends_nothing(hub_server, workspace):
    recipe = write_recipe(workspace, "tiny", REPO_ID)
    run = publish(workspace, recipe, "--target", "hf", "--dry-run", "--format", "json", env=hub_server.client_env(HUB_TOKEN))
    assert run.returncode == 0, run.stderr
    [plan] = json.loads(run.stdout)["plans"]
    assert plan["up_to_date"] is False
    assert {"README.md", "config.json", "model.safetensors", "provenance.json", "smoke.json"} <= set(plan["upload"])
    assert hub_server.count(r"^(POST|PUT) ") == 0


def test_a_failing_smoke_test_blocks_publishing_unless_forced(workspace):
    # 1 and -1 without normalize: every merged weight is zero, the logits collapse.
    recipe = write_recipe(workspace, "broken", "team/tiny-broken", wa=1.0, wb=-1.0, normalize="false")
    refused = publish(workspace, recipe)
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: smoke test failed (") and last.endswith(
        "); nothing was published (fix the recipe, or publish anyway with --force)"
    )
    assert not (workspace / ".registry" / "models" / "team" / "tiny-broken").exists()
    forced = publish(workspace, recipe, "--force", "--format", "json")
    assert forced.returncode == 0, forced.stderr
    outcome = json.loads(forced.stdout)
    assert outcome["smoke"] == {"passed": False, "reused": True, "failed": outcome["smoke"]["failed"]}
    assert outcome["results"][0]["changed"]


def test_a_summary_edit_reuses_merge_and_smoke_and_a_threshold_edit_reruns_smoke_only(tmp_path):
    """The toy example: the build folder and smoke.json are keyed by the merge and smoke identities."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "recipes" / "examples" / "toy_cos_fmt.yaml").read_text()
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(text.replace("../../tests/fixtures/toy", str(root / "tests" / "fixtures" / "toy")))

    def run() -> dict:
        done = publish(tmp_path, recipe, "--format", "json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def stages(outcome: dict) -> tuple:
        return outcome["merge"], outcome["smoke"]["passed"], outcome["smoke"]["reused"], outcome["results"][0]["changed"]

    first = run()
    assert stages(first) == ("merged", True, False, True)
    smoke_json = Path(first["model_dir"]) / "smoke.json"
    written = smoke_json.stat().st_mtime_ns

    recipe.write_text(recipe.read_text().replace("summary: Linear merge", "summary: Edited linear merge"))
    edited = run()
    # Same merge, same smoke settings: only the card is new, so is the local version holding it.
    assert stages(edited) == ("skipped", True, True, True)
    assert edited["model_dir"] == first["model_dir"] and smoke_json.stat().st_mtime_ns == written
    assert "Edited linear merge" in Path(edited["card"]).read_text()

    recipe.write_text(recipe.read_text().replace("    lengths: [256, 512]", "    lengths: [256, 512]\n  parity: {nll_margin: 0.5}"))
    stricter = run()
    assert stages(stricter) == ("reused", True, False, True)
    assert stricter["model_dir"] == first["model_dir"] and smoke_json.stat().st_mtime_ns != written
    from registry.identity import smoke_identity
    from registry.recipe import load_recipe
    from registry.reports import Provenance, Smoke, read

    provenance, smoke = read(Provenance, smoke_json.parent), read(Smoke, smoke_json.parent)
    assert smoke.merge_identity == provenance.merge_identity
    assert smoke.smoke_identity == smoke_identity(provenance.merge_identity, load_recipe(recipe))


TOY = Path(__file__).parent / "fixtures" / "toy"


def test_a_source_changed_between_the_merge_and_the_smoke_test_fails_the_publish(tmp_path, monkeypatch):
    from registry.errors import PublishError
    from registry.pipeline import publish as publish_recipe
    from registry.recipe import load_recipe
    from registry.smoke import run_smoke

    for name in ("cos", "fmt"):
        shutil.copytree(TOY / f"ft_{name}", tmp_path / "models" / name)
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(
        "repo_id: team/toy\nsources:\n  cos: {model: ./models/cos}\n  fmt: {model: ./models/fmt}\n"
        "merge:\n  merge_method: linear\n  models:\n"
        "    - {model: cos, parameters: {weight: 0.3}}\n    - {model: fmt, parameters: {weight: 0.7}}\n"
        "  parameters: {normalize: true}\n  dtype: bfloat16\n"
        "smoke:\n  short: {max_new_tokens: 8}\n  long: {lengths: [128], depths: [0.5]}\n"
    )
    monkeypatch.setenv("REGISTRY_HOME", str(tmp_path / ".registry"))
    monkeypatch.chdir(tmp_path)

    def change_cos_after_the_merge(message: str) -> None:
        if message.startswith("merged into"):
            weights = tmp_path / "models" / "cos" / "model.safetensors"
            data = bytearray(weights.read_bytes())
            data[-1] ^= 1  # one bit of the last tensor
            weights.write_bytes(bytes(data))

    changed = (
        "source 'cos' changed since the merge (the sha256 of the weights is not the one in provenance.json), so the "
        "merge cannot be checked against it; restore the source, or accept its new weights with `registry publish --update`"
    )
    with pytest.raises(PublishError) as refused:
        publish_recipe(recipe, targets=["local"], device="cpu", note=change_cos_after_the_merge)
    assert str(refused.value) == (
        f"smoke test failed (weights: {changed}); nothing was published (fix the recipe, or publish anyway with --force)")
    assert not (tmp_path / ".registry" / "models").exists()
    # Keyed by the merge identity; `parents/` beside it holds the parents' cached smoke measurements.
    [build] = [p for p in (tmp_path / ".registry" / "build").iterdir() if not p.name.startswith(".") and p.name != "parents"]
    assert len(list((tmp_path / ".registry" / "build" / "parents").iterdir())) == 1  # fmt only: cos changed, so it is not run
    saved = reports.read(reports.Smoke, build)
    assert saved.passed is False and (saved.checks[0].name, saved.checks[0].status, saved.checks[0].reason) == (
        "weights", "failed", changed)
    assert saved.checks[0].details["changed"] == ["cos"]
    # `registry smoke` on its own still reports what it could not check, as a skip with the reason.
    [weights] = run_smoke(build, load_recipe(recipe), device="cpu", write=False,
                          checks=[c for c in builtin_checks() if c.name == "weights"]).checks
    assert (weights.status, weights.reason) == (
        "skipped", "source 'cos' is not at hand: its weights changed since the merge (their sha256 is not the one in provenance.json)")
