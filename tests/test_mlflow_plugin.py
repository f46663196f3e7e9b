"""The registry-mlflow plugin, pip-installed from plugins/registry-mlflow and found only through its
entry point, publishing into a real MLflow Model Registry (SQLite backend, local artifact store, no server)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from conftest import install_plugin, registered_through_entry_point

from registry.errors import PublishError
from registry.identity import card_identity
from registry.publish import Bundle, Published, bundle_files
from registry.publish.hf import HfTarget
from registry.recipe import parse_recipe
from registry.reports import Eval, GateRow, MetricScore, Provenance, Smoke, TaskScores
from registry.reports import write as write_report
from registry.testing.fixtures import HUB_ORG, HUB_TOKEN

ROOT = Path(__file__).parent.parent
MISSING_RECIPE = ROOT / "tests" / "recipes" / "invalid" / "38_plugin_target_missing.yaml"

RECIPE = """\
repo_id: {repo_id}
sources:
  cos: {{model: ./ckpt/cos, label: GRPO cosine reward}}
  fmt: {{model: org/fmt, revision: main}}
merge:
  merge_method: linear
  models:
    - {{model: cos, parameters: {{weight: {w}}}}}
    - {{model: fmt, parameters: {{weight: 0.7}}}}
"""
PINS = {
    "cos": {"kind": "local", "repo_id": None, "revision": None, "content_sha256": "c" * 64,
            "label": "GRPO cosine reward", "hub_id": None, "weight": 0.3},
    "fmt": {"kind": "hub", "repo_id": "org/fmt", "revision": "f" * 40, "content_sha256": None,
            "label": None, "hub_id": None, "weight": 0.7},
}
PINS_JSON = (
    '{"cos":{"content_sha256":"' + "c" * 64 + '","kind":"local","repo_id":null,"revision":null},'
    '"fmt":{"content_sha256":null,"kind":"hub","repo_id":"org/fmt","revision":"' + "f" * 40 + '"}}'
)
CARD_BODY = "# {repo_id}\n\nA linear merge of two GRPO checkpoints.\n\n| check | status |\n|---|---|\n| short | {short} |\n"


# ---------------------------------------------------------------------------------------------
# The plugin, installed like a third-party package


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """plugins/registry-mlflow, installed into a folder of its own (conftest.install_plugin)."""
    return install_plugin(tmp_path_factory, "registry-mlflow", "registry_mlflow", "mlflow")


def env_with(site: Path | None, **extra: str) -> dict[str, str]:
    """os.environ for a `registry` subprocess, with the plugin's folder on its path or not."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REGISTRY_LOAD_PLUGINS")}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    elif _in_venv():
        env["REGISTRY_LOAD_PLUGINS"] = ""  # a developer installed it into the venv: hide it
    return {**env, **extra}


def _in_venv() -> bool:
    try:
        distribution("registry-mlflow")
    except PackageNotFoundError:
        return False
    return True


def registry(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "registry", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


@pytest.fixture(scope="module")
def target_cls(plugin_site):
    """The `mlflow` target class, found through the `registry` entry point of the installed distribution."""
    return registered_through_entry_point(plugin_site, "mlflow", "registry-mlflow", "register_targets")


# ---------------------------------------------------------------------------------------------
# A real MLflow registry: SQLite database and artifact folder, shared by this module's tests


@pytest.fixture(scope="module")
def mlflow_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="module")
def uri(mlflow_home) -> str:
    return f"sqlite:///{mlflow_home / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _no_mlflow_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def options(target_cls, uri, mlflow_home, **extra):
    return target_cls.Options(registry_uri=uri, artifact_location=(mlflow_home / "artifacts").as_uri(), **extra)


