"""The local Hub server, exercised by the real huggingface_hub client over real HTTP."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import httpx2
import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError

from registry.testing.fixtures import (
    HUB_ORG,
    HUB_TOKEN,
    HUB_USER,
    ORG_READER_TOKEN,
    ORG_WRITERS,
    OTHER_TOKEN,
    READ_TOKEN,
    SCOPED_TOKEN,
    hub_client,
)
from registry.testing.hub import LFS_THRESHOLD, HubServer

REPO = f"{HUB_USER}/tiny-merge"
COMMIT = rf"^POST /api/models/{REPO}/commit/"
PUT = r"^PUT /lfs-upload/"
CARD = """---
license: mit
base_model: [org/parent-a, org/parent-b]
base_model_relation: merge
tags: [merge]
---
# Tiny
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_safetensors(path: Path, floats: int) -> None:
    """A valid safetensors file holding one float32 vector, written byte by byte."""
    header = json.dumps({"weight": {"dtype": "F32", "shape": [floats], "data_offsets": [0, 4 * floats]}}).encode()
    header += b" " * (-len(header) % 8)
    data = (bytes(range(256)) * (4 * floats // 256 + 1))[: 4 * floats]
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A folder with a card, a small text file and a safetensors file over the 10 MB LFS threshold."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text(CARD)
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    write_safetensors(folder / "model.safetensors", floats=3 * 1024 * 1024)
    assert (folder / "model.safetensors").stat().st_size > LFS_THRESHOLD
    return folder


def protocol(server: HubServer) -> list[str]:
    """The requests logged, minus the client's once-per-process agent registry fetch, upload tickets elided."""
    return [
        re.sub(r"(/lfs-upload/\w+)/[\w-]+", r"\1/<ticket>", f"{r.line} {r.status}")
        for r in server.requests
        if r.path != "/api/agent-harnesses"
    ]


def raw(server: HubServer, method: str, path: str, body: Any = None, token: str | None = HUB_TOKEN) -> tuple[int, Any]:
    """A request sent without huggingface_hub: (status, decoded JSON or raw bytes)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    url = path if path.startswith("http") else server.endpoint + path
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request) as response:
            status, content = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, content = err.code, err.read()
    try:
        return status, json.loads(content)
    except ValueError:
        return status, content


def test_upload_folder_speaks_the_hub_protocol_and_skips_unchanged_files(
    hub_server: HubServer, hub_api: HfApi, model_dir: Path
) -> None:
    url = hub_api.create_repo(REPO)
    assert (url.repo_id, url.endpoint) == (REPO, hub_server.endpoint)
    weights_sha = sha256(model_dir / "model.safetensors")

    first = hub_api.upload_folder(repo_id=REPO, folder_path=model_dir, commit_message="Publish")

    assert protocol(hub_server) == [
        "POST /api/repos/create 200",
        # README metadata is validated twice: when the folder is listed, then when the commit is prepared.
        "POST /api/validate-yaml 200",
        "POST /api/validate-yaml 200",
        f"POST /api/models/{REPO}/preupload/main 200",
        f"POST /{REPO}.git/info/lfs/objects/batch 200",
        f"PUT /lfs-upload/{weights_sha}/<ticket> 200",
        f"POST /{REPO}.git/info/lfs/objects/verify 200",
        f"POST /api/models/{REPO}/commit/main 200",
    ]
    # The weights went once, in the LFS upload; the commit carried the small files and the pointers.
    assert hub_server.bytes_received(r"^PUT /lfs-upload/") == (model_dir / "model.safetensors").stat().st_size
    assert 0 < hub_server.bytes_received(r"/commit/") < (model_dir / "model.safetensors").stat().st_size
    info = hub_api.model_info(REPO, files_metadata=True)
    assert info.sha == first.oid and re.fullmatch(r"[0-9a-f]{40}", info.sha)
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert sorted(siblings) == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    weights = siblings["model.safetensors"]
    assert weights.lfs is not None and weights.lfs.sha256 == weights_sha
    assert weights.size == weights.lfs.size == (model_dir / "model.safetensors").stat().st_size
    assert siblings["config.json"].lfs is None  # small text stays a regular git file
    assert siblings["config.json"].blob_id == hashlib.sha1(
        b"blob %d\0" % len(raw_config := (model_dir / "config.json").read_bytes()) + raw_config
    ).hexdigest()
    assert info.card_data is not None and info.card_data.base_model == ["org/parent-a", "org/parent-b"]
    assert info.tags == [
        "merge", "qwen2", "safetensors", "base_model:org/parent-a", "base_model:merge:org/parent-a",
        "base_model:org/parent-b", "base_model:merge:org/parent-b", "license:mit",
    ]
    assert (info.private, info.author) == (False, HUB_USER)
    assert info.config == {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}

    hub_server.clear_requests()
    again = hub_api.upload_folder(repo_id=REPO, folder_path=model_dir, commit_message="Publish again")

    # Preupload reports every remote oid; the client then drops unchanged files and, with nothing left,
    # sends no commit and returns the current head. The LFS batch is still asked, and answers "present".
    assert again.oid == first.oid
    assert protocol(hub_server) == [
        "POST /api/validate-yaml 200",
        "POST /api/validate-yaml 200",
        f"POST /api/models/{REPO}/preupload/main 200",
        f"POST /{REPO}.git/info/lfs/objects/batch 200",
        f"GET /api/models/{REPO}/revision/main 200",
    ]
    assert hub_server.bytes_received(r"^PUT ") == hub_server.bytes_received(r"/commit/") == 0
    assert [c.title for c in hub_api.list_repo_commits(REPO)] == ["Publish", "initial commit"]


def test_downloads_serve_every_revision(hub_server: HubServer, hub_api: HfApi, model_dir: Path, tmp_path: Path) -> None:
    hub_api.create_repo(REPO)
    first = hub_api.upload_folder(repo_id=REPO, folder_path=model_dir)
    second = hub_api.upload_file(repo_id=REPO, path_or_fileobj=b'{"model_type": "qwen2"}', path_in_repo="config.json")

    # No endpoint argument: the fixture pointed the download code itself at the server.
    weights = hf_hub_download(REPO, "model.safetensors")
    assert Path(weights).read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert Path(hf_hub_download(REPO, "config.json")).read_bytes() == b'{"model_type": "qwen2"}'
    old = hf_hub_download(REPO, "config.json", revision=first.oid)
    assert Path(old).read_bytes() == (model_dir / "config.json").read_bytes()
    assert f"/snapshots/{second.oid}/" in weights and f"/snapshots/{first.oid}/" in old

    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.json")
    ranged = httpx2.get(f"{hub_server.endpoint}/{REPO}/resolve/main/config.json", headers={"Range": "bytes=1-5"})
    assert (ranged.status_code, ranged.content, ranged.headers["Content-Range"]) == (206, b'"mode', "bytes 1-5/23")


def test_tree_listing_and_paths(hub_server: HubServer, hub_api: HfApi, tmp_path: Path) -> None:
    hub_api.create_repo(REPO)
    folder = tmp_path / "tree"
    (folder / "sub" / "deep").mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    (folder / "sub" / "b.txt").write_text("b")
    (folder / "sub" / "deep" / "c.txt").write_text("c")
    hub_api.upload_folder(repo_id=REPO, folder_path=folder)

    top = hub_api.list_repo_tree(REPO)
    assert [(type(e).__name__, e.path) for e in top] == [
        ("RepoFolder", "sub"), ("RepoFile", ".gitattributes"), ("RepoFile", "a.txt")
    ]
    assert [e.path for e in hub_api.list_repo_tree(REPO, path_in_repo="sub", recursive=True)] == [
        "sub/deep", "sub/b.txt", "sub/deep/c.txt"
    ]
    assert hub_api.list_repo_files(REPO) == [".gitattributes", "a.txt", "sub/b.txt", "sub/deep/c.txt"]
    assert [e.path for e in hub_api.get_paths_info(REPO, ["a.txt", "sub", "nope"])] == ["a.txt", "sub"]

    hub_api.delete_folder("sub/deep", repo_id=REPO)
    assert hub_api.list_repo_files(REPO) == [".gitattributes", "a.txt", "sub/b.txt"]
    with pytest.raises(RemoteEntryNotFoundError):
        hub_api.delete_file("nope.txt", repo_id=REPO)


def test_pull_requests_branches_and_tags(hub_server: HubServer, hub_api: HfApi) -> None:
    hub_api.create_repo(REPO)
    base = hub_api.upload_file(repo_id=REPO, path_or_fileobj=b"v1", path_in_repo="notes.txt")

    pr = hub_api.upload_file(repo_id=REPO, path_or_fileobj=b"v2", path_in_repo="notes.txt", create_pr=True)
    assert (pr.pr_revision, pr.pr_num, pr.pr_url) == ("refs/pr/1", 1, f"{hub_server.endpoint}/{REPO}/discussions/1")
    assert hub_server.find(COMMIT)[-1].query == {"create_pr": ["1"]}
    assert Path(hf_hub_download(REPO, "notes.txt", revision="refs/pr/1")).read_bytes() == b"v2"
    assert hub_api.model_info(REPO).sha == base.oid  # main did not move

    hub_api.create_branch(REPO, branch="dev")
    with pytest.raises(HfHubHTTPError) as exists:
        hub_api.create_branch(REPO, branch="dev")
    assert exists.value.response.status_code == 409
    hub_api.create_branch(REPO, branch="dev", exist_ok=True)
    on_dev = hub_api.upload_file(repo_id=REPO, path_or_fileobj=b"dev", path_in_repo="notes.txt", revision="dev")
    hub_api.create_tag(REPO, tag="v1.0", revision=base.oid)

    refs = hub_api.list_repo_refs(REPO, include_pull_requests=True)
    assert {b.name: b.target_commit for b in refs.branches} == {"dev": on_dev.oid, "main": base.oid}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1.0": base.oid}
    assert [p.ref for p in refs.pull_requests or []] == ["refs/pr/1"]
    assert Path(hf_hub_download(REPO, "notes.txt", revision="main")).read_bytes() == b"v1"
    assert Path(hf_hub_download(REPO, "notes.txt", revision="dev")).read_bytes() == b"dev"
    assert hub_api.model_info(REPO, revision="v1.0").sha == base.oid

    hub_api.delete_branch(REPO, branch="dev")
    hub_api.delete_tag(REPO, tag="v1.0")
    refs = hub_api.list_repo_refs(REPO)
    assert ([b.name for b in refs.branches], refs.tags) == (["main"], [])


def test_stale_parent_commit_is_refused_with_412(hub_server: HubServer, hub_api: HfApi) -> None:
    hub_api.create_repo(REPO)
    parent = hub_api.model_info(REPO).sha
    hub_api.upload_file(repo_id=REPO, path_or_fileobj=b"first", path_in_repo="a.txt", parent_commit=parent)

    with pytest.raises(HfHubHTTPError) as stale:
        hub_api.upload_file(repo_id=REPO, path_or_fileobj=b"second", path_in_repo="b.txt", parent_commit=parent)

    assert stale.value.response.status_code == 412
    assert hub_api.list_repo_files(REPO) == [".gitattributes", "a.txt"]


def test_repo_creation_ownership_and_deletion(hub_server: HubServer, hub_api: HfApi) -> None:
    hub_api.create_repo(REPO)
    with pytest.raises(HfHubHTTPError) as exists:
        hub_api.create_repo(REPO)
    assert exists.value.response.status_code == 409
    assert hub_api.create_repo(REPO, exist_ok=True).repo_id == REPO

    bob = hub_client(hub_server, OTHER_TOKEN)
    # bob may not create under alice's name (403), but exist_ok accepts a repo he can see.
    assert bob.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as forbidden:
        bob.upload_file(repo_id=REPO, path_or_fileobj=b"x", path_in_repo="x.txt")
    assert forbidden.value.response.status_code == 403
    assert hub_api.create_repo(f"{HUB_ORG}/shared").repo_id == f"{HUB_ORG}/shared"  # alice is a member
    with pytest.raises(HfHubHTTPError) as not_member:
        bob.create_repo(f"{HUB_ORG}/other")
    assert not_member.value.response.status_code == 403

    hub_api.delete_repo(REPO)
    with pytest.raises(RepositoryNotFoundError):
        hub_api.model_info(REPO)
    hub_api.delete_repo(REPO, missing_ok=True)


def test_private_repos_are_invisible_without_the_owners_token(hub_server: HubServer, hub_api: HfApi) -> None:
    hub_api.create_repo(REPO, private=True)
    hub_api.upload_file(repo_id=REPO, path_or_fileobj=b"secret", path_in_repo="notes.txt")
    anonymous, bob = hub_client(hub_server, False), hub_client(hub_server, OTHER_TOKEN)

    with pytest.raises(RepositoryNotFoundError) as anon:
        anonymous.model_info(REPO)
    assert anon.value.response.status_code == 401  # the Hub's answer to anonymous callers
    with pytest.raises(RepositoryNotFoundError) as other:
        bob.model_info(REPO)
    assert other.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "notes.txt")
    assert [m.id for m in anonymous.list_models(author=HUB_USER)] == []

    assert hub_api.model_info(REPO).private is True
    assert [m.id for m in hub_api.list_models(author=HUB_USER)] == [REPO]
    assert Path(hf_hub_download(REPO, "notes.txt", token=HUB_TOKEN)).read_bytes() == b"secret"


def test_whoami_and_invalid_tokens(hub_server: HubServer, hub_api: HfApi) -> None:
    me = hub_api.whoami()
    assert (me["name"], [org["name"] for org in me["orgs"]]) == (HUB_USER, [HUB_ORG])
    with pytest.raises(HfHubHTTPError) as invalid:
        hub_client(hub_server, "hf_not_a_token").whoami()
    assert invalid.value.response.status_code == 401


def test_whoami_reports_token_roles_fine_grained_scopes_and_org_roles(hub_server: HubServer) -> None:
    def whoami(token: str) -> tuple[Any, ...]:
        me = hub_client(hub_server, token).whoami()
        access = me["auth"]["accessToken"]
        return me["name"], {o["name"]: o["roleInOrg"] for o in me["orgs"]}, access["role"], access.get("fineGrained")

    assert whoami(HUB_TOKEN) == (HUB_USER, {HUB_ORG: "write"}, "write", None)
    assert whoami(READ_TOKEN) == (HUB_USER, {HUB_ORG: "write"}, "read", None)
    name, orgs, role, fine = whoami(SCOPED_TOKEN)
    assert (name, orgs, role) == (HUB_USER, {HUB_ORG: "write"}, "fineGrained")
    assert fine["global"] == [] and [(s["entity"]["type"], s["entity"]["name"], s["permissions"]) for s in fine["scoped"]] == [
        ("user", HUB_USER, ["repo.content.read", "repo.write"])
    ]
    assert whoami(ORG_READER_TOKEN) == ("carol", {HUB_ORG: "read"}, "write", None)
    assert whoami(ORG_WRITERS["contributor"]) == ("dave", {HUB_ORG: "contributor"}, "write", None)
    assert whoami(ORG_WRITERS["admin"]) == ("erin", {HUB_ORG: "admin"}, "write", None)


def test_writes_need_a_token_and_a_role_that_allow_them(hub_server: HubServer, hub_api: HfApi) -> None:
    org_repo = f"{HUB_ORG}/shared"
    hub_api.create_repo(org_repo, private=True)

    def status(token: str, call: str, repo_id: str) -> int:
        api = hub_client(hub_server, token)
        try:
            if call == "create":
                api.create_repo(repo_id)
            elif call == "commit":
                api.upload_file(path_or_fileobj=b"x", path_in_repo=f"{token}.txt", repo_id=repo_id)
            else:
                api.model_info(repo_id)
        except HfHubHTTPError as exc:
            return exc.response.status_code
        return 200

    # A read token reads everything its user may read and writes nothing, not even its user's own repos.
    assert [status(READ_TOKEN, c, r) for c, r in [("read", org_repo), ("create", f"{HUB_USER}/mine"),
                                                  ("commit", org_repo)]] == [200, 403, 403]
    # A fine-grained token writes where it is scoped (the user's namespace), nowhere else; unscoped
    # for reading the org, its private repos are invisible to it.
    assert [status(SCOPED_TOKEN, c, r) for c, r in [("create", f"{HUB_USER}/scoped"), ("commit", f"{HUB_USER}/scoped"),
                                                    ("create", f"{HUB_ORG}/scoped"), ("commit", org_repo)]] == [200, 200, 403, 404]
    # Org roles: read reads; contributor creates and writes its own repos only; write and admin write all.
    assert [status(ORG_READER_TOKEN, c, r) for c, r in [("read", org_repo), ("create", f"{HUB_ORG}/carol"),
                                                        ("commit", org_repo)]] == [200, 403, 403]
    contributor = ORG_WRITERS["contributor"]
    assert [status(contributor, c, r) for c, r in [("create", f"{HUB_ORG}/dave"), ("commit", f"{HUB_ORG}/dave"),
                                                   ("commit", org_repo)]] == [200, 200, 403]
    assert [status(ORG_WRITERS["admin"], c, r) for c, r in [("create", f"{HUB_ORG}/erin"), ("commit", org_repo)]] == [200, 200]
    assert status(OTHER_TOKEN, "read", org_repo) == 404
    assert hub_api.list_repo_files(org_repo) == [".gitattributes", f"{ORG_WRITERS['admin']}.txt"]


def test_list_models_by_author_tag_and_search(hub_server: HubServer, hub_api: HfApi) -> None:
    for name, tags in [("merge-a", "[merge]"), ("merge-b", "[merge, qwen]"), ("other", "[base]")]:
        hub_api.create_repo(f"{HUB_USER}/{name}")
        card = f"---\ntags: {tags}\n---\n".encode()
        hub_api.upload_file(repo_id=f"{HUB_USER}/{name}", path_or_fileobj=card, path_in_repo="README.md")
    hub_client(hub_server, OTHER_TOKEN).create_repo("bob/merge-c")

    def ids(**kwargs: Any) -> list[str]:
        return [m.id for m in hub_api.list_models(**kwargs)]

    assert ids(author=HUB_USER) == ["alice/merge-a", "alice/merge-b", "alice/other"]
    assert ids(filter="merge") == ["alice/merge-a", "alice/merge-b"]
    assert ids(filter=["merge", "qwen"]) == ["alice/merge-b"]
    assert ids(search="merge") == ["alice/merge-a", "alice/merge-b", "bob/merge-c"]
    assert [m.card_data.tags for m in hub_api.list_models(author=HUB_USER, cardData=True)] == [
        ["merge"], ["merge", "qwen"], ["base"]
    ]


def test_invalid_card_metadata_is_refused_before_any_upload(hub_server: HubServer, hub_api: HfApi) -> None:
    hub_api.create_repo(REPO)
    with pytest.raises(ValueError, match="base_model"):
        hub_api.upload_file(repo_id=REPO, path_or_fileobj=b"---\nbase_model: {a: 1}\n---\n", path_in_repo="README.md")
    assert hub_server.count(r"/preupload/|/commit/") == 0


def test_preupload_chooses_lfs_like_the_hub(hub_server: HubServer, hub_api: HfApi) -> None:
    hub_api.create_repo(REPO)
    readme = b"---\nlicense: mit\n---\n"
    hub_api.upload_file(repo_id=REPO, path_or_fileobj=readme, path_in_repo="README.md")

    def entry(path: str, size: int, sample: bytes) -> dict[str, Any]:
        return {"path": path, "size": size, "sample": base64.b64encode(sample).decode()}

    status, answer = raw(hub_server, "POST", f"/api/models/{REPO}/preupload/main", {"files": [
        entry("README.md", len(readme), readme),
        entry("notes.txt", 100, b"plain text"),
        entry("big.txt", LFS_THRESHOLD + 1, b"plain text"),
        entry("blob.dat", 100, b"\x00\x01binary"),
        entry("weights.safetensors", 100, b"{}"),
        entry("logs/x.log", 10, b"log"),
    ], "gitIgnore": "logs/\n"})

    assert status == 200
    assert [(f["path"], f["uploadMode"], f["shouldIgnore"], f.get("oid")) for f in answer["files"]] == [
        ("README.md", "regular", False, hashlib.sha1(b"blob %d\0" % len(readme) + readme).hexdigest()),
        ("notes.txt", "regular", False, None),
        ("big.txt", "lfs", False, None),
        ("blob.dat", "lfs", False, None),
        ("weights.safetensors", "lfs", False, None),  # by the .gitattributes the Hub commits first
        ("logs/x.log", "regular", True, None),
    ]


def test_lfs_upload_with_a_wrong_sha256_is_rejected(hub_server: HubServer, hub_api: HfApi) -> None:
    hub_api.create_repo(REPO)
    good = b"good content"
    oid = hashlib.sha256(good).hexdigest()
    batch = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(good)}]}

    status, answer = raw(hub_server, "POST", f"/{REPO}.git/info/lfs/objects/batch", batch)
    assert status == 200
    actions = answer["objects"][0]["actions"]
    status, error = raw(hub_server, "PUT", actions["upload"]["href"], b"evil content", token=None)
    assert status == 400 and "does not match" in error["error"]
    assert raw(hub_server, "POST", actions["verify"]["href"], {"oid": oid, "size": len(good)})[0] == 404
    assert hub_server.lfs_objects() == set()
    commit = b"\n".join(json.dumps(line).encode() for line in [
        {"key": "header", "value": {"summary": "add"}},
        {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid, "size": len(good)}},
    ])
    assert raw(hub_server, "POST", f"/api/models/{REPO}/commit/main", commit)[0] == 400

    assert raw(hub_server, "PUT", actions["upload"]["href"], good, token=None)[0] == 200
    assert raw(hub_server, "POST", actions["verify"]["href"], {"oid": oid, "size": len(good)})[0] == 200
    status, answer = raw(hub_server, "POST", f"/{REPO}.git/info/lfs/objects/batch", batch)
    assert "actions" not in answer["objects"][0]  # present: nothing to upload


def test_rate_limited_commit_is_not_retried_but_preupload_is(hub_server: HubServer, hub_api: HfApi) -> None:
    hub_api.create_repo(REPO)
    hub_server.inject(COMMIT, 429, retry_after=0)
    with pytest.raises(HfHubHTTPError) as limited:
        hub_api.upload_file(repo_id=REPO, path_or_fileobj=b"a", path_in_repo="a.txt")
    # The client posts a commit once: retrying could commit twice. Its caller has to retry.
    assert limited.value.response.status_code == 429
    assert [r.status for r in hub_server.find(COMMIT)] == [429]

    # Preupload goes through http_backoff, which honours Retry-After (plus one second) and retries.
    hub_server.inject(r"/preupload/", 429, retry_after=0)
    hub_api.upload_file(repo_id=REPO, path_or_fileobj=b"a", path_in_repo="a.txt")
    assert [r.status for r in hub_server.find(r"/preupload/")] == [200, 429, 200]
    assert [r.status for r in hub_server.find(COMMIT)] == [429, 200]


def test_dropped_connections(hub_server: HubServer, hub_api: HfApi, model_dir: Path) -> None:
    hub_api.create_repo(REPO)
    hub_server.inject(COMMIT, "drop")
    with pytest.raises(httpx2.RemoteProtocolError):
        hub_api.upload_file(repo_id=REPO, path_or_fileobj=b"a", path_in_repo="a.txt")
    assert hub_api.list_repo_files(REPO) == [".gitattributes"]

    # An LFS PUT cut halfway is retried by the client's backoff, and the retry completes the upload.
    hub_server.inject(PUT, "drop")
    hub_api.upload_file(repo_id=REPO, path_or_fileobj=model_dir / "model.safetensors", path_in_repo="w.safetensors")
    assert [(r.status, r.fault) for r in hub_server.find(PUT)] == [(None, "drop"), (200, None)]
    weights = hub_api.model_info(REPO, files_metadata=True).siblings or []
    assert {s.rfilename: s.lfs and s.lfs.sha256 for s in weights}["w.safetensors"] == sha256(
        model_dir / "model.safetensors"
    )


def test_transformers_loads_a_model_published_to_the_server(
    hub_server: HubServer, hub_api: HfApi, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    original = Qwen2ForCausalLM(config).eval()
    original.save_pretrained(tmp_path / "tiny")
    hub_api.create_repo(REPO)
    published = hub_api.upload_folder(repo_id=REPO, folder_path=tmp_path / "tiny")

    loaded = AutoModelForCausalLM.from_pretrained(REPO)

    assert type(loaded) is Qwen2ForCausalLM
    expected, actual = original.state_dict(), loaded.state_dict()
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    # transformers pins the revision first (model_info), then fetches each file at that commit.
    assert hub_server.count(rf"^GET /api/models/{REPO}$") == 1
    assert hub_server.count(rf"^GET /{REPO}/resolve/{published.oid}/model\.safetensors$") == 1


def test_a_subprocess_reaches_the_server_through_its_environment(hub_server: HubServer, hub_api: HfApi) -> None:
    hub_api.create_repo(REPO)
    script = (
        "from huggingface_hub import HfApi\n"
        "api = HfApi()\n"
        "print(api.whoami()['name'])\n"
        f"api.upload_file(repo_id={REPO!r}, path_or_fileobj=b'\\0weights', path_in_repo='w.safetensors')\n"
    )
    env = {**os.environ, **hub_server.client_env(HUB_TOKEN)}

    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)

    assert (done.returncode, done.stdout) == (0, f"{HUB_USER}\n"), done.stderr
    # The weights went through the LFS batch API and a PUT: xet is off in the subprocess too.
    assert hub_server.count(PUT) == 1
    assert hub_api.list_repo_files(REPO) == [".gitattributes", "w.safetensors"]
