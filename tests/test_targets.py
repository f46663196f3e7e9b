"""Publish targets against real storage: the local directory registry and the Hub test server."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from registry.errors import PublishError
from registry.identity import card_identity
from registry.publish import Bundle, Published, bundle_files
from registry.publish.hf import HfOptions, HfTarget
from registry.publish.local import LocalTarget, list_latest, read_index
from registry.recipe import parse_recipe
from registry.reports import CheckEntry, Provenance, Smoke, read, write
from registry.testing.fixtures import (
    HUB_ORG,
    HUB_TOKEN,
    HUB_USER,
    LIMITED_TOKENS,
    ORG_READER_TOKEN,
    ORG_WRITERS,
    OTHER_TOKEN,
    READ_TOKEN,
    SCOPED_TOKEN,
    hub_client,
)

RECIPE = """\
repo_id: {repo_id}
merge:
  merge_method: linear
  models:
    - {{model: org/a, parameters: {{weight: 0.3}}}}
    - {{model: org/b, parameters: {{weight: 0.7}}}}
"""
PINS = {
    "org/a": {"kind": "hub", "repo_id": "org/a", "revision": "a" * 40, "content_sha256": None},
    "org/b": {"kind": "hub", "repo_id": "org/b", "revision": "b" * 40, "content_sha256": None},
}


def make_model(folder: Path, recipe, *, weights: bytes = b"", big: bool = False, extra: dict[str, str] | None = None) -> Path:
    """A finished model folder as merge+smoke+card leave it (contents are stand-ins); `extra`: more merged files."""
    folder.mkdir(parents=True, exist_ok=True)
    blob = weights or hashlib.sha256(recipe.sha256.encode()).digest() * 1024
    if big:
        blob = blob * 400  # > 10 MB, so the Hub client takes the LFS path
    (folder / "model.safetensors").write_bytes(blob)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    for rel, text in (extra or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    files = {
        name: {"sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest(), "size": (folder / name).stat().st_size}
        for name in ("model.safetensors", "config.json", *(extra or {}))
    }
    merge_id = hashlib.sha256(blob).hexdigest()  # stands in for the merge identity: one per weights
    write(Provenance(merge_identity=merge_id, merge_method="linear", dtype="bfloat16", sources=PINS, config_donor="org/a",
                     files=files, versions={"registry": "0.1.0"}, device="cpu"), folder)
    write(Smoke(merge_identity=merge_id, passed=True, device="cpu",
                checks=[CheckEntry(name="short", status="passed", reason="answered")]), folder)
    (folder / "README.md").write_text(
        f"---\nbase_model:\n- org/a\n- org/b\nbase_model_relation: merge\nlicense: mit\n"
        f"registry:\n  recipe_sha256: {recipe.sha256}\n  merge_identity: {merge_id}\n---\n\n# {recipe.repo_id}\n"
    )
    return folder


def make_bundle(folder: Path, recipe) -> Bundle:
    return Bundle(recipe.repo_id, recipe.sha256, PINS, bundle_files(folder), read(Provenance, folder), read(Smoke, folder),
                  (folder / "README.md").read_text())


# ---------------------------------------------------------------------------------------------
# local


def test_local_publish_is_atomic_versioned_and_idempotent(tmp_path):
    recipe = parse_recipe(RECIPE.format(repo_id="team/toy"))
    home = tmp_path / "home"
    target = LocalTarget(home)
    options = target.Options()
    bundle = make_bundle(make_model(tmp_path / "build", recipe), recipe)
    merge_id = bundle.provenance.merge_identity
    assert target.current(recipe, merge_id, options) is None

    first = target.publish(bundle, options)
    assert first.changed and first.revision.endswith("-" + recipe.sha256[:12])
    folder = Path(first.location)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors", "provenance.json", "smoke.json"]
    for rel, entry in bundle.files.items():
        assert hashlib.sha256((folder / rel).read_bytes()).hexdigest() == entry.sha256
    assert not any(p.name.startswith(".staging") for p in folder.parent.iterdir())

    assert target.current(recipe, merge_id, options) == Published(merge_id, card_identity(bundle.card), bundle.provenance, bundle.smoke)
    assert target.current(recipe, "c" * 64, options) is None  # another merge (a source moved, a weight changed)
    again = target.publish(bundle, options)
    assert (again.changed, again.location, again.revision) == (False, first.location, first.revision)
    assert len(read_index(home)["models"]) == 1
    assert [m["repo_id"] for m in list_latest(home)] == ["team/toy"]

    # Someone deletes a published file: the registry notices and publishes a fresh version.
    (folder / "model.safetensors").unlink()
    assert target.current(recipe, merge_id, options) is None
    third = target.publish(bundle, options)
    assert third.changed and third.location != first.location


# ---------------------------------------------------------------------------------------------
# hf


@pytest.fixture
def hf(hub_server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    slept: list[float] = []
    target = HfTarget(sleep=slept.append)
    target.slept = slept
    return target


def remote_state(api, repo_id, revision="main"):
    info = api.model_info(repo_id, revision=revision, files_metadata=True)
    return info.sha, sorted(s.rfilename for s in info.siblings)


def test_hf_publish_one_commit_then_nothing(hub_server, hf, tmp_path):
    from huggingface_hub.errors import RepositoryNotFoundError

    recipe = parse_recipe(RECIPE.format(repo_id=f"{HUB_ORG}/toy"))
    bundle = make_bundle(make_model(tmp_path / "build", recipe, big=True), recipe)
    options = HfOptions(private=True)

    result = hf.publish(bundle, options)
    assert result.changed and result.detail == f"tagged recipe-{recipe.sha256[:12]}"
    assert hub_server.count(r"^POST /api/models/.*/commit/") == 1
    api = hub_client(hub_server)
    info = api.model_info(recipe.repo_id, files_metadata=True)
    assert info.private and info.sha == result.revision
    assert info.card_data.to_dict()["registry"] == {"recipe_sha256": recipe.sha256, "merge_identity": bundle.provenance.merge_identity}
    lfs = {s.rfilename: s.lfs.sha256 for s in info.siblings if s.lfs}
    assert lfs == {"model.safetensors": bundle.files["model.safetensors"].sha256}
    for rel, entry in bundle.files.items():
        data = Path(api.hf_hub_download(recipe.repo_id, rel)).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry.sha256, rel
    assert [t.name for t in api.list_repo_refs(recipe.repo_id).tags] == [f"recipe-{recipe.sha256[:12]}"]
    anonymous = hub_client(hub_server, token=False)
    with pytest.raises(RepositoryNotFoundError, match=r"404|Repository Not Found|not found"):
        anonymous.model_info(recipe.repo_id)

    hub_server.clear_requests()
    merge_id = bundle.provenance.merge_identity
    assert hf.current(recipe, merge_id, options) == Published(merge_id, card_identity(bundle.card), bundle.provenance, bundle.smoke)
    assert hf.current(recipe, "c" * 64, options) is None
    again = hf.publish(bundle, options)
    assert (again.changed, again.revision) == (False, result.revision)
    assert hub_server.count(r"^POST .*/commit/") == 0
    assert hub_server.count(r"^PUT ") == 0
    assert hub_server.count(r"^POST .*/preupload/") == 0


def test_hf_create_pr_and_branch(hub_server, hf, tmp_path):
    recipe = parse_recipe(RECIPE.format(repo_id=f"{HUB_ORG}/toy"))
    bundle = make_bundle(make_model(tmp_path / "build", recipe), recipe)
    api = hub_client(hub_server)
    api.create_repo(recipe.repo_id)
    main_before = remote_state(api, recipe.repo_id)

    pr = hf.publish(bundle, HfOptions(create_pr=True))
    assert pr.revision == "refs/pr/1" and pr.detail == "pull request opened"
    assert remote_state(api, recipe.repo_id) == main_before

    branch = hf.publish(bundle, HfOptions(revision="staging"))
    assert branch.changed
    assert "README.md" in remote_state(api, recipe.repo_id, "staging")[1]
    assert remote_state(api, recipe.repo_id) == main_before


def test_hf_retries_429_and_503_honouring_retry_after(hub_server, hf, tmp_path):
    recipe = parse_recipe(RECIPE.format(repo_id=f"{HUB_ORG}/toy"))
    bundle = make_bundle(make_model(tmp_path / "build", recipe), recipe)
    hub_server.inject(r"^POST /api/models/.*/commit/", 429, retry_after=7)
    hub_server.inject(r"^GET /api/models/", 503, times=2, retry_after=3)
    result = hf.publish(bundle, HfOptions())
    assert result.changed
    assert 7.0 in hf.slept and hf.slept.count(3.0) == 2
    assert hub_server.count(r"^POST .*/commit/") == 2


def test_hf_conflict_leaves_the_repo_as_it_was(hub_server, hf, tmp_path):
    recipe = parse_recipe(RECIPE.format(repo_id=f"{HUB_ORG}/toy"))
    bundle = make_bundle(make_model(tmp_path / "build", recipe), recipe)
    api = hub_client(hub_server)
    api.create_repo(recipe.repo_id)

    class Racing(HfTarget):
        """Someone else pushes between our read of the head and our commit."""

        def plan(self, bundle, options):
            if not getattr(self, "raced", False):
                self.raced = True
                api.upload_file(path_or_fileobj=b"theirs", path_in_repo="theirs.txt", repo_id=recipe.repo_id)
            return super().plan(bundle, options)

    before = remote_state(api, recipe.repo_id)
    racer = Racing(sleep=lambda s: None)
    with pytest.raises(PublishError) as info:
        racer.publish(bundle, HfOptions())
    assert str(info.value) == (
        f"{recipe.repo_id}@main changed while publishing (someone else pushed); nothing was committed: "
        "run `registry publish` again to publish on top of it"
    )
    _sha, files = remote_state(api, recipe.repo_id)
    assert files == sorted([*before[1], "theirs.txt"])
    # A rerun publishes on top of the other push, and keeps the other person's file.
    rerun = HfTarget().publish(bundle, HfOptions())
    assert (rerun.changed, rerun.kept) == (True, ["theirs.txt"])
    assert "theirs.txt" in remote_state(api, recipe.repo_id)[1]


def test_hf_deletes_only_what_an_earlier_publish_put_there(hub_server, hf, tmp_path):
    first_recipe = parse_recipe(RECIPE.format(repo_id=f"{HUB_ORG}/toy"))
    extra = {"tokenizer.json": "{}", "extra/vocab.txt": "a\nb\n"}
    first = hf.publish(make_bundle(make_model(tmp_path / "v1", first_recipe, extra=extra), first_recipe), HfOptions())
    assert first.kept == []
    colleague = hub_client(hub_server, ORG_WRITERS["admin"])
    colleague.upload_file(path_or_fileobj=b"# notes", path_in_repo="notes.md", repo_id=first_recipe.repo_id)
    colleague.upload_file(path_or_fileobj=b"x", path_in_repo="docs/extra/usage.md", repo_id=first_recipe.repo_id)

    # The recipe changes and its merge no longer has tokenizer.json nor extra/vocab.txt.
    recipe = parse_recipe(RECIPE.format(repo_id=f"{HUB_ORG}/toy").replace("0.3", "0.4"))
    bundle = make_bundle(make_model(tmp_path / "v2", recipe), recipe)
    plan = hf.plan(bundle, HfOptions())
    assert (plan.delete, plan.kept) == (["extra/vocab.txt", "tokenizer.json"], ["docs/extra/usage.md", "notes.md"])
    hub_server.clear_requests()
    result = hf.publish(bundle, HfOptions())
    assert (result.changed, result.kept) == (True, ["docs/extra/usage.md", "notes.md"])
    assert remote_state(hub_client(hub_server), recipe.repo_id)[1] == [
        ".gitattributes", "README.md", "config.json", "docs/extra/usage.md", "model.safetensors", "notes.md",
        "provenance.json", "smoke.json",
    ]
    assert hub_server.count(r"^POST .*/commit/") == 1

    # Published again as it is: nothing to send, the other files still noted.
    again = hf.publish(bundle, HfOptions())
    assert (again.changed, again.kept) == (False, ["docs/extra/usage.md", "notes.md"])
    assert hub_server.count(r"^POST .*/commit/") == 1


def test_hf_deletes_nothing_when_the_repo_has_no_provenance(hub_server, hf, tmp_path):
    recipe = parse_recipe(RECIPE.format(repo_id=f"{HUB_ORG}/toy"))
    api = hub_client(hub_server)
    api.create_repo(recipe.repo_id)
    api.upload_file(path_or_fileobj=b"weights by hand", path_in_repo="model.bin", repo_id=recipe.repo_id)
    plan = hf.plan(make_bundle(make_model(tmp_path / "build", recipe), recipe), HfOptions())
    assert (plan.delete, plan.kept) == ([], ["model.bin"])


@pytest.mark.parametrize("kind", sorted(LIMITED_TOKENS))
def test_hf_refuses_a_token_that_cannot_write_before_anything_else(hub_server, monkeypatch, kind):
    recipe = parse_recipe(RECIPE.format(repo_id=f"{HUB_ORG}/toy"))
    monkeypatch.setenv("HF_TOKEN", LIMITED_TOKENS[kind])
    reason = {
        "read token": "it is a read-only token",
        "fine-grained token scoped to the user": f"the fine-grained token has no repo.write permission on {HUB_ORG}",
        "org member with the read role": f"carol has the read role in {HUB_ORG}",
    }[kind]
    with pytest.raises(PublishError) as info:
        HfTarget().check_access(recipe, HfOptions())
    assert str(info.value) == (
        f"the token cannot write to {HUB_ORG}: {reason}; nothing was merged or sent "
        f"(use a token with write access to {HUB_ORG}: `hf auth login` or HF_TOKEN)"
    )
    assert LIMITED_TOKENS[kind] not in str(info.value)
    assert [r.line for r in hub_server.requests if r.path != "/api/agent-harnesses"] == ["GET /api/whoami-v2"]


def test_hf_access_check_lets_every_token_that_can_write_through(hub_server, monkeypatch):
    def refusal(token, repo_id, **options):
        monkeypatch.setenv("HF_TOKEN", token)
        try:
            HfTarget().check_access(parse_recipe(RECIPE.format(repo_id=repo_id)), HfOptions(**options))
        except PublishError as exc:
            return exc.message.split(": ", 1)[1]
        return None

    for role, token in ORG_WRITERS.items():
        assert refusal(token, f"{HUB_ORG}/toy") is None, role
    assert refusal(SCOPED_TOKEN, f"{HUB_USER}/toy") is None
    assert refusal(OTHER_TOKEN, f"{HUB_ORG}/toy") == f"bob is not a member of {HUB_ORG}; nothing was merged or sent"
    assert refusal(OTHER_TOKEN, "bob/toy") is None
    # A pull request needs no write role in the namespace, but still a token that may write.
    assert refusal(ORG_READER_TOKEN, f"{HUB_ORG}/toy", create_pr=True) is None
    assert refusal(READ_TOKEN, f"{HUB_ORG}/toy", create_pr=True) == "it is a read-only token; nothing was merged or sent"


def test_hf_dropped_upload_changes_nothing_and_a_rerun_completes(hub_server, hf, tmp_path, monkeypatch):
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(http.time, "sleep", lambda s: None)  # the client's own backoff between PUT retries
    recipe = parse_recipe(RECIPE.format(repo_id=f"{HUB_ORG}/toy"))
    bundle = make_bundle(make_model(tmp_path / "build", recipe, big=True), recipe)
    api = hub_client(hub_server)
    api.create_repo(recipe.repo_id)
    before = remote_state(api, recipe.repo_id)
    hub_server.inject(r"^PUT ", "drop", times=10)
    with pytest.raises(PublishError) as dropped:
        hf.publish(bundle, HfOptions())
    # The cause in parentheses is the HTTP client's own wording for the dropped connection.
    assert re.fullmatch(r"Error while uploading 'model\.safetensors' to the Hub\. \(.+\); nothing was committed", dropped.value.message)
    assert dropped.value.hint == "run `registry publish` again; uploaded files are not re-sent"
    assert remote_state(api, recipe.repo_id) == before
    assert hub_server.count(r"^POST .*/commit/") == 0
    assert HfTarget().publish(bundle, HfOptions()).changed


def test_hf_token_errors_are_one_line_and_never_show_the_token(hub_server, tmp_path, monkeypatch):
    recipe = parse_recipe(RECIPE.format(repo_id=f"{HUB_ORG}/toy"))
    bundle = make_bundle(make_model(tmp_path / "build", recipe), recipe)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(PublishError) as missing:
        HfTarget().publish(bundle, HfOptions())
    assert str(missing.value) == "no Hub token: run `hf auth login` or set HF_TOKEN"
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_secret_value")
    with pytest.raises(PublishError) as rejected:
        HfTarget().publish(bundle, HfOptions())
    assert str(rejected.value) == "the Hub rejected the token (401): run `hf auth login` or set a valid HF_TOKEN"
    assert "hf_wrong_secret_value" not in str(rejected.value)


def test_cli_flags_override_the_targets_they_apply_to():
    from registry.errors import UsageError
    from registry.pipeline import choose_targets
    from registry.plugins import get_targets

    recipe = parse_recipe(RECIPE.format(repo_id="team/toy") + "publish:\n  - {target: hf, revision: staging}\n  - {target: local}\n",
                          targets=get_targets())
    hf, local = choose_targets(recipe, None, {"private": True, "revision": None, "create_pr": None})
    assert (hf.name, hf.options) == ("hf", HfOptions(private=True, revision="staging"))
    assert local.name == "local"
    with pytest.raises(UsageError) as info:
        choose_targets(recipe, ["local"], {"private": True, "revision": None, "create_pr": None})
    assert str(info.value) == "--private applies to none of the targets: local"


# ---------------------------------------------------------------------------------------------
# local: what a killed publish leaves, and index paths leading out of the home

KILL = """\
import os, signal, sys
from pathlib import Path
from registry.identity import card_identity
from registry.publish import Bundle, Published, bundle_files
from registry.publish.local import LocalTarget
from registry.reports import Provenance, Smoke, read