def make_bundle(folder: Path, repo_id: str, *, weight: float = 0.3, smoke_passed: bool = True,
                pins: dict | None = None, body: str | None = None):
    """A finished model folder (real safetensors weights, config, card, reports) and its bundle."""
    import numpy as np
    from safetensors.numpy import save_file

    recipe = parse_recipe(RECIPE.format(repo_id=repo_id, w=weight))
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(int(weight * 1000))
    save_file({"model.embed_tokens.weight": rng.standard_normal((64, 16)).astype(np.float32),
               "lm_head.weight": rng.standard_normal((64, 16)).astype(np.float32)}, str(folder / "model.safetensors"))
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 16, "vocab_size": 64}
    (folder / "config.json").write_text(json.dumps(config))
    short = "passed" if smoke_passed else "failed"
    checks = [
        {"name": "short", "status": short, "reason": "" if smoke_passed else "output is 4 repeated tokens", "details": {}},
        {"name": "long", "status": "skipped", "reason": "context_tokens exceeds the model's 32768", "details": {}},
    ]
    merge_id = hashlib.sha256(f"{repo_id} {weight} {json.dumps(pins or PINS, sort_keys=True)}".encode()).hexdigest()
    smoke = Smoke(merge_identity=merge_id, passed=smoke_passed, device="cpu", checks=checks)
    fields = ("kind", "repo_id", "revision", "content_sha256", "weight")
    provenance = Provenance(merge_identity=merge_id, merge_method="linear", dtype="float32", config_donor="cos",
                            sources={alias: {f: pin.get(f) for f in fields} for alias, pin in (pins or PINS).items()},
                            files={}, versions={"registry": "0.1.0"}, device="cpu")
    write_report(smoke, folder)
    write_report(provenance, folder)
    body = body if body is not None else CARD_BODY.format(repo_id=repo_id, short=short)
    card = (
        "---\nbase_model:\n- org/cos\n- org/fmt\nbase_model_relation: merge\nlicense: mit\n"
        f"registry:\n  recipe_sha256: {recipe.sha256}\n  merge_identity: {merge_id}\n---\n\n" + body
    )
    (folder / "README.md").write_text(card)
    bundle = Bundle(repo_id, recipe.sha256, pins or PINS, bundle_files(folder), provenance, smoke, card)
    return recipe, bundle


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Finding the plugin, and its absence


def test_registry_plugins_lists_the_installed_plugin_with_its_version(plugin_site):
    run = registry("plugins", "--format", "json", env=env_with(plugin_site))
    assert run.returncode == 0, run.stderr
    listed = {p["name"]: p for p in json.loads(run.stdout)}
    assert listed["mlflow"] == {
        "name": "mlflow", "hooks": ["register_commands", "register_targets", "register_verify_sources"],
        "package": "registry-mlflow", "version": "0.1.0",
    }


def test_without_the_plugin_a_recipe_naming_mlflow_says_which_package_provides_it(plugin_site):
    missing = registry("validate", str(MISSING_RECIPE), env=env_with(None))
    assert missing.returncode == 1
    assert missing.stdout.splitlines() == [
        f"error {MISSING_RECIPE}:8:13: publish[0].target: unknown publish target 'mlflow': it is provided by the "
        "plugin package 'registry-mlflow' (pip install registry-mlflow)",
        "1 of 1 recipe invalid",
    ]
    installed = registry("validate", str(MISSING_RECIPE), env=env_with(plugin_site))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert installed.stdout.splitlines() == [f"ok    {MISSING_RECIPE}  (team/m)", "1 recipe valid"]


def test_validate_reports_the_plugins_option_errors_with_file_and_line(plugin_site, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        RECIPE.format(repo_id="team/m", w=0.3)
        + "publish:\n  - target: mlflow\n    model_name: team/merges\n    alias: latest\n"
        "    link_only: 'yes'\n    registri_uri: sqlite:///x.db\n"
    )
    run = registry("validate", str(recipe), env=env_with(plugin_site))
    assert run.returncode == 1
    assert run.stdout.splitlines() == [
        f"error {recipe}:12:17: publish[0].model_name: model_name 'team/merges' may not contain '/' or ':' "
        "(MLflow refuses them); use e.g. 'team--merges'",
        f"error {recipe}:13:12: publish[0].alias: alias 'latest' is reserved by MLflow; choose another, e.g. 'latest-smoke-passed'",
        f"error {recipe}:14:16: publish[0].link_only: link_only must be true or false, got 'yes'",
        f"error {recipe}:15:5: publish[0].registri_uri: unknown key 'registri_uri' (did you mean 'registry_uri'?)",
        "1 of 1 recipe invalid",
    ]


# ---------------------------------------------------------------------------------------------
# Publishing


