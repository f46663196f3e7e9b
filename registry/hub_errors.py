"""What a failed Hub call means: one table from huggingface_hub's exception types to a kind and a message.

Exceptions are recognised by type (isinstance), as huggingface_hub's own command line does
(`huggingface_hub/cli/_errors.py`), never by their class names. Planning, publishing and the catalog
all read failures through `describe`, so a missing repo, a refused token or a dropped connection is
named the same way, and retried (or not) the same way, everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Kind = Literal["offline", "gated", "no_repo", "no_revision", "no_file", "unauthorized", "forbidden", "conflict",
               "busy", "http", "transport"]
# HTTP answers worth asking again after a pause: rate limits and server errors.
RETRY_STATUS = (429, 500, 502, 503, 504)
# Answers about what exists, not failures: the caller decides what a missing repo, revision or file means.
ANSWERS = ("no_repo", "no_revision", "no_file")


@dataclass(frozen=True)
class HubFailure:
    """A Hub call's failure: its kind, the HTTP status when the Hub answered, and one line saying what to do."""

    kind: Kind
    status: int | None
    message: str

    @property
    def retryable(self) -> bool:
        """Worth trying again after a pause: a rate limit, a server error or a dropped connection."""
        return self.kind in ("busy", "transport")


@dataclass(frozen=True)
class _Call:
    repo: str
    revision: str
    endpoint: str
    status: int | None
    detail: str


# (exception types, HTTP statuses or None for any, kind, message). First match wins, so subclasses come
# before their bases: GatedRepoError and RevisionNotFoundError before RepositoryNotFoundError, every
# HfHubHTTPError subclass before the status rows.
_Row = tuple[tuple[type[BaseException], ...], "tuple[int, ...] | None", Kind, Callable[[_Call], str]]


def _table() -> list[_Row]:
    from huggingface_hub import errors

    http = (errors.HfHubHTTPError,)
    return [
        ((errors.OfflineModeIsEnabled,), None, "offline",
         lambda c: "HF_HUB_OFFLINE is set, so the Hub cannot be asked; unset HF_HUB_OFFLINE"),
        ((errors.GatedRepoError,), None, "gated",
         lambda c: f"{c.repo} is gated; accept its conditions on the Hub and set HF_TOKEN (or run `hf auth login`)"),
        ((errors.RevisionNotFoundError,), None, "no_revision",
         lambda c: f"revision '{c.revision}' not found in {c.repo}; name an existing branch, tag or commit"),
        ((errors.RepositoryNotFoundError,), None, "no_repo",
         lambda c: f"{c.repo} not found on {c.endpoint} (a private repo needs HF_TOKEN or `hf auth login`)"),
        ((errors.EntryNotFoundError,), None, "no_file",
         lambda c: f"{c.repo} has no such file: {c.detail}"),
        (http, (401,), "unauthorized",
         lambda c: "the Hub rejected the token (401): run `hf auth login` or set a valid HF_TOKEN"),
        (http, (403,), "forbidden",
         lambda c: f"the token may not do this on {c.repo} (403): use a token with access to it (`hf auth login`, HF_TOKEN)"),
        (http, (412,), "conflict",
         lambda c: f"{c.repo} changed on the Hub meanwhile (412: someone else pushed)"),
        (http, RETRY_STATUS, "busy",
         lambda c: f"the Hub answered {c.status} ({c.detail}); retry later"),
        (http, None, "http",
         lambda c: f"the Hub answered {c.status}: {c.detail}"),
        (_transport_errors(), None, "transport",
         lambda c: f"the Hub at {c.endpoint} cannot be reached ({c.detail}); check the network"),
    ]


def _transport_errors() -> tuple[type[BaseException], ...]:
    """A dropped, refused or timed-out connection, from whichever HTTP library huggingface_hub uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):  # huggingface_hub 2.x uses httpx2, 1.x httpx
        try:
            found.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def describe(exc: BaseException, repo_id: str = "the repo", revision: str | None = None,
             endpoint: str | None = None) -> HubFailure | None:
    """What `exc`, raised by a huggingface_hub call about `repo_id`, means; None when it is no Hub or transport error."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None) if response is not None else None
    for types, statuses, kind, message in _table():
        if isinstance(exc, types) and (statuses is None or status in statuses):
            if endpoint is None:
                from huggingface_hub import constants

                endpoint = constants.ENDPOINT
            detail = " ".join(str(getattr(exc, "server_message", None) or exc).split()) or type(exc).__name__
            call = _Call(repo_id, revision or "main", endpoint.rstrip("/"), status, detail[:300])
            return HubFailure(kind, status, message(call))
    return None


def is_transport_error(exc: BaseException) -> bool:
    """A connection dropped, refused or timed out: the request may not have been answered."""
    failure = describe(exc, endpoint="")
    return failure is not None and failure.kind == "transport"
