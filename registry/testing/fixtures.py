"""pytest fixtures that start the local Hub (`registry.testing.hub`) and point huggingface_hub at it.

Load them with ``pytest_plugins = ["registry.testing.fixtures"]`` in a conftest.py, then:

- ``hub_server``: a `HubServer` on 127.0.0.1 and a free port for one test, storing repos under tmp_path.
  While it runs, huggingface_hub in this process (``HfApi()``, ``hf_hub_download``, transformers'
  ``from_pretrained``) talks to it, with xet off, a scratch cache and no token unless a test sets one.
  Users: ``HUB_USER`` (token ``HUB_TOKEN``, member of the ``HUB_ORG`` organisation) and ``OTHER_USER``
  (token ``OTHER_TOKEN``). ``LIMITED_TOKENS`` name tokens that may read but not write to ``HUB_ORG``:
  a read token and a fine-grained token of ``HUB_USER`` (the latter writes to ``HUB_USER``'s own repos
  only), and write tokens of org members with the "read" role; ``ORG_WRITERS`` tokens of members whose
  role ("write", "contributor", "admin") lets them create repos there. A subprocess gets the same view with
  ``env={**os.environ, **hub_server.client_env(HUB_TOKEN)}``.
- ``hub_api``: an ``HfApi`` for that server authenticated as ``HUB_USER``; ``hub_client(server, token)``
  builds one for another token (``False`` for anonymous).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pytest

from registry.testing.hub import HubServer, Token

if TYPE_CHECKING:
    from huggingface_hub import HfApi

HUB_USER = "alice"
HUB_TOKEN = "hf_alice_test_token"
HUB_ORG = "registry-team"
OTHER_USER = "bob"
OTHER_TOKEN = "hf_bob_test_token"
READ_TOKEN = "hf_alice_read_token"
SCOPED_TOKEN = "hf_alice_scoped_token"
ORG_READER_TOKEN = "hf_carol_test_token"
# Tokens that may not create or write repos in HUB_ORG, by kind.
LIMITED_TOKENS = {
    "read token": READ_TOKEN,
    "fine-grained token scoped to the user": SCOPED_TOKEN,
    "org member with the read role": ORG_READER_TOKEN,
}
# Tokens of HUB_ORG members whose role lets them create repos there, by role.
ORG_WRITERS = {"write": HUB_TOKEN, "contributor": "hf_dave_test_token", "admin": "hf_erin_test_token"}


def point_client_at(server: HubServer, monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Point huggingface_hub in this process, and subprocesses inheriting os.environ, at `server`."""
    from huggingface_hub import constants

    # These constants are computed from the environment when huggingface_hub is imported, and the download
    # code (hf_hub_url, hence transformers) and the xet switch read them, not the environment, at call time.
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    # A scratch cache and token file: nothing from the developer's machine leaks in or out.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    for name, value in server.client_env(home=home).items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)


def hub_client(server: HubServer, token: str | Literal[False] = HUB_TOKEN) -> HfApi:
    """An HfApi talking to `server` with `token` (False: anonymous)."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=server.endpoint, token=token)


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A local Hub for one test, with huggingface_hub in this process pointed at it."""
    from huggingface_hub.utils import close_session

    server = HubServer(
        tmp_path / "hub",
        tokens={
            HUB_TOKEN: HUB_USER, OTHER_TOKEN: OTHER_USER,
            READ_TOKEN: Token(HUB_USER, "read"),
            SCOPED_TOKEN: Token(HUB_USER, "fineGrained", {HUB_USER: ("repo.content.read", "repo.write")}),
            ORG_READER_TOKEN: "carol", ORG_WRITERS["contributor"]: "dave", ORG_WRITERS["admin"]: "erin",
        },
        orgs={HUB_ORG: {HUB_USER: "write", "carol": "read", "dave": "contributor", "erin": "admin"}},
    )
    with server:
        point_client_at(server, monkeypatch, tmp_path / "hf-home")
        yield server
    # The client's shared connection pool would keep sockets to this (now closed) server.
    close_session()
    assert not server.errors, "the test Hub failed on a request:\n" + "\n".join(server.errors)


@pytest.fixture
def hub_api(hub_server: HubServer) -> HfApi:
    """An HfApi for `hub_server`, authenticated as HUB_USER."""
    return hub_client(hub_server)