def test_publish_registers_a_version_with_files_card_tags_and_alias(target_cls, uri, mlflow_home, client, tmp_path):
    target = target_cls()
    opts = options(target_cls, uri, mlflow_home, model_name="cos-fmt")
    recipe, bundle = make_bundle(tmp_path / "build", "team/cos-fmt")
    merge_id = bundle.provenance.merge_identity
    assert target.current(recipe, merge_id, opts) is None
    plan = target.plan(bundle, opts)
    assert (plan.up_to_date, plan.upload, plan.location) == (
        False, ["README.md", "config.json", "model.safetensors", "provenance.json", "smoke.json"], f"models:/cos-fmt at {uri}",
    )
    assert plan.upload_bytes == sum(f.size for f in bundle.files.values())

    result = target.publish(bundle, opts)
    assert result.to_dict() == {
        "target": "mlflow", "location": f"models:/cos-fmt/1 at {uri}", "revision": "1", "changed": True,
        "detail": "version 1; alias 'latest-smoke-passed' moved to it", "kept": [], "notes": [],
    }
    version = client.get_model_version("cos-fmt", "1")
    assert version.description == CARD_BODY.format(repo_id="team/cos-fmt", short="passed")
    assert version.tags == {
        "registry.repo_id": "team/cos-fmt",
        "registry.recipe_sha256": recipe.sha256,
        "registry.merge_identity": merge_id,
        "registry.card_identity": card_identity(bundle.card),
        "registry.pins": PINS_JSON,
        "registry.sources": f"cos=local sha256:{'c' * 64}; fmt=org/fmt@{'f' * 40}",
        "registry.base_model": "org/cos, org/fmt",
        "registry.smoke": "passed",
        "registry.smoke.short": "passed",
        "registry.smoke.long": "skipped: context_tokens exceeds the model's 32768",
    }
    assert client.get_registered_model("cos-fmt").aliases == {"latest-smoke-passed": 1}
    assert client.get_model_version_by_alias("cos-fmt", "latest-smoke-passed").version == 1

    run = client.get_run(version.run_id)
    assert (run.info.status, run.data.tags["registry.recipe_sha256"]) == ("FINISHED", recipe.sha256)
    assert version.source == f"{run.info.artifact_uri}/model"
    assert run.info.artifact_uri.startswith((mlflow_home / "artifacts").as_uri())
    downloaded = Path(client.download_artifacts(version.run_id, "model", str(tmp_path / "download")))
    assert sorted(p.name for p in downloaded.iterdir()) == sorted(bundle.files)
    assert {rel: sha256(downloaded / rel) for rel in bundle.files} == {rel: f.sha256 for rel, f in bundle.files.items()}

    # Same merge, same card: nothing is sent, no version is created.
    assert target.current(recipe, merge_id, opts) == Published(merge_id, card_identity(bundle.card))
    assert target.plan(bundle, opts).to_dict() == {
        "target": "mlflow", "location": f"models:/cos-fmt/1 at {uri}", "up_to_date": True, "upload": [], "delete": [], "upload_bytes": 0, "kept": [],
    }
    again = target.publish(bundle, opts)
    assert (again.changed, again.revision, again.detail) == (False, "1", "already published as version 1")
    assert [v.version for v in client.search_model_versions("name = 'cos-fmt'")] == [1]

    # A source moved to a new commit: same recipe, new pins, so a new version that takes the alias.
    moved = {**PINS, "fmt": {**PINS["fmt"], "revision": "e" * 40}}
    _, rebuilt = make_bundle(tmp_path / "build2", "team/cos-fmt", pins=moved)
    moved_id = rebuilt.provenance.merge_identity
    assert target.current(recipe, moved_id, opts) is None
    second = target.publish(rebuilt, opts)
    assert (second.changed, second.revision) == (True, "2")
    assert client.get_registered_model("cos-fmt").aliases == {"latest-smoke-passed": 2}
    assert target.current(recipe, merge_id, opts) is not None and target.current(recipe, moved_id, opts) is not None

    # Same merge, another card (a template or summary edit): a new version, since MLflow cannot keep the files.
    assert target.card_only is False
    _, recarded = make_bundle(tmp_path / "build3", "team/cos-fmt", body="# Edited card\n")
    assert recarded.provenance.merge_identity == merge_id
    assert target.plan(recarded, opts).up_to_date is False
    assert target.publish(recarded, opts).revision == "3"
    assert target.current(recipe, merge_id, opts) == Published(merge_id, card_identity(recarded.card))