home, folder, repo_id, sha, point = sys.argv[1:]
PINS = {pins!r}
real_link, real_replace, links = os.link, os.replace, []

def link(src, dst, *args, **kwargs):
    links.append(dst)
    if point == "copying" and len(links) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_link(src, dst, *args, **kwargs)

def replace(src, dst, *args, **kwargs):
    if (point == "renaming" and Path(src).name.startswith(".staging-")) or (point == "indexing" and Path(dst).name == "index.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)

# SIGKILL at a known point of the real code: these only decide when the process dies.
os.link, os.replace = link, replace
folder = Path(folder)
bundle = Bundle(repo_id, sha, PINS, bundle_files(folder), read(Provenance, folder), read(Smoke, folder),
                (folder / "README.md").read_text())
LocalTarget(Path(home)).publish(bundle, LocalTarget.Options())
"""


def killed_publish(home: Path, folder: Path, recipe, point: str) -> None:
    """Run a local publish in a process of its own and SIGKILL it at `point`."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", KILL.format(pins=PINS), str(home), str(folder), recipe.repo_id, recipe.sha256, point],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr


def cli(args: list[str], home: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    from registry.cli import main

    monkeypatch.setenv("REGISTRY_HOME", str(home))
    with pytest.raises(SystemExit) as code:
        main(args)
    out = capsys.readouterr()
    return code.value.code, out.out, out.err


def files_under(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("point", ["copying", "renaming", "indexing"])
@pytest.mark.parametrize("then", ["list", "publish"])
def test_a_killed_local_publish_is_reconciled_by_the_next_list_or_publish(tmp_path, monkeypatch, capsys, point, then):
    recipe = parse_recipe(RECIPE.format(repo_id="team/toy"))
    home = tmp_path / "home"
    target = LocalTarget(home)
    old = target.publish(make_bundle(make_model(tmp_path / "old", recipe, weights=b"old" * 100), recipe), target.Options())
    folder = make_model(tmp_path / "build", recipe)
    killed_publish(home, folder, recipe, point)

    repo = home / "models" / "team" / "toy"
    debris = sorted(p.name for p in repo.iterdir() if p.name != old.revision) + sorted(p.name for p in home.glob(".index*"))
    if point == "indexing":
        # The version folder was renamed into place; the new index was written but not yet moved over the old one.
        assert len(debris) == 2 and _re_version(debris[0]) and debris[1].startswith(".index.json.staging-")
        assert json.loads((home / debris[1] / "index.json").read_text())["models"][-1]["version"] == debris[0]
    else:
        assert len(debris) == 1 and debris[0].startswith(".staging-")
        present = sorted(p.name for p in (repo / debris[0]).iterdir())
        expected = ["README.md", "config.json", "model.safetensors", "provenance.json", "smoke.json"]
        assert present == ([".registry-staging"] + expected[:2] if point == "copying" else [".registry-staging"] + expected)
    # The user's own folders with the same kinds of names, and a version folder that is not complete.
    for mine in (repo / ".staging-mine", home / ".index.json.staging-1"):
        mine.mkdir()
        (mine / "keep.txt").write_text("mine\n")
    broken = repo / f"20250101T000000Z-{recipe.sha256[:12]}"
    shutil.copytree(folder, broken)
    (broken / "model.safetensors").write_bytes(b"x" * (broken / "model.safetensors").stat().st_size)
    mine_before = {p: files_under(p) for p in (repo / ".staging-mine", home / ".index.json.staging-1", broken)}

    if then == "list":
        code, out, err = cli(["list", "--format", "json"], home, monkeypatch, capsys)
        assert code in (0, None)
        notes = err.splitlines()
        listed = json.loads(out)
    else:
        result = target.publish(make_bundle(folder, recipe), target.Options())
        notes = result.notes
        listed = list_latest(home)
    if point == "indexing":
        assert notes == [
            f"removed {debris[1]}: left by an interrupted index update",
            f"adopted team/toy {debris[0]} into the index: a publish was interrupted after writing it",
        ]
        assert listed[0]["version"] == debris[0]
        entry = read_index(home)["models"][-1]
        assert entry["files"] == {rel: {"sha256": f.sha256, "size": f.size} for rel, f in make_bundle(folder, recipe).files.items()}
        assert (entry["repo_id"], entry["recipe_sha256"], entry["smoke_passed"], entry["pins"]) == ("team/toy", recipe.sha256, True, PINS)
        if then == "publish":
            assert (result.changed, result.revision) == (False, debris[0])
    else:
        assert notes == [f"removed models/team/toy/{debris[0]}: left by an interrupted publish of team/toy"]
        if then == "list":
            assert listed[0]["version"] == old.revision
        else:
            assert result.changed and listed[0]["version"] == result.revision
    assert [m["version"] for m in read_index(home)["models"]][0] == old.revision
    assert broken.name not in {m["version"] for m in read_index(home)["models"]}
    assert {p: files_under(p) for p in mine_before} == mine_before
    assert not [p for p in repo.iterdir() if (p / ".registry-staging").exists()]

    # Reconciled once: the next look finds nothing to say.
    assert cli(["list"], home, monkeypatch, capsys)[2] == ""


def _re_version(name: str) -> bool:
    import re

    return re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{12}(-\d+)?", name) is not None


@pytest.mark.parametrize("path", ["../../etc", "/etc", "models/team/toy/link", "models/../..", ""])
def test_an_index_path_leading_out_of_the_home_is_never_followed(tmp_path, monkeypatch, capsys, path):
    from registry.catalog import read_local

    recipe = parse_recipe(RECIPE.format(repo_id="team/toy"))
    home = tmp_path / "reg" / "home"
    target = LocalTarget(home)
    first = target.publish(make_bundle(make_model(tmp_path / "build", recipe), recipe), target.Options())
    outside = tmp_path / "outside"
    shutil.copytree(first.location, outside)
    (outside / "README.md").write_text("---\nlicense: mit\n---\nnot the registry's\n")
    (home / "models" / "team" / "toy" / "link").symlink_to(outside)
    index = read_index(home)
    index["models"][0]["path"] = path
    (home / "index.json").write_text(json.dumps(index))

    message = (f"error: {home / 'index.json'}: team/toy {first.revision} has path {path!r}, which leads outside the "
               "registry home; it is not followed (remove or correct that entry of the index)\n")
    for command in (["show", "team/toy"], ["show", "team/toy", "--format", "json"], ["list"], ["list", "--format", "json"]):
        assert cli(command, home, monkeypatch, capsys) == (1, "", message), command
    [model] = read_local(home)
    assert (model.card, model.provenance, model.smoke) == ("", None, None)
    assert target.current(recipe, read(Provenance, tmp_path / "build").merge_identity, target.Options()) is None


@pytest.mark.parametrize("remote", [
    '{"format": 1, "recipe_sha256": "x", "sources": {}, "files": {}}',  # written by an older registry
    '{"format": 2, "merge_identity": ',  # corrupt
    None,  # another merge's provenance beside this card
])
def test_hf_a_remote_provenance_of_another_format_or_merge_is_not_current(hub_server, hf, tmp_path, remote):
    recipe = parse_recipe(RECIPE.format(repo_id=f"{HUB_ORG}/toy-format"))
    bundle = make_bundle(make_model(tmp_path / "build", recipe), recipe)
    options = HfOptions()
    hf.publish(bundle, options)
    merge_id = bundle.provenance.merge_identity
    assert hf.current(recipe, merge_id, options) is not None
    if remote is None:
        remote = bundle.provenance.model_copy(update={"merge_identity": "f" * 64}).model_dump_json()
    hub_client(hub_server).upload_file(path_or_fileobj=remote.encode(), path_in_repo="provenance.json", repo_id=recipe.repo_id)
    assert hf.current(recipe, merge_id, options) is None
