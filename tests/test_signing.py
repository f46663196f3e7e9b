"""Signed releases: the recipe and lock published with the model, `model.sig` written by model-signing at publish."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from markupsafe import escape
from model_signing import verifying
from models import TinyConfig, build_family

from registry.errors import PublishError, SourceError
from registry.recipe import load_recipe, parse_recipe
from registry.release import LOCK_FILE, RECIPE_FILE, read_lock, read_recipe, release_texts
from registry.signing import KEY_VARIABLE, SIGNATURE_FILE, public_key_fingerprint, signing_plan
from registry.sources import plan as make_plan
from registry.testing.fixtures import HUB_ORG, HUB_TOKEN, hub_client

RECIPE = """\
repo_id: {repo_id}
summary: Tiny linear merge for the signing tests
license: mit
ancestor: registry-team/tiny-base
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
  long: {{lengths: [128], depths: [0.5]}}
{extra}"""

REPO_ID = f"{HUB_ORG}/tiny-signed"
PUBLISHED = {
    "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "chat_template.jinja", "provenance.json", "smoke.json", RECIPE_FILE, LOCK_FILE,
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A recipe folder with two tiny fine-tunes; the tests share its merges."""
    root = tmp_path_factory.mktemp("signing")
    build_family(root / "models", TinyConfig(vocab_size=320))
    return root


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """An EC signing key pair and another public key, as PEM files outside the workspace."""
    folder = tmp_path_factory.mktemp("keys")
    found = {}
    for name in ("team", "other"):
        private = ec.generate_private_key(ec.SECP256R1())
        (folder / f"{name}.pem").write_bytes(private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (folder / f"{name}.pub").write_bytes(private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        found[name] = folder / f"{name}.pem"
        found[f"{name}.pub"] = folder / f"{name}.pub"
    return found


def fingerprint(public_pem: Path) -> str:
    return hashlib.sha256(serialization.load_pem_public_key(public_pem.read_bytes()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def write_recipe(workspace: Path, name: str, repo_id: str = REPO_ID, extra: str = "") -> Path:
    path = workspace / f"{name}.yaml"
    path.write_text(RECIPE.format(repo_id=repo_id, extra=extra))
    return path


def publish(workspace: Path, recipe: Path, *args: str, env: dict | None = None):
    clean = {k: v for k, v in os.environ.items() if k != KEY_VARIABLE}
    return subprocess.run(
        [sys.executable, "-m", "registry", "publish", str(recipe), *args],
        cwd=workspace, capture_output=True, text=True, timeout=600,
        env={**clean, "REGISTRY_HOME": str(workspace / ".registry"), **(env or {})},
    )


def verify(folder: Path, public_key: Path) -> None:
    """model-signing's own verifier, as a library call; raises ValueError when the signature does not match."""
    verifying.Config().use_elliptic_key_verifier(public_key=public_key).verify(folder, folder / SIGNATURE_FILE)


def secrets_of(key: Path) -> list[bytes]:
    """What must never be written anywhere: the PEM file, its base64 body, the raw key bytes, its path."""
    pem = key.read_bytes()
    body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
    private = serialization.load_pem_private_key(pem, password=None)
    raw = private.private_numbers().private_value.to_bytes(32, "big")
    return [pem, body, body[:40], raw, raw.hex().encode(), base64.b64encode(raw), str(key).encode()]


def assert_no_secret(key: Path, *texts: str | bytes, folders: tuple[Path, ...] = ()) -> None:
    blobs = [t.encode() if isinstance(t, str) else t for t in texts]
    for folder in folders:
        blobs += [p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    for secret in secrets_of(key):
        assert not any(secret in blob for blob in blobs), secret[:8]


# ---------------------------------------------------------------------------------------------
# The recipe as published


def test_published_recipe_is_pinned_path_free_and_validates(workspace, monkeypatch):
    monkeypatch.setenv("TINY_MODELS", str(workspace / "models"))
    recipe_path = workspace / "paths.yaml"
    # A source by alias through an environment variable, one written straight into the merge block.
    recipe_path.write_text(RECIPE.format(repo_id=REPO_ID, extra="publish: [{target: local}]\n").replace(
        "  a: {model: ./models/a, label: Fine-tune A}\n", "  a: {model: '${TINY_MODELS}/a', label: Fine-tune A}\n").replace(
        "  b: {model: ./models/b, label: Fine-tune B}\n", "").replace("{model: b,", "{model: ./models/b,"))
    recipe = load_recipe(recipe_path)
    plan = make_plan(recipe)
    texts = release_texts(recipe, plan)
    published = parse_recipe(texts[RECIPE_FILE], RECIPE_FILE)
    assert {alias: s.model for alias, s in published.sources.items()} == {
        "a": "${REGISTRY_SOURCE_A}", "model_2": "${REGISTRY_SOURCE_MODEL_2}"}
    assert [m.model for m in published.merge.models] == ["a", "model_2"]
    assert published.publish == [] and "\npublish:" not in texts[RECIPE_FILE] and "target:" not in texts[RECIPE_FILE]
    for text in texts.values():
        assert str(workspace) not in text and "models/" not in text and "TINY_MODELS" not in text
    lock = json.loads(texts[LOCK_FILE])
    assert {k: (v["model"], v["content_sha256"]) for k, v in lock["sources"].items()} == {
        s.name: ("${REGISTRY_SOURCE_" + s.name.upper() + "}", s.content_sha256) for s in plan.sources}

    # It is an input: with the variables set to the same weights, plan reads the published lock and
    # pins the same content; the merge identity is the original's.
    from registry.identity import merge_identity

    release = workspace / "release"
    release.mkdir(exist_ok=True)
    for name, text in texts.items():
        (release / name).write_text(text)
    monkeypatch.setenv("REGISTRY_SOURCE_A", str(workspace / "models" / "a"))
    monkeypatch.setenv("REGISTRY_SOURCE_MODEL_2", str(workspace / "models" / "b"))
    again = read_recipe(release)
    replan = make_plan(again)
    assert all(s.status == "locked" for s in replan.sources) and not replan.lock_changed
    assert merge_identity(again, replan) == merge_identity(recipe, plan)
    assert read_lock(release).sources["a"].content_sha256 == plan.source("a").content_sha256

    # Another folder under the same variable is refused, naming the source whose pin no longer matches.
    monkeypatch.setenv("REGISTRY_SOURCE_A", str(workspace / "models" / "b"))
    with pytest.raises(SourceError) as err:
        make_plan(again)
    assert str(err.value) == (
        f"{release / RECIPE_FILE}:11:12: sources.a.model: source 'a' changed since it was pinned in recipe.lock.json "
        f"(model.safetensors: content sha256 {plan.source('a').content_sha256[:12]} -> {plan.source('model_2').content_sha256[:12]}); "
        "rerun with --update to accept the new weights"
    )


def test_validate_accepts_the_published_recipe(workspace):
    recipe = load_recipe(write_recipe(workspace, "plain"))
    text = release_texts(recipe, make_plan(recipe))[RECIPE_FILE]
    (workspace / "published.yaml").write_text(text)
    run = subprocess.run([sys.executable, "-m", "registry", "validate", "published.yaml"], cwd=workspace,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "ok    published.yaml  (registry-team/tiny-signed)\n1 recipe valid\n"


# ---------------------------------------------------------------------------------------------
# Signing: key handling, before any work


def test_require_signature_without_a_key_is_refused_before_any_merge(workspace):
    for extra in ("sign: {required: true}\n", "publish: [{target: local, require_signature: true}]\n"):
        recipe = write_recipe(workspace, "required", extra=extra)
        run = publish(workspace, recipe)
        assert run.returncode == 1
        assert run.stderr == (
            f"error: {REPO_ID} must be signed and no signing key is set; nothing was done "
            f"(set sign.key in the recipe or {KEY_VARIABLE} to an EC private key file (secp256r1, secp384r1 or secp521r1))\n"
        )
        assert not (workspace / "required.lock.json").exists() and not (workspace / ".registry" / "build").exists()


def test_a_key_that_is_not_an_ec_private_key_is_refused_without_showing_it(tmp_path, keys):
    from registry.plugins import get_signers

    recipe = parse_recipe(RECIPE.format(repo_id=REPO_ID, extra=""))
    rsa_like = tmp_path / "not-a-key.pem"
    rsa_like.write_bytes(keys["team.pub"].read_bytes())
    for path, message in ((rsa_like, "the signing key is not an unencrypted PEM private key"),
                          (tmp_path / "missing.pem", "cannot read the signing key: No such file or directory")):
        with pytest.raises(PublishError) as err:
            signing_plan(recipe, [], get_signers(), {KEY_VARIABLE: str(path)})
        assert err.value.message == message
    found = signing_plan(recipe, [], get_signers(), {KEY_VARIABLE: str(keys["team"])})
    assert found.fingerprint == fingerprint(keys["team.pub"]) == public_key_fingerprint(
        serialization.load_pem_public_key(keys["team.pub"].read_bytes()))
    assert signing_plan(recipe, [], get_signers(), {}) is None


# ---------------------------------------------------------------------------------------------
# Signed publishes, end to end


def test_signed_publish_to_the_local_registry(workspace, keys):
    # The key's path from the recipe, through an environment variable.
    recipe = write_recipe(workspace, "local-signed", extra="sign: {key: '${TEAM_KEYS}/team.pem', required: true}\n")
    env = {"TEAM_KEYS": str(keys["team"].parent)}
    run = publish(workspace, recipe, "--format", "json", env=env)
    assert run.returncode == 0, run.stderr
    outcome = json.loads(run.stdout)
    [result] = outcome["results"]
    folder = Path(result["location"])
    folder = folder if folder.is_absolute() else workspace / folder
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert files == PUBLISHED | {SIGNATURE_FILE}
    index = json.loads((workspace / ".registry" / "index.json").read_text())
    [entry] = [m for m in index["models"] if m["repo_id"] == REPO_ID]
    assert set(entry["files"]) == files

    verify(folder, keys["team.pub"])
    with pytest.raises(ValueError):
        verify(folder, keys["other.pub"])
    card = (folder / "README.md").read_text()
    assert f"  signing_key: {fingerprint(keys['team.pub'])}\n" in card
    assert (folder / RECIPE_FILE).read_text() == (Path(outcome["model_dir"]) / RECIPE_FILE).read_text()
    assert_no_secret(keys["team"], run.stdout, run.stderr, folders=(workspace / ".registry",))

    # The catalog shows the published recipe and the key's fingerprint.
    from registry.catalog import build_site, model_page, read_local

    site = workspace / "site"
    build_site(read_local(workspace / ".registry"), site, [])
    page = (site / model_page(REPO_ID)).read_text()
    assert f"<pre><code>{escape((folder / RECIPE_FILE).read_text())}</code></pre>" in page
    assert "was not published" not in page
    assert f"by the key with SHA-256 fingerprint <code>{fingerprint(keys['team.pub'])}</code>" in page

    # A tampered card no longer verifies.
    tampered = workspace / "tampered"
    shutil.copytree(folder, tampered)
    (tampered / "README.md").write_text(card + "\nextra line\n")
    with pytest.raises(ValueError, match=r"README\.md"):
        verify(tampered, keys["team.pub"])

    # Publishing the same recipe unsigned drops the signature: a new card, no model.sig.
    unsigned = write_recipe(workspace, "local-signed", extra="")
    again = publish(workspace, unsigned, "--format", "json")
    assert again.returncode == 0, again.stderr
    [result] = json.loads(again.stdout)["results"]
    folder = Path(result["location"])
    folder = folder if folder.is_absolute() else workspace / folder
    assert {p.name for p in folder.iterdir()} == PUBLISHED
    assert "signing_key" not in (folder / "README.md").read_text()


def test_signed_publish_to_the_hub_is_one_commit(hub_server, workspace, keys, tmp_path):
    recipe = write_recipe(workspace, "hub-signed", extra="publish: [{target: hf, require_signature: true}]\n")
    env = {**hub_server.client_env(HUB_TOKEN), KEY_VARIABLE: str(keys["team"])}
    run = publish(workspace, recipe, env=env)  # as people run it: progress notes and the smoke report shown
    assert run.returncode == 0, run.stderr
    assert "signed the bundle with key in " in run.stderr
    assert hub_server.count(r"^POST /api/models/.*/commit/") == 1

    api = hub_client(hub_server)
    info = api.model_info(REPO_ID, files_metadata=True)
    names = {s.rfilename for s in info.siblings}
    assert names == PUBLISHED | {SIGNATURE_FILE, ".gitattributes"}
    # The files exactly as committed (the cache holds links; a plain folder is what a user verifies).
    folder = tmp_path / "download"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(Path(api.hf_hub_download(REPO_ID, name, revision=info.sha)).read_bytes())
    verify(folder, keys["team.pub"])
    with pytest.raises(ValueError):
        verify(folder, keys["other.pub"])
    assert info.card_data.to_dict()["registry"]["signing_key"] == fingerprint(keys["team.pub"])
    assert_no_secret(keys["team"], run.stdout, run.stderr, folders=(folder, workspace / ".registry"))

    # Re-publishing with another key re-signs in one commit: only the card and the signature change.
    hub_server.clear_requests()
    other = publish(workspace, recipe, "--format", "json", env={**env, KEY_VARIABLE: str(keys["other"])})
    assert other.returncode == 0, other.stderr
    assert json.loads(other.stdout)["merge"] == "skipped"
    assert hub_server.count(r"^POST /api/models/.*/commit/") == 1
    sha = api.model_info(REPO_ID).sha
    for name in ("README.md", SIGNATURE_FILE):
        (folder / name).write_bytes(Path(api.hf_hub_download(REPO_ID, name, revision=sha)).read_bytes())
    verify(folder, keys["other.pub"])
    with pytest.raises(ValueError):
        verify(folder, keys["team.pub"])