def test_a_failed_smoke_test_registers_a_version_but_leaves_the_alias(target_cls, uri, mlflow_home, client, tmp_path):
    target = target_cls()
    opts = options(target_cls, uri, mlflow_home, model_name="smoke-gated", alias="production")
    _, good = make_bundle(tmp_path / "good", "team/smoke-gated", weight=0.3)
    assert target.publish(good, opts).detail == "version 1; alias 'production' moved to it"

    _, bad = make_bundle(tmp_path / "bad", "team/smoke-gated", weight=0.4, smoke_passed=False)
    result = target.publish(bad, opts)
    assert (result.changed, result.revision) == (True, "2")
    assert result.detail == "version 2; smoke test failed: alias 'production' left at version 1"
    assert client.get_registered_model("smoke-gated").aliases == {"production": 1}
    tags = client.get_model_version("smoke-gated", "2").tags
    assert (tags["registry.smoke"], tags["registry.smoke.short"]) == ("failed", "failed: output is 4 repeated tokens")

    # The first publish of a model whose smoke test failed sets no alias at all.
    _, first_bad = make_bundle(tmp_path / "first-bad", "team/never-passed", smoke_passed=False)
    assert target.publish(first_bad, options(target_cls, uri, mlflow_home)).detail == (
        "version 1; smoke test failed: alias 'latest-smoke-passed' not set"
    )
    assert client.get_registered_model("team--never-passed").aliases == {}


def test_eval_scores_are_metrics_of_the_versions_run_and_a_failed_gate_leaves_the_alias(target_cls, uri, mlflow_home, client, tmp_path):
    target = target_cls()
    opts = options(target_cls, uri, mlflow_home, model_name="scored")

    def scores(value: float, stderr: float | None) -> dict[str, TaskScores]:
        return {"minerva_math500": TaskScores(version="1.0", samples=500, metrics={
            "exact_match,none": MetricScore(value=value, stderr=stderr), "extracted": MetricScore(value=None)})}

    def evaluation(value: float, passed: bool) -> Eval:
        gate = GateRow(task="minerva_math500", metric="exact_match,none", max_drop=0.02, value=value, parent="fmt",
                       parent_value=0.31, passed=passed, reason="")
        return Eval(eval_identity="e" * 64, merge_identity="m" * 64, evaluator="lm-eval", evaluator_version="0.4.9",
                    config_sha256="c" * 64, device="cuda", tasks=scores(value, 0.02),
                    parents={"cos": scores(0.25, 0.019), "fmt": scores(0.31, 0.021)}, gate=[gate], passed=passed)

    _, good = make_bundle(tmp_path / "good", "team/scored", weight=0.3)
    good.evaluation = evaluation(0.32, True)
    assert target.publish(good, opts).detail == "version 1; alias 'latest-smoke-passed' moved to it"
    version = client.get_model_version("scored", "1")
    assert client.get_run(version.run_id).data.metrics == {
        "eval/minerva_math500/exact_match_none": 0.32, "eval/minerva_math500/exact_match_none_stderr": 0.02,
        "parent/cos/minerva_math500/exact_match_none": 0.25, "parent/cos/minerva_math500/exact_match_none_stderr": 0.019,
        "parent/fmt/minerva_math500/exact_match_none": 0.31, "parent/fmt/minerva_math500/exact_match_none_stderr": 0.021,
    }
    assert (version.tags["registry.eval"], version.tags["registry.eval.evaluator"]) == ("passed", "lm-eval 0.4.9")

    _, bad = make_bundle(tmp_path / "bad", "team/scored", weight=0.4)
    bad.evaluation = evaluation(0.1, False)
    assert target.publish(bad, opts).detail == "version 2; eval gate failed: alias 'latest-smoke-passed' left at version 1"
    assert client.get_model_version("scored", "2").tags["registry.eval"] == "failed"


