"""One table reads Hub failures: by exception type, the same for planning, publishing and the catalog."""

from __future__ import annotations

import pytest
from huggingface_hub import errors

from registry.hub_errors import describe, is_transport_error
from registry.publish.hf import HfTarget
from registry.testing.fixtures import HUB_ORG

REPO = f"{HUB_ORG}/tiny"


def failure_of(call):
    with pytest.raises(Exception) as raised:
        call()
    return raised.value


def test_real_client_failures_are_read_by_type(hub_server, hub_api, tmp_path):
    hub_api.create_repo(REPO)
    (tmp_path / "config.json").write_text("{}")
    hub_api.upload_file(path_or_fileobj=str(tmp_path / "config.json"), path_in_repo="config.json", repo_id=REPO)
    endpoint = hub_server.endpoint
    cases = {
        "missing repo": (lambda: hub_api.model_info(f"{HUB_ORG}/nothing-here"), f"{HUB_ORG}/nothing-here", None),
        "missing revision": (lambda: hub_api.model_info(REPO, revision="no-such-branch"), REPO, "no-such-branch"),
        "missing file": (lambda: hub_api.hf_hub_download(REPO, "nothing.json"), REPO, None),
    }
    found = {name: describe(failure_of(call), repo, revision, endpoint) for name, (call, repo, revision) in cases.items()}
    assert {name: (f.kind, f.message) for name, f in found.items()} == {
        "missing repo": ("no_repo", f"{HUB_ORG}/nothing-here not found on {endpoint} (a private repo needs HF_TOKEN or `hf auth login`)"),
        "missing revision": ("no_revision", f"revision 'no-such-branch' not found in {REPO}; name an existing branch, tag or commit"),
        "missing file": ("no_file", found["missing file"].message),
    }
    assert found["missing file"].message.startswith(f"{REPO} has no such file: ")
    for status, kind in ((401, "unauthorized"), (403, "forbidden"), (412, "conflict"), (429, "busy"), (503, "busy"), (400, "http")):
        hub_server.inject(rf"^GET /api/models/{REPO}", status, times=1)
        failure = describe(failure_of(lambda: hub_api.model_info(REPO)), REPO, endpoint=endpoint)
        assert (failure.kind, failure.status, failure.retryable) == (kind, status, kind == "busy"), status
    hub_server.inject(rf"^GET /api/models/{REPO}", "drop", times=1)
    dropped = describe(failure_of(lambda: hub_api.model_info(REPO)), REPO, endpoint=endpoint)
    assert (dropped.kind, dropped.retryable) == ("transport", True)
    assert dropped.message.startswith(f"the Hub at {endpoint} cannot be reached (")


def test_a_class_name_alone_is_not_a_hub_failure():
    # The publish target once recognised transport errors by class name and planning took every OSError
    # for an unreachable Hub: an unrelated error that happens to share a name was retried or misreported.
    class TransportError(Exception):
        pass

    class ConnectTimeout(Exception):
        pass

    for exc in (TransportError("disk full"), ConnectTimeout("nope"), PermissionError("cache is read-only"), KeyError("x")):
        assert describe(exc) is None and not is_transport_error(exc)

    # A subclass is recognised by its type, whatever it is called.
    class Missing(errors.RepositoryNotFoundError):
        pass

    import httpx2

    response = httpx2.Response(404, request=httpx2.Request("GET", "http://hub/api/models/o/m"))
    assert describe(Missing("gone", response=response), "o/m", endpoint="http://hub").kind == "no_repo"
    assert is_transport_error(ConnectionResetError()) and is_transport_error(TimeoutError())


def test_publish_says_what_the_table_says(hub_server):
    target = HfTarget()
    target._token = "hf_secret"
    exc = errors.OfflineModeIsEnabled("offline")
    found = describe(exc, REPO, endpoint=hub_server.endpoint)
    assert str(target._error(found, "commit")) == "cannot commit: HF_HUB_OFFLINE is set, so the Hub cannot be asked; unset HF_HUB_OFFLINE"
