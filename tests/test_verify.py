"""`registry verify` on the published toy example: on the Hub test server, in the local registry and as a folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from registry.files import sha256_file
from registry.sources import content_sha256
from registry.testing.fixtures import HUB_ORG, HUB_TOKEN, hub_client

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "fixtures" / "toy"
LOCAL_REPO = "registry-examples/toy-cos0.3-fmt0.7"
HUB_REPO = f"{HUB_ORG}/toy-cos0.3-fmt0.7"


def make_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC P-256 key pair as PEM files: (private, public)."""
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.key.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def fingerprint(public: Path) -> str:
    from cryptography.hazmat.primitives import serialization as s

    key = s.load_pem_public_key(public.read_bytes())
    return hashlib.sha256(key.public_bytes(s.Encoding.DER, s.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def sign(folder: Path, private: Path) -> bytes:
    """model-signing's signature of `folder` (written outside it, so it does not cover itself)."""
    from model_signing import signing

    out = folder.parent / f"{folder.name}.sig"
    signing.Config().use_elliptic_key_signer(private_key=private).sign(folder, out)
    return out.read_bytes()


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """The toy example published to a local registry, its sources found through $CHECKPOINTS; two key pairs beside it."""
    root = tmp_path_factory.mktemp("verify")
    for name in ("ft_cos", "ft_fmt"):
        shutil.copytree(TOY / name, root / "checkpoints" / name)
    text = (ROOT / "recipes" / "examples" / "toy_cos_fmt.yaml").read_text()
    (root / "toy.yaml").write_text(text.replace("../../tests/fixtures/toy", "${CHECKPOINTS}"))
    (root / "hub.yaml").write_text(text.replace("../../tests/fixtures/toy", "${CHECKPOINTS}").replace(LOCAL_REPO, HUB_REPO))
    make_key(root, "team")
    make_key(root, "other")
    done = run(root, "publish", "toy.yaml", "--format", "json")
    assert done.returncode == 0, done.stderr
    return root


def env_of(root: Path, extra: dict | None = None) -> dict:
    return {**os.environ, "REGISTRY_HOME": str(root / ".registry"), "CHECKPOINTS": str(root / "checkpoints"), **(extra or {})}


def run(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "registry", *args], cwd=root, capture_output=True, text=True, timeout=600,
                          env=env_of(root, env))


def verify(root: Path, target: str, *args: str, env: dict | None = None) -> tuple[int, dict]:
    """Exit code and the JSON verdict of `registry verify TARGET ARGS --format json`."""
    done = run(root, "verify", target, *args, "--format", "json", env=env)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def failed(result: dict) -> dict[str, str]:
    return {c["name"]: c["message"] for c in result["checks"] if c["status"] != "passed" and c["status"] != "skipped"}


def statuses(result: dict) -> dict[str, str]:
    return {c["name"]: c["status"] for c in result["checks"]}


# ---------------------------------------------------------------------------------------------
# The Hub: tamper tests, each its own commit on top of the published, signed repo


@pytest.fixture
def signed_hub(hub_server, toy, tmp_path):
    """The toy example published to the test Hub, then signed: the folder as downloaded, model.sig uploaded by the real client."""
    env = hub_server.client_env(HUB_TOKEN)
    done = run(toy, "publish", "hub.yaml", "--target", "hf", "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    api = hub_client(hub_server)
    folder = tmp_path / "downloaded"
    for name in api.list_repo_files(HUB_REPO):
        if name != ".gitattributes":
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(api.hf_hub_download(HUB_REPO, name), folder / name)
    signature = sign(folder, toy / "team.key.pem")
    sha = api.upload_file(path_or_fileobj=signature, path_in_repo="model.sig", repo_id=HUB_REPO).oid
    return api, folder, sha, env


def test_the_published_signed_repo_verifies_and_a_wrong_key_fails(signed_hub, toy):
    _, _, sha, env = signed_hub
    code, result = verify(toy, f"hf:{HUB_REPO}@{sha}", "--key", str(toy / "team.pub.pem"), env=env)
    assert (code, result["verdict"], result["revision"]) == (0, "verified", sha)
    assert statuses(result) == {"provenance": "passed", "files": "passed", "extra files": "passed", "card": "passed",
                                "smoke": "passed", "signature": "passed"}
    assert result["checks"][-1]["message"] == f"model.sig: signed by key {fingerprint(toy / 'team.pub.pem')[:12]}"

    code, result = verify(toy, f"hf:{HUB_REPO}", "--key", str(toy / "other.pub.pem"), env=env)
    assert (code, result["verdict"], result["revision"]) == (1, "mismatch", sha)
    [(name, message)] = failed(result).items()
    assert name == "signature" and message.startswith("model.sig: does not verify with other.pub.pem: ")

    # Without a key the signature is named, not checked.
    code, result = verify(toy, f"hf:{HUB_REPO}", env=env)
    assert code == 0 and result["checks"][-1] == {
        "name": "signature", "status": "skipped", "message": "model.sig: not checked; pass --key PUBLIC_KEY.pem to check it"}


def _one_byte_changed(folder: Path) -> bytes:
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0x01  # the last tensor's last byte
    return bytes(data)


def test_one_shard_changed_by_one_byte(signed_hub, toy):
    api, folder, _, env = signed_hub
    changed = _one_byte_changed(folder)
    sha = api.upload_file(path_or_fileobj=changed, path_in_repo="model.safetensors", repo_id=HUB_REPO).oid
    code, result = verify(toy, f"hf:{HUB_REPO}@{sha}", "--key", str(toy / "team.pub.pem"), env=env)
    assert (code, result["verdict"]) == (1, "mismatch")
    listed = json.loads((folder / "provenance.json").read_text())["files"]["model.safetensors"]["sha256"]
    found = failed(result)
    assert found["files"] == f"model.safetensors: sha256 {hashlib.sha256(changed).hexdigest()}, but provenance.json lists {listed}"
    assert set(found) == {"files", "signature"}


def test_the_card_replaced(signed_hub, toy):
    api, folder, _, env = signed_hub
    card = (folder / "README.md").read_text()
    merge_id = json.loads((folder / "provenance.json").read_text())["merge_identity"]
    other = "e" * 64
    sha = api.upload_file(path_or_fileobj=card.replace(merge_id, other).encode(), path_in_repo="README.md", repo_id=HUB_REPO).oid
    code, result = verify(toy, f"hf:{HUB_REPO}@{sha}", "--key", str(toy / "team.pub.pem"), env=env)
    assert (code, result["verdict"]) == (1, "mismatch")
    found = failed(result)
    assert found["card"] == f"README.md: registry.merge_identity {other}, but provenance.json has {merge_id}"
    assert set(found) == {"card", "signature"} and "README.md" in found["signature"]

    # A card whose front matter is kept and whose text is replaced: only the signature catches it.
    body = card.replace("Linear merge of two fine-tunes", "An entirely different model")
    assert body != card
    sha = api.upload_file(path_or_fileobj=body.encode(), path_in_repo="README.md", repo_id=HUB_REPO).oid
    code, result = verify(toy, f"hf:{HUB_REPO}@{sha}", "--key", str(toy / "team.pub.pem"), env=env)
    assert code == 1 and list(failed(result)) == ["signature"] and "README.md" in failed(result)["signature"]


def test_an_extra_file_added(signed_hub, toy):
    api, _, _, env = signed_hub
    sha = api.upload_file(path_or_fileobj=b"print('hi')\n", path_in_repo="extra/run.py", repo_id=HUB_REPO).oid
    code, result = verify(toy, f"hf:{HUB_REPO}@{sha}", "--key", str(toy / "team.pub.pem"), env=env)
    assert (code, result["verdict"]) == (1, "mismatch")
    assert failed(result) == {"extra files": "extra/run.py: not a published file (not in provenance.json)"}


def test_provenance_edited_to_match_a_changed_shard_is_caught_by_the_signature_alone(signed_hub, toy):
    from huggingface_hub import CommitOperationAdd

    api, folder, _, env = signed_hub
    changed = _one_byte_changed(folder)
    provenance = json.loads((folder / "provenance.json").read_text())
    provenance["files"]["model.safetensors"]["sha256"] = hashlib.sha256(changed).hexdigest()
    edited = (json.dumps(provenance, indent=2) + "\n").encode()
    sha = api.create_commit(HUB_REPO, [CommitOperationAdd("model.safetensors", changed), CommitOperationAdd("provenance.json", edited)],
                            commit_message="tamper").oid
    code, result = verify(toy, f"hf:{HUB_REPO}@{sha}", "--key", str(toy / "team.pub.pem"), env=env)
    assert (code, result["verdict"]) == (1, "mismatch")
    [(name, message)] = failed(result).items()
    assert name == "signature"
    assert message.startswith("model.sig: does not verify with team.pub.pem: ")
    assert "model.safetensors" in message and "provenance.json" in message

    # Without the key, nothing else notices: that is what the signature is for.
    code, result = verify(toy, f"hf:{HUB_REPO}@{sha}", env=env)
    assert (code, result["verdict"]) == (0, "verified")


def test_a_missing_repo_cannot_be_verified(hub_server, toy):
    done = run(toy, "verify", f"hf:{HUB_ORG}/nothing-here", env=hub_server.client_env(HUB_TOKEN))
    assert done.returncode == 3
    assert done.stderr.startswith(f"error: hf:{HUB_ORG}/nothing-here: ")

    # A repo id that would lead out of the download cache is no repo id.
    done = run(toy, "verify", "hf:../../etc", env=hub_server.client_env(HUB_TOKEN))
    assert done.returncode == 2 and done.stderr.startswith("error: hf:../../etc: not a Hub repo id (")


# ---------------------------------------------------------------------------------------------
# The local registry and folders


def test_the_local_registry_version_verifies(toy):
    code, result = verify(toy, LOCAL_REPO)
    assert (code, result["verdict"]) == (0, "verified")
    version = result["revision"]
    assert verify(toy, f"{LOCAL_REPO}@{version}")[0] == 0
    done = run(toy, "verify", f"{LOCAL_REPO}@20000101T000000Z-000000000000")
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {LOCAL_REPO}@20000101T000000Z-000000000000: not a folder, and version 20000101T000000Z-000000000000 of")


def _folder_copy(toy: Path, tmp_path: Path) -> Path:
    [version] = (toy / ".registry" / "models" / LOCAL_REPO).iterdir()
    folder = tmp_path / "model"
    shutil.copytree(version, folder)
    return folder


def test_a_folder_signed_with_the_key_its_card_names(toy, tmp_path):
    folder = _folder_copy(toy, tmp_path)
    card = (folder / "README.md").read_text()
    named = card.replace("registry:\n", f"registry:\n  signing_key: {fingerprint(toy / 'team.pub.pem')}\n", 1)
    assert named != card
    (folder / "README.md").write_text(named)
    (folder / "model.sig").write_bytes(sign(folder, toy / "team.key.pem"))
    code, result = verify(toy, str(folder), "--key", str(toy / "team.pub.pem"))
    assert (code, result["verdict"]) == (0, "verified")

    # The key given is not the card's: refused by fingerprint before the signature is read.
    code, result = verify(toy, str(folder), "--key", str(toy / "other.pub.pem"))
    assert code == 1 and failed(result) == {"signature": (
        f"README.md: registry.signing_key {fingerprint(toy / 'team.pub.pem')}, "
        f"but the key given has fingerprint {fingerprint(toy / 'other.pub.pem')}")}


def test_what_cannot_be_verified(toy, tmp_path):
    folder = _folder_copy(toy, tmp_path)
    code, result = verify(toy, str(folder), "--key", str(toy / "team.pub.pem"))
    assert (code, result["verdict"]) == (3, "cannot verify")
    assert failed(result) == {"signature": "model.sig: missing, so the key cannot be checked (the model is not signed)"}

    (folder / "provenance.json").unlink()
    code, result = verify(toy, str(folder))
    assert (code, result["verdict"]) == (3, "cannot verify")
    assert failed(result) == {"provenance": "provenance.json: missing, so the files cannot be checked"}

    done = run(toy, "verify", str(folder), "--recipe", "toy.yaml")
    assert (done.returncode, done.stderr) == (2, "error: --recipe and --source are for --rebuild\n")


def test_a_smoke_report_of_another_merge(toy, tmp_path):
    folder = _folder_copy(toy, tmp_path)
    smoke = json.loads((folder / "smoke.json").read_text())
    merge_id = smoke["merge_identity"]
    smoke["merge_identity"] = "0" * 64
    (folder / "smoke.json").write_text(json.dumps(smoke))
    code, result = verify(toy, str(folder))
    assert code == 1 and failed(result) == {"smoke": f"smoke.json: merge_identity {'0' * 64}, but provenance.json has {merge_id}"}


# ---------------------------------------------------------------------------------------------
# Rebuild


def test_rebuild_is_bit_identical_and_names_a_source_whose_pin_moved(toy, tmp_path):
    code, result = verify(toy, LOCAL_REPO, "--rebuild", "--recipe", "toy.yaml")
    assert (code, result["verdict"]) == (0, "verified")
    n = len(json.loads((_folder_copy(toy, tmp_path) / "provenance.json").read_text())["files"])
    assert result["checks"][-1] == {"name": "rebuild", "status": "passed",
                                    "message": f"{n} files rebuilt bit-identical from toy.yaml and the pinned sources"}

    # A parent changed: $CHECKPOINTS now holds another ft_cos (here the untrained base).
    moved = tmp_path / "moved"
    shutil.copytree(TOY / "base", moved / "ft_cos")
    shutil.copytree(TOY / "ft_fmt", moved / "ft_fmt")
    pins = json.loads((_folder_copy(toy, tmp_path / "again") / "provenance.json").read_text())["sources"]
    code, result = verify(toy, LOCAL_REPO, "--rebuild", "--recipe", "toy.yaml", env={"CHECKPOINTS": str(moved)})
    assert (code, result["verdict"]) == (1, "mismatch")
    base = content_sha256({"model.safetensors": sha256_file(TOY / "base" / "model.safetensors")})
    assert failed(result) == {"rebuild": f"source 'cos' no longer matches its pin: provenance.json pins {pins['cos']['content_sha256']}, "
                                         f"${{CHECKPOINTS}}/ft_cos holds sha256 {base}"}

    # The same, with the folder given on the command line.
    code, result = verify(toy, LOCAL_REPO, "--rebuild", "--recipe", "toy.yaml", "--source", f"fmt={TOY / 'base'}")
    assert code == 1 and failed(result) == {"rebuild": f"source 'fmt' no longer matches its pin: provenance.json pins "
                                                       f"{pins['fmt']['content_sha256']}, {TOY / 'base'} holds sha256 {base}"}


def test_text_output_names_each_problem_on_one_line(toy, tmp_path):
    folder = _folder_copy(toy, tmp_path)
    listed = json.loads((folder / "provenance.json").read_text())["files"]["config.json"]["sha256"]
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    (folder / "notes [draft].txt").write_text("x")
    done = run(toy, "verify", str(folder))
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[-3:] == [
        f"failed: config.json: sha256 {sha256_file(folder / 'config.json')}, but provenance.json lists {listed}",
        "failed: notes [draft].txt: not a published file (not in provenance.json)",
        f"{folder}: mismatch",
    ]


def test_rebuild_reads_the_published_recipe_yaml(toy, tmp_path):
    folder = _folder_copy(toy, tmp_path)
    # As published, recipe.yaml names each local source by a variable a rebuilder sets.
    code, result = verify(toy, str(folder), "--rebuild")
    assert code == 3 and failed(result)["rebuild"].endswith(
        "environment variable REGISTRY_SOURCE_FMT is not set; export REGISTRY_SOURCE_FMT=/path/to/the/folder it stands for")
    (folder / "recipe.yaml").unlink()
    code, result = verify(toy, str(folder), "--rebuild")
    assert (code, result["verdict"]) == (3, "cannot verify")
    assert failed(result) == {"rebuild": "recipe.yaml: not published with this model; pass --recipe FILE to rebuild from one"}

    # Published beside the model, its sources named by environment variables (set here), it is what a rebuild reads.
    shutil.copyfile(toy / "toy.yaml", folder / "recipe.yaml")
    code, result = verify(toy, str(folder), "--rebuild")
    assert (code, result["verdict"]) == (0, "verified")
    assert result["checks"][-1]["message"].endswith("files rebuilt bit-identical from recipe.yaml and the pinned sources")

    # A source it cannot find is named: the rebuild cannot be made, which is not a mismatch.
    done = run(toy, "verify", str(folder), "--rebuild", "--format", "json", env={"CHECKPOINTS": ""})
    assert done.returncode == 3
    [check] = [c for c in json.loads(done.stdout)["checks"] if c["name"] == "rebuild"]
    fix = "environment variable CHECKPOINTS is empty; export CHECKPOINTS=/path/to/the/folder it stands for"
    assert check == {"name": "rebuild", "status": "unverifiable",
                     "message": f"{folder / 'recipe.yaml'}:10:12: sources.cos.model: {fix}; {folder / 'recipe.yaml'}:13:12: sources.fmt.model: {fix}"}

    # A published recipe that does not validate cannot be rebuilt from; its problem is named.
    (folder / "recipe.yaml").write_text((toy / "toy.yaml").read_text().replace("merge_method: linear", "merge_method: lineer"))
    code, result = verify(toy, str(folder), "--rebuild")
    assert code == 3 and failed(result)["rebuild"].startswith(f"{folder / 'recipe.yaml'}:17:17: merge.merge_method: ")


def test_a_sigstore_identity_needs_the_network(toy, tmp_path):
    folder = _folder_copy(toy, tmp_path)
    (folder / "model.sig").write_bytes(sign(folder, toy / "team.key.pem"))
    # No network: every request goes to a closed port, and no trust root is cached in this home.
    offline = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "", "HOME": str(tmp_path),
               "XDG_CACHE_HOME": str(tmp_path / "cache"), "XDG_DATA_HOME": str(tmp_path / "data")}
    code, result = verify(toy, str(folder), "--identity", "release@example.org", env=offline)
    assert (code, result["verdict"]) == (3, "cannot verify")
    message = failed(result)["signature"]
    assert message.startswith("model.sig: a Sigstore signature needs the network to check, and it could not be reached (")

    done = run(toy, "verify", str(folder), "--identity", "release@example.org", "--key", str(toy / "team.pub.pem"))
    assert (done.returncode, done.stderr) == (2, "error: --key and --identity check two kinds of signature; pass one of them\n")


def test_rebuild_reads_hub_sources_at_their_pinned_commits(hub_server, hub_api, toy, tmp_path):
    for name in ("ft_cos", "ft_fmt"):
        hub_api.create_repo(f"{HUB_ORG}/toy-{name}")
        hub_api.upload_folder(folder_path=str(TOY / name), repo_id=f"{HUB_ORG}/toy-{name}")
    text = (toy / "hub.yaml").read_text().replace("${CHECKPOINTS}/ft_", f"{HUB_ORG}/toy-ft_")
    (tmp_path / "hub-sources.yaml").write_text(text.replace(HUB_REPO, f"{HUB_ORG}/toy-from-hub"))
    env = hub_server.client_env(HUB_TOKEN)
    done = run(toy, "publish", str(tmp_path / "hub-sources.yaml"), "--target", "hf", "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    pinned = hub_api.model_info(f"{HUB_ORG}/toy-ft_cos").sha

    # The parent's main moves on: a rebuild still reads the commit the merge read.
    moved = hub_api.upload_folder(folder_path=str(TOY / "base"), repo_id=f"{HUB_ORG}/toy-ft_cos").oid
    target = f"hf:{HUB_ORG}/toy-from-hub"
    code, result = verify(toy, target, "--rebuild", "--recipe", str(tmp_path / "hub-sources.yaml"), env=env)
    assert (code, result["verdict"]) == (0, "verified"), result
    assert statuses(result)["rebuild"] == "passed"

    # A local folder in its place is another pin, named as such.
    code, result = verify(toy, target, "--rebuild", "--recipe", str(tmp_path / "hub-sources.yaml"), "--source", f"cos={TOY / 'ft_cos'}",
                          env=env)
    cos = content_sha256({"model.safetensors": sha256_file(TOY / "ft_cos" / "model.safetensors")})
    assert code == 1 and failed(result) == {"rebuild": f"source 'cos' no longer matches its pin: provenance.json pins "
                                                       f"{HUB_ORG}/toy-ft_cos@{pinned}, {TOY / 'ft_cos'} holds sha256 {cos}"}
    assert moved != pinned


def test_an_eval_report_must_belong_to_the_merge(toy, tmp_path):
    from registry.reports import Eval, Provenance, read, write

    folder = _folder_copy(toy, tmp_path)
    merge_id = read(Provenance, folder).merge_identity
    report = Eval(eval_identity="e" * 64, merge_identity=merge_id, evaluator="lm-eval", evaluator_version="0.4.9",
                  config_sha256="c" * 64, device="cpu", tasks={}, passed=True)
    write(report, folder)
    code, result = verify(toy, str(folder))
    assert (code, result["verdict"]) == (0, "verified")
    assert [c for c in result["checks"] if c["name"] == "eval"] == [
        {"name": "eval", "status": "passed", "message": "eval.json: lm-eval 0.4.9, no gate, for this merge"}]

    write(report.model_copy(update={"merge_identity": "f" * 64}), folder)
    code, result = verify(toy, str(folder))
    assert (code, failed(result)) == (1, {"eval": f"eval.json: merge_identity {'f' * 64}, but provenance.json has {merge_id}"})

    (folder / "eval.json").write_text("{}")
    code, result = verify(toy, str(folder))
    assert (code, failed(result)) == (1, {"eval": f"{folder / 'eval.json'}: unknown eval.json format null (this registry reads format 1)"})