def test_the_registry_comes_from_mlflow_environment_variables(target_cls, uri, mlflow_home, client, tmp_path, monkeypatch):
    target = target_cls()
    opts = target_cls.Options()  # what `registry publish --target mlflow` uses when the recipe names no mlflow entry
    recipe, bundle = make_bundle(tmp_path / "build", "team/from-env")
    with pytest.raises(PublishError) as info:
        target.current(recipe, bundle.provenance.merge_identity, opts)
    assert str(info.value) == (
        "no MLflow registry URI (set registry_uri in the recipe's mlflow publish entry, or MLFLOW_REGISTRY_URI / MLFLOW_TRACKING_URI)"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # An experiment with its artifact root in the test's folder, so the run's files land there.
    client.create_experiment("from-env", artifact_location=(tmp_path / "artifacts").as_uri())
    opts = target_cls.Options(experiment="from-env")
    assert target.publish(bundle, opts).location == f"models:/team--from-env/1 at {uri}"
    assert client.get_model_version("team--from-env", "1").source.startswith((tmp_path / "artifacts").as_uri())
    assert target.current(recipe, bundle.provenance.merge_identity, opts) is not None


def test_an_unreachable_registry_is_one_clear_error(target_cls, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    target = target_cls()
    opts = target_cls.Options(registry_uri=f"http://alice:s3cret@127.0.0.1:{port}")
    _, bundle = make_bundle(tmp_path / "build", "team/unreachable")
    started = time.monotonic()
    with pytest.raises(PublishError) as info:
        target.publish(bundle, opts)
    assert time.monotonic() - started < 10
    assert str(info.value) == (
        f"cannot reach the MLflow registry at http://alice:***@127.0.0.1:{port}: Connection refused "
        "(set registry_uri in the recipe's mlflow publish entry, or MLFLOW_REGISTRY_URI / MLFLOW_TRACKING_URI)"
    )


def test_a_model_name_the_registry_refuses_is_one_clear_error(target_cls, uri, mlflow_home, tmp_path):
    # Static checks catch MLflow's own rules; a registry with stricter ones (Unity Catalog) answers at publish time.
    opts = target_cls.Options.model_construct(**{**options(target_cls, uri, mlflow_home).model_dump(), "model_name": "team/refused"})
    _, bundle = make_bundle(tmp_path / "build", "team/refused")
    with pytest.raises(PublishError) as info:
        target_cls().publish(bundle, opts)
    assert str(info.value) == (
        f"the MLflow registry at {uri} refused the model name 'team/refused': Invalid model name 'team/refused'. "
        "Names cannot contain '/' or ':'. (set a valid model_name in the recipe's mlflow publish entry)"
    )


def test_an_alias_the_registry_refuses_takes_back_the_new_version(target_cls, uri, mlflow_home, client, tmp_path):
    from mlflow.entities import ViewType

    opts = target_cls.Options.model_construct(
        **{**options(target_cls, uri, mlflow_home, model_name="alias-refused", experiment="alias-refused").model_dump(), "alias": "latest"}
    )
    _, bundle = make_bundle(tmp_path / "build", "team/alias-refused")
    with pytest.raises(PublishError) as info:
        target_cls().publish(bundle, opts)
    assert str(info.value) == (
        f"could not move alias 'latest' of 'alias-refused' in the MLflow registry at {uri}: "
        "'latest' alias name (case insensitive) is reserved."
    )
    assert client.search_model_versions("name = 'alias-refused'") == []
    [run] = client.search_runs([client.get_experiment_by_name("alias-refused").experiment_id], run_view_type=ViewType.DELETED_ONLY)
    assert (run.info.status, run.info.lifecycle_stage) == ("FAILED", "deleted")


def test_files_that_cannot_be_logged_register_nothing(target_cls, uri, mlflow_home, client, tmp_path):
    from mlflow.entities import ViewType

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the artifact root should be")
    opts = target_cls.Options(
        registry_uri=uri, model_name="never-registered", experiment="broken-store", artifact_location=(blocker / "artifacts").as_uri(),
    )
    _, bundle = make_bundle(tmp_path / "build", "team/never-registered")
    with pytest.raises(PublishError) as info:
        target_cls().publish(bundle, opts)
    assert str(info.value).startswith(f"could not log README.md in the MLflow registry at {uri}: [Errno 20] Not a directory: ")
    assert client.search_registered_models("name = 'never-registered'") == []
    assert client.search_model_versions("name = 'never-registered'") == []
    experiment = client.get_experiment_by_name("broken-store")
    [run] = client.search_runs([experiment.experiment_id], run_view_type=ViewType.DELETED_ONLY)
    assert (run.info.status, run.info.lifecycle_stage) == ("FAILED", "deleted")


def test_link_only_registers_the_hub_commit_as_the_source(target_cls, uri, mlflow_home, client, hub_server, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    repo_id = f"{HUB_ORG}/linked"
    target = target_cls()
    opts = options(target_cls, uri, mlflow_home, model_name="linked", link_only=True)
    _, bundle = make_bundle(tmp_path / "build", repo_id)
    assert target.plan(bundle, opts).upload == []
    with pytest.raises(PublishError) as info:
        target.publish(bundle, opts)
    assert str(info.value) == (
        f"link_only: {repo_id}@main is not on the Hub at {hub_server.endpoint} "
        "(publish it to the Hub first (list the hf target before mlflow))"
    )
    assert client.search_registered_models("name = 'linked'") == []

    hub = HfTarget().publish(bundle, HfTarget.Options())  # what `--target hf --target mlflow` does first
    result = target.publish(bundle, opts)
    assert (result.changed, result.revision) == (True, "1")
    version = client.get_model_version("linked", "1")
    assert version.source == f"{hub_server.endpoint}/{repo_id}/tree/{hub.revision}"
    assert version.run_id in (None, "")
    assert (version.tags["registry.hub_repo"], version.tags["registry.hub_revision"]) == (repo_id, hub.revision)
    assert version.description == CARD_BODY.format(repo_id=repo_id, short="passed")

    # Another merge of the same repo that is not on the Hub yet cannot be linked.
    _, other = make_bundle(tmp_path / "other", repo_id, weight=0.5)
    with pytest.raises(PublishError, match=r"holds recipe sha256:[0-9a-f]{12}, not this recipe"):
        target.publish(other, opts)


def test_a_long_card_is_cut_to_mlflows_description_limit(target_cls, tmp_path):
    module = sys.modules[target_cls.__module__]
    body = "# team/long\n\n" + "".join(f"| row {i} | {'x' * 60} |\n" for i in range(100))
    _, bundle = make_bundle(tmp_path / "build", "team/long", body=body)
    description = module.version_description(bundle, "README.md in this version's artifacts (model/README.md)")
    note = "\n\n*The card is cut here to fit MLflow's description limit; the full card is README.md in this version's artifacts (model/README.md).*\n"
    assert len(description) <= 5000 and description.endswith(note)
    kept = description.removesuffix(note)
    # Cut at the end of the last whole line that fits beside the note.
    assert body.startswith(kept + "\n") and kept.endswith("x |")
    next_line = body[len(kept) + 1 :].split("\n", 1)[0]
    assert len(kept) + 1 + len(next_line) + len(note) > 5000


def test_versions_command_lists_what_was_registered(target_cls, plugin_site, uri, mlflow_home, client, tmp_path):
    opts = options(target_cls, uri, mlflow_home, model_name="listed")
    recipe, bundle = make_bundle(tmp_path / "build", "team/listed")
    version = target_cls().publish(bundle, opts)
    run = registry("mlflow", "versions", "listed", "--registry-uri", uri, "--format", "json", env=env_with(plugin_site))
    assert run.returncode == 0, run.stderr
    [entry] = json.loads(run.stdout)["versions"]
    assert {k: v for k, v in entry.items() if k not in ("source", "run_id")} == {
        "version": 1, "recipe_sha256": recipe.sha256, "smoke": "passed", "aliases": ["latest-smoke-passed"], "status": "READY",
    }
    assert version.revision == "1" and entry["source"] == client.get_model_version("listed", "1").source

    list_versions = sys.modules[target_cls.__module__].list_versions
    assert [v["version"] for v in list_versions(opts, "listed")] == [1]
    with pytest.raises(PublishError) as info:
        list_versions(opts, "nothing-here")
    assert str(info.value) == f"no registered model 'nothing-here' at {uri} (check the name and --registry-uri)"


def test_tags_and_description_come_from_the_bundle_not_the_files(target_cls, tmp_path):
    module = sys.modules[target_cls.__module__]
    _, bundle = make_bundle(tmp_path / "build", "team/from-bundle", smoke_passed=False)
    # The files are only bytes to upload: the reports and the card are what the bundle carries.
    for name in ("smoke.json", "README.md"):
        (tmp_path / "build" / name).write_text("not what the bundle says")
    tags = module.version_tags(bundle)
    assert (tags["registry.smoke"], tags["registry.smoke.short"]) == ("failed", "failed: output is 4 repeated tokens")
    assert tags["registry.base_model"] == "org/cos, org/fmt"
    assert module.version_description(bundle, "x") == CARD_BODY.format(repo_id="team/from-bundle", short="failed")


# ---------------------------------------------------------------------------------------------
# Signed versions, and `registry verify mlflow:MODEL/VERSION`

SIGNED_RECIPE = """\
repo_id: team/tiny-signed
license: mit
sources:
  a: {{model: ./models/a, label: Fine-tune A}}
  b: {{model: ./models/b, label: Fine-tune B}}
merge:
  merge_method: linear
  models:
    - {{model: a, parameters: {{weight: 0.3}}}}
    - {{model: b, parameters: {{weight: 0.7}}}}
  dtype: bfloat16
smoke:
  short: {{max_new_tokens: 8}}
publish:
  - {{target: mlflow, model_name: tiny-signed, experiment: signed, registry_uri: '{uri}', artifact_location: '{artifacts}', require_signature: true}}
"""


def test_a_signed_version_keeps_its_signature_and_verifies(plugin_site, uri, mlflow_home, client, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from models import TinyConfig, build_family

    from registry.signing import KEY_VARIABLE

    private = ec.generate_private_key(ec.SECP256R1())
    key, public = tmp_path / "team.pem", tmp_path / "team.pub"
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    public.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    build_family(tmp_path / "models", TinyConfig(vocab_size=320))
    recipe = tmp_path / "signed.yaml"
    artifacts = tmp_path / "artifacts"
    recipe.write_text(SIGNED_RECIPE.format(uri=uri, artifacts=artifacts.as_uri()))
    env = env_with(plugin_site, REGISTRY_HOME=str(tmp_path / "home"))
    published = registry("publish", str(recipe), env={**env, KEY_VARIABLE: str(key)}, cwd=tmp_path)
    assert published.returncode == 0, published.stdout + published.stderr

    version = client.get_model_version("tiny-signed", "1")
    logged = {item.path for item in client.list_artifacts(version.run_id, "model")}
    assert {"model/model.sig", "model/README.md", "model/provenance.json", "model/model.safetensors"} <= logged

    env = {**env, "MLFLOW_TRACKING_URI": uri}
    good = registry("verify", "mlflow:tiny-signed/1", "--key", str(public), "--format", "json", env=env)
    assert good.returncode == 0, good.stdout + good.stderr
    result = json.loads(good.stdout)
    assert (result["verdict"], {c["name"]: c["status"] for c in result["checks"]}) == ("verified", {
        "provenance": "passed", "files": "passed", "extra files": "passed", "card": "passed", "smoke": "passed", "signature": "passed",
    })
    assert sorted(p.name for p in Path(result["folder"]).iterdir()) == sorted(Path(p).name for p in logged)

    # One artifact rewritten in the store: the files and the signature checks both name it.
    [stored] = artifacts.rglob("model/config.json")
    original = sha256(stored)
    stored.write_text(stored.read_text().replace("}", ', "tampered": true}', 1))
    bad = registry("verify", "mlflow:tiny-signed/1", "--key", str(public), env=env)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    problems = [line for line in bad.stdout.splitlines() if line.startswith("failed:")]
    assert problems[0] == f"failed: config.json: sha256 {sha256(stored)}, but provenance.json lists {original}"
    assert problems[1].startswith("failed: model.sig: does not verify with team.pub: ") and "config.json" in problems[1]
    assert len(problems) == 2
    assert bad.stdout.splitlines()[-1] == "mlflow:tiny-signed/1: mismatch"


def test_verify_names_the_schemes_installed_plugins_read(plugin_site, uri, tmp_path):
    env = env_with(None, REGISTRY_HOME=str(tmp_path / "home"))
    without = registry("verify", "mlflow:tiny-signed/1", env=env)
    assert (without.returncode, without.stdout) == (2, "")
    assert without.stderr.splitlines() == [
        "error: mlflow:tiny-signed/1: no installed plugin reads 'mlflow:' targets (known: hf:) "
        "(install the plugin that provides it, or pass a folder or a local-registry REPO[@VERSION])",
    ]
    env = env_with(plugin_site, REGISTRY_HOME=str(tmp_path / "home"), MLFLOW_TRACKING_URI=uri)
    unknown = registry("verify", "s3:bucket/model", env=env)
    assert "no installed plugin reads 's3:' targets (known: hf:, mlflow:)" in unknown.stderr
    for ref, message in (
        ("mlflow:tiny/latest", "mlflow:tiny/latest: expected mlflow:MODEL/VERSION (a registered model name and a version number)"),
        ("mlflow:../2", "mlflow:../2: model_name '..' must not look like a relative path (MLflow stores names as paths)"),
    ):
        run = registry("verify", ref, env=env)
        assert run.stderr.splitlines() == [f"error: {message}"], run.stderr
