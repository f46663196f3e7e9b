"""A local, Hub-compatible HTTP server that the real ``huggingface_hub`` client talks to in tests.

It speaks the requests the client makes with xet disabled: repo creation and deletion, README metadata
validation, preupload (regular vs LFS, remote oids so unchanged files are skipped), the git-LFS batch API
with upload and verify, ndjson commits (pull requests, ``parentCommit`` checks), branches and tags, repo
info, trees, model listing, ``whoami``, file downloads (``/resolve``) and collections (create, list, get,
update, delete; add, update and delete items). Every commit keeps a full snapshot, so any revision can be
read back. Private repos and collections are invisible without a token of their namespace.

Tokens carry a role (`Token`: "read", "write" or "fineGrained" with scoped permissions such as
``repo.write`` on a user, org or repo) and org members a role ("read", "contributor", "write",
"admin"); writes are refused as the Hub refuses them, and ``/api/whoami-v2`` reports both in the
Hub's shape (``orgs[].roleInOrg``, ``auth.accessToken.role``, ``auth.accessToken.fineGrained``).

Tests read ``server.requests`` (or ``server.find(...)``/``server.count(...)``) to see what the client sent,
and ``server.inject(...)`` makes chosen requests fail with an HTTP status or a dropped connection.

Pointing a client at it:

- In this process, ``HfApi(endpoint=server.endpoint, token=...)`` is enough for the API. Downloads
  (``hf_hub_download``, ``transformers`` ``from_pretrained``) build their URL from
  ``huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE``, which is computed from ``HF_ENDPOINT`` at
  import time, and uploads pick xet when ``constants.HF_HUB_DISABLE_XET`` is false and hf_xet is
  installed: setting the environment variables after import changes nothing. The ``hub_server``
  fixture (``registry.testing.fixtures``) patches those constants for the test.
- In a subprocess (e.g. ``registry publish``), set the environment before it starts:
  ``env = {**os.environ, **server.client_env(token)}``, that is ``HF_ENDPOINT=http://127.0.0.1:PORT``,
  ``HF_HUB_DISABLE_XET=1``, ``HF_TOKEN=<token>`` (empty for anonymous), ``HF_HOME=<scratch dir>``
  (keeps the user's cache and stored token out), ``HF_HUB_OFFLINE=0``, ``HF_HUB_DISABLE_TELEMETRY=1``.

Only the standard library and PyYAML are used, so this module imports without torch or transformers.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import secrets
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from registry import frontmatter

# Above this size the Hub asks for LFS whatever the file's name or content.
LFS_THRESHOLD = 10 * 1024 * 1024

FaultKind = int | Literal["drop"]
_Access = Literal["read", "contribute", "write"]
TokenRole = Literal["read", "write", "fineGrained"]
OrgRole = Literal["read", "contributor", "write", "admin"]

_KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")
_BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
# The Hub's limits on collections (huggingface_hub documents the description's and the note's).
COLLECTION_DESCRIPTION_MAX = 150
COLLECTION_NOTE_MAX = 500
COLLECTION_LIST_ITEMS = 4  # a listing shows this many items of each collection; get_collection shows all
_COLLECTION_ITEM_TYPES = {"model", "dataset", "space", "paper", "collection"}

# What the Hub commits as `.gitattributes` when it creates a repo: these names always go to LFS.
_INITIAL_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in [
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
        "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
        "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm",
        "*.xz", "*.zip", "*.zst", "*tfevents*",
    ]
)


class HubError(Exception):
    """An error answer: status, message (JSON `error` and `X-Error-Message`) and the Hub's `X-Error-Code`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


@dataclass(frozen=True)
class Token:
    """An access token: its user, its role and, for a fine-grained token, what it may do where.

    `scoped` maps an entity (the user, an organisation or a repo id) to permissions such as
    ``repo.content.read`` and ``repo.write``; `global_permissions` hold the unscoped ones
    (``discussion.write``). A fine-grained token does only what its user may do *and* what it lists.
    """

    user: str
    role: TokenRole = "write"
    scoped: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    global_permissions: tuple[str, ...] = ()
    name: str = "test"

    def grants(self, permission: str, *entities: str) -> bool:
        """Whether the token itself allows `permission` on one of `entities` (classic tokens: by role)."""
        if self.role == "fineGrained":
            return permission in self.global_permissions or any(permission in self.scoped.get(e, ()) for e in entities)
        return self.role == "write" or permission.endswith(".read")


class _ClientGone(Exception):
    """The client closed the connection before sending its whole request."""


@dataclass(frozen=True)
class Blob:
    """A file's content as stored: regular files under their git oid, LFS files under their sha256."""

    size: int
    sha256: str
    git_oid: str
    lfs: bool

    @property
    def pointer_size(self) -> int:
        """Size of the git-LFS pointer file that stands for the content in git."""
        return len(_lfs_pointer(self.sha256, self.size))


@dataclass(frozen=True)
class Commit:
    """One commit with the full snapshot of the repo at that point."""

    oid: str
    parent: str | None
    title: str
    message: str
    author: str | None
    date: datetime
    files: Mapping[str, Blob]


@dataclass
class Repo:
    """A repository: commits by oid and refs (`refs/heads/*`, `refs/tags/*`, `refs/pr/*`) to them."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: datetime
    uid: str = field(default_factory=lambda: secrets.token_hex(12))
    creator: str | None = None
    gated: str | bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    next_pr: int = 1

    @property
    def namespace(self) -> str:
        """The user or organisation that owns the repo."""
        return self.repo_id.split("/")[0]

    def head(self, branch: str = "main") -> Commit:
        """The commit a branch points to."""
        return self.commits[self.refs[f"refs/heads/{branch}"]]


@dataclass
class CollectionItem:
    """One item of a collection: what it points to (`item_id` of `item_type`) and its note."""

    object_id: str  # the item's own id in the collection (`_id`), not the repo's
    item_id: str
    item_type: str
    note: str | None = None


@dataclass
class Collection:
    """A collection: a titled, ordered list of items owned by a user or an organisation."""

    namespace: str
    title: str
    object_id: str
    private: bool
    description: str | None = None
    theme: str = "orange"
    position: int = 0
    items: list[CollectionItem] = field(default_factory=list)
    updated: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def slug(self) -> str:
        """`namespace/title-words-<id>`, the Hub's shape: the id part stays when the title changes."""
        words = re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")
        return f"{self.namespace}/{words + '-' if words else ''}{self.object_id}"


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the server saw it; `status` is None when the connection was dropped."""

    method: str
    path: str
    query: Mapping[str, list[str]]
    status: int | None
    fault: str | None = None
    received: int = 0  # bytes of request body the server read: what the client sent it

    @property
    def line(self) -> str:
        """`METHOD path`, the string `find`, `count` and `inject` patterns are matched against."""
        return f"{self.method} {self.path}"


@dataclass
class _Fault:
    pattern: re.Pattern[str]
    kind: FaultKind
    remaining: int
    retry_after: int


class _Body:
    """A request body read lazily from the socket, with Content-Length or chunked transfer encoding."""

    def __init__(self, rfile: BinaryIO, headers: Message) -> None:
        self._rfile = rfile
        self.chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self.length: int | None = None if self.chunked else int(headers.get("Content-Length") or 0)
        self._left = self.length or 0  # bytes left in the body (Content-Length) or in the current chunk
        self._done = not self.chunked and self._left == 0
        self.received = 0

    def read(self, size: int = 1 << 20) -> bytes:
        """Up to `size` bytes of the body; b"" once it is all read."""
        try:
            return self._read(size)
        except OSError as exc:  # reset, timeout: the client is not sending any more
            raise _ClientGone() from exc

    def _read(self, size: int) -> bytes:
        if self._done:
            return b""
        if self.chunked and self._left == 0:
            line = self._rfile.readline()
            if not line:
                raise _ClientGone()
            self._left = int(line.split(b";")[0].strip() or b"0", 16)
            if self._left == 0:
                while self._rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self._done = True
                return b""
        data = self._rfile.read(min(size, self._left))
        if not data:
            raise _ClientGone()
        self.received += len(data)
        self._left -= len(data)
        if self._left == 0:
            if self.chunked:
                self._rfile.readline()  # the CRLF that closes a chunk
            else:
                self._done = True
        return data

    def read_all(self) -> bytes:
        """The rest of the body."""
        parts = []
        while chunk := self.read():
            parts.append(chunk)
        return b"".join(parts)


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: _Body
    token: Token | None = None
    _data: bytes | None = None

    @property
    def user(self) -> str | None:
        return self.token.user if self.token is not None else None

    def data(self) -> bytes:
        if self._data is None:
            self._data = self.body.read_all()
        return self._data

    def json(self) -> dict[str, Any]:
        try:
            data = json.loads(self.data() or b"{}")
        except ValueError as exc:
            raise HubError(400, f"Malformed JSON body: {exc}") from exc
        if not isinstance(data, dict):
            raise HubError(400, "The JSON body must be an object")
        return data

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def flag(self, name: str) -> bool:
        return (self.param(name) or "").lower() in ("1", "true")


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    file: tuple[Path, int, int] | None = None  # (path, start, end): streamed instead of `body`


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> _Response:
    body = json.dumps(data, default=str).encode()
    return _Response(status, body, {"Content-Type": "application/json", **(headers or {})})


def _error(err: HubError) -> _Response:
    headers = {"X-Error-Message": err.message, **err.headers}
    if err.code:
        headers["X-Error-Code"] = err.code
    return _json({"error": err.message, **err.extra}, err.status, headers)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _entity_id(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:24]


def _html_text(text: str) -> str:
    """A note as the Hub renders it to HTML: escaped text, line breaks kept."""
    import html

    return html.escape(text).replace("\n", "<br>")


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _front_matter(text: str) -> Any:
    """The README's YAML metadata, None when there is no block; raises yaml.YAMLError when it is not YAML."""
    block, _ = frontmatter.split(text)
    return yaml.safe_load(block) if block is not None else None


def _card_problems(meta: Any) -> list[str]:
    """What the Hub would reject in card metadata (a useful subset of its checks)."""
    if not isinstance(meta, dict):
        return ["the metadata must be a YAML mapping"]
    problems = []
    tags = meta.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        problems.append('"tags" must be a list of strings')
    base = meta.get("base_model")
    if base is not None and not (
        isinstance(base, str) or (isinstance(base, list) and all(isinstance(b, str) for b in base))
    ):
        problems.append('"base_model" must be a string or a list of strings')
    relation = meta.get("base_model_relation")
    if relation is not None and relation not in _BASE_MODEL_RELATIONS:
        problems.append(f'"base_model_relation" must be one of {sorted(_BASE_MODEL_RELATIONS)}')
    if "license" in meta and not isinstance(meta["license"], str):
        problems.append('"license" must be a string')
    return problems


def _matches(path: str, pattern: str, *, folders: bool = False) -> bool:
    """A gitattributes/gitignore-style match. A pattern without '/' matches a file name at any depth and,
    with `folders` (gitignore), a folder name too; a pattern ending in '/' matches folders only."""
    folder_only = pattern.endswith("/")
    pattern = pattern.strip("/")
    parts = path.split("/")
    if "/" not in pattern:
        names = (parts[:-1] if folder_only else parts) if folders else parts[-1:]
        return any(fnmatch.fnmatchcase(name, pattern) for name in names)
    if folders and path.startswith(pattern + "/"):
        return True
    return not folder_only and fnmatch.fnmatchcase(path, pattern.replace("**/", "*"))


def _ignored(path: str, gitignore: str | None) -> bool:
    patterns = [line.strip() for line in (gitignore or "").splitlines()]
    return any(_matches(path, p, folders=True) for p in patterns if p and not p.startswith(("#", "!")))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: HubServer) -> None:
        self.hub = hub
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    timeout = 60
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def _dispatch(self) -> None:
        self.server.hub._dispatch(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the server keeps its own structured log in `HubServer.requests`


class HubServer:
    """A Hub-compatible HTTP server on localhost; use as a context manager or call `start`/`stop`."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        tokens: Mapping[str, str | Token] | None = None,
        orgs: Mapping[str, Iterable[str] | Mapping[str, OrgRole]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.root = Path(root)
        for sub in ("git", "lfs", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # A bare user name stands for a classic write token; bare org members have the "write" role.
        self._tokens = {k: v if isinstance(v, Token) else Token(v) for k, v in (tokens or {}).items()}
        self._orgs: dict[str, dict[str, OrgRole]] = {
            org: dict(members) if isinstance(members, Mapping) else dict.fromkeys(members, "write")
            for org, members in (orgs or {}).items()
        }
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._collections: dict[str, Collection] = {}  # by object id
        self._tickets: dict[str, tuple[str, int]] = {}
        self._faults: list[_Fault] = []
        self._log: list[LoggedRequest] = []
        self._commit_counter = 0
        self.errors: list[str] = []  # tracebacks of requests the server itself failed on (answered 500)
        self._httpd = _HTTPServer((host, port), self)
        self.endpoint = f"http://{host}:{self._httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

        api = r"/api/(?P<kind>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
        git = r"/(?:(?P<prefix>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)"
        coll = r"/api/collections/(?P<slug>[^/]+/[^/]+)"
        # (method, path regex, handler, whether it runs under the state lock)
        routes: list[tuple[str, str, Callable[..., _Response], bool]] = [
            ("POST", r"/api/repos/create", self._create_repo, True),
            ("DELETE", r"/api/repos/delete", self._delete_repo, True),
            ("POST", r"/api/validate-yaml", self._validate_yaml, True),
            ("GET", r"/api/whoami-v2", self._whoami, True),
            ("GET", r"/api/agent-harnesses", self._agent_harnesses, True),
            ("GET", r"/api/(?P<kind>models|datasets|spaces)", self._list_repos, True),
            ("GET", api, self._repo_info, True),
            ("GET", api + r"/revision/(?P<rev>[^/]+)", self._repo_info, True),
            ("PUT", api + r"/settings", self._settings, True),
            ("POST", api + r"/preupload/(?P<rev>[^/]+)", self._preupload, True),
            ("POST", api + r"/commit/(?P<rev>[^/]+)", self._commit, True),
            ("GET", api + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", self._tree, True),
            ("POST", api + r"/paths-info/(?P<rev>[^/]+)", self._paths_info, True),
            ("GET", api + r"/refs", self._refs, True),
            ("GET", api + r"/commits/(?P<rev>[^/]+)", self._commits, True),
            ("POST", api + r"/branch/(?P<name>[^/]+)", self._create_branch, True),
            ("DELETE", api + r"/branch/(?P<name>[^/]+)", self._delete_branch, True),
            ("POST", api + r"/tag/(?P<rev>[^/]+)", self._create_tag, True),
            ("DELETE", api + r"/tag/(?P<name>[^/]+)", self._delete_tag, True),
            ("POST", git + r"\.git/info/lfs/objects/batch", self._lfs_batch, True),
            ("POST", git + r"\.git/info/lfs/objects/verify", self._lfs_verify, True),
            # Uploads stream a large body: they must not hold the lock while reading it.
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})/(?P<ticket>[\w-]+)", self._lfs_put, False),
            ("GET", git + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve_file, True),
            ("GET", r"/api/collections", self._list_collections, True),
            ("POST", r"/api/collections", self._create_collection, True),
            ("GET", coll, self._get_collection, True),
            ("PATCH", coll, self._update_collection, True),
            ("DELETE", coll, self._delete_collection, True),
            ("POST", coll + r"/items", self._add_collection_item, True),
            ("PATCH", coll + r"/items/(?P<item>[0-9a-f]{24})", self._update_collection_item, True),
            ("DELETE", coll + r"/items/(?P<item>[0-9a-f]{24})", self._delete_collection_item, True),
        ]
        self._routes = [(method, re.compile(path), handler, locked) for method, path, handler, locked in routes]

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> HubServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open connection."""
        if self._thread is not None:
            self._httpd.shutdown()  # waits for serve_forever to return: only when it runs
        with self._httpd.connections_lock:
            # Keep-alive connections would otherwise keep their handler threads waiting for a request.
            for conn in list(self._httpd.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def client_env(self, token: str | None = None, *, home: str | os.PathLike[str] | None = None) -> dict[str, str]:
        """Environment variables that point a huggingface_hub process (e.g. `registry publish`) at this server."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_TOKEN": token or "",  # empty means anonymous, even when the parent has a token
            "HF_HOME": str(home if home is not None else self.root / "hf-home"),
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }

    # -- log and faults --------------------------------------------------------------------------

    @property
    def requests(self) -> list[LoggedRequest]:
        """Every request so far, oldest first."""
        with self._lock:
            return list(self._log)

    def find(self, pattern: str) -> list[LoggedRequest]:
        """The requests whose `METHOD path` matches the regex `pattern` (re.search)."""
        regex = re.compile(pattern)
        return [r for r in self.requests if regex.search(r.line)]

    def count(self, pattern: str) -> int:
        """How many requests match `pattern` (see `find`)."""
        return len(self.find(pattern))

    def bytes_received(self, pattern: str = "") -> int:
        """The request body bytes of the requests matching `pattern` (all by default): what clients sent."""
        return sum(r.received for r in self.find(pattern))

    def clear_requests(self) -> None:
        """Forget the requests logged so far."""
        with self._lock:
            self._log.clear()

    def inject(self, pattern: str, kind: FaultKind, *, times: int = 1, retry_after: int = 0) -> None:
        """Make the next `times` requests matching `pattern` fail: an HTTP status (429 and 503 carry
        `Retry-After`), or "drop" to close the connection unanswered (a PUT is cut mid-body)."""
        if kind != "drop" and not (isinstance(kind, int) and 400 <= kind <= 599):
            raise ValueError(f"fault kind must be an HTTP error status or 'drop', not {kind!r}")
        with self._lock:
            self._faults.append(_Fault(re.compile(pattern), kind, times, retry_after))

    def lfs_objects(self) -> set[str]:
        """The sha256 of every LFS object stored."""
        return {p.name for p in (self.root / "lfs").iterdir()}

    # -- HTTP plumbing ---------------------------------------------------------------------------

    def _dispatch(self, handler: _Handler) -> None:
        url = urlsplit(handler.path)
        method = handler.command
        body = _Body(handler.rfile, handler.headers)
        req = _Request(method, url.path, parse_qs(url.query, keep_blank_values=True), handler.headers, body)
        fault = self._take_fault(f"{method} {url.path}")
        try:
            if fault is not None and fault.kind == "drop":
                self._drop(handler, req)
                return
            if fault is not None:
                req.data()  # keep the connection usable for the next request
                headers = {"Retry-After": str(fault.retry_after)} if fault.kind in (429, 503) else {}
                response = _error(HubError(int(fault.kind), f"Injected fault {fault.kind}", headers=headers))
            else:
                response = self._answer(req)
                req.data()
        except _ClientGone:
            handler.close_connection = True
            self._record(req, None, "client-gone")
            return
        # Logged before the answer is written: a test reading the log after the client returns sees it.
        self._record(req, response.status, None if fault is None else str(fault.kind))
        self._write(handler, response, head_only=method == "HEAD")

    def _answer(self, req: _Request) -> _Response:
        try:
            req.token = self._authenticate(req)
            for method, pattern, handler, locked in self._routes:
                match = pattern.fullmatch(req.path)
                if match is None or method != ("GET" if req.method == "HEAD" else req.method):
                    continue
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                if not locked:
                    return handler(req, **args)
                with self._lock:
                    return handler(req, **args)
            raise HubError(404, f"Not found: {req.method} {req.path}")
        except HubError as err:
            return _error(err)
        except _ClientGone:
            raise
        except Exception as exc:  # a bug in this server: answer 500 and keep the traceback for the test
            self.errors.append(traceback.format_exc())
            return _error(HubError(500, f"Internal error in the test Hub: {type(exc).__name__}: {exc}"))

    def _take_fault(self, line: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.pattern.search(line):
                    fault.remaining -= 1
                    return fault
        return None

    def _drop(self, handler: _Handler, req: _Request) -> None:
        if req.method == "PUT" and req.body.length:
            # Cut an upload halfway, as a connection lost during a long PUT would.
            left = req.body.length // 2
            while left > 0 and (chunk := req.body.read(min(left, 1 << 16))):
                left -= len(chunk)
        else:
            req.data()
        self._record(req, None, "drop")
        handler.close_connection = True  # return without a single byte of answer

    def _record(self, req: _Request, status: int | None, fault: str | None) -> None:
        with self._lock:
            self._log.append(LoggedRequest(req.method, req.path, req.query, status, fault, req.body.received))

    def _write(self, handler: _Handler, response: _Response, *, head_only: bool) -> None:
        try:
            handler.send_response(response.status)
            length = response.file[2] - response.file[1] if response.file else len(response.body)
            for name, value in {"Content-Length": str(length), **response.headers}.items():
                handler.send_header(name, value)
            handler.end_headers()
            if head_only:
                return
            if response.file is None:
                handler.wfile.write(response.body)
                return
            path, start, end = response.file
            with path.open("rb") as f:
                f.seek(start)
                while start < end and (chunk := f.read(min(1 << 20, end - start))):
                    handler.wfile.write(chunk)
                    start += len(chunk)
        except OSError:  # the client went away; nothing more to tell it
            handler.close_connection = True

    # -- access ----------------------------------------------------------------------------------

    def _authenticate(self, req: _Request) -> Token | None:
        header = req.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in self._tokens:
            # The exact message the client uses to tell a bad token from a missing repo.
            raise HubError(401, "Invalid credentials in Authorization header")
        return self._tokens[token.strip()]

    def _role(self, namespace: str, user: str) -> OrgRole | None:
        """The user's role in a namespace: "admin" of their own, their org role, else None."""
        return "admin" if user == namespace else self._orgs.get(namespace, {}).get(user)

    def _can_write(self, namespace: str, token: Token | None, repo: Repo | None = None) -> bool:
        """Whether `token` may create a repo in `namespace` (`repo` None) or commit to `repo`."""
        if token is None:
            return False
        role = self._role(namespace, token.user)
        # Like the Hub: a contributor creates repos and writes to the ones they created, nothing else.
        allowed = role in ("write", "admin") or (role == "contributor" and (repo is None or repo.creator == token.user))
        entities = (namespace, repo.repo_id) if repo is not None else (namespace,)
        return allowed and token.grants("repo.write", *entities)

    def _can_read(self, repo: Repo, token: Token | None) -> bool:
        if not repo.private:
            return True
        return (token is not None and self._role(repo.namespace, token.user) is not None
                and token.grants("repo.content.read", repo.namespace, repo.repo_id))

    def _repo(self, kind: str, repo_id: str, token: Token | None, access: _Access = "read") -> Repo:
        repo = self._repos.get((kind, repo_id))
        user = token.user if token is not None else None
        if repo is None or not self._can_read(repo, token):
            # Like the Hub: anonymous callers get 401, others 404, and nobody learns a private repo exists.
            if user is None:
                raise HubError(401, "Invalid username or password.", "RepoNotFound")
            raise HubError(404, "Repository not found", "RepoNotFound")
        if access == "contribute" and token is None:
            raise HubError(401, "You must be authenticated to contribute to a repo")
        if access == "contribute" and not (
            token is not None and (token.grants("discussion.write") or token.grants("repo.write", repo.namespace, repo_id))
        ):
            raise HubError(403, f"This token may not open pull requests on {repo_id}")
        if access == "write" and not self._can_write(repo.namespace, token, repo):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _require_user(self, req: _Request) -> str:
        if req.user is None:
            raise HubError(401, "You must be authenticated to do this")
        return req.user

    # -- storage ---------------------------------------------------------------------------------

    def _store_regular(self, content: bytes) -> Blob:
        oid = _git_oid(content)
        path = self.root / "git" / oid
        if not path.exists():
            tmp = self.root / "tmp" / f"{oid}.{secrets.token_hex(4)}"
            tmp.write_bytes(content)
            os.replace(tmp, path)
        return Blob(len(content), hashlib.sha256(content).hexdigest(), oid, lfs=False)

    def _lfs_path(self, sha256: str) -> Path:
        return self.root / "lfs" / sha256

    def _has_lfs(self, sha256: str, size: int) -> bool:
        path = self._lfs_path(sha256)
        return path.exists() and path.stat().st_size == size

    def _blob_path(self, blob: Blob) -> Path:
        return self._lfs_path(blob.sha256) if blob.lfs else self.root / "git" / blob.git_oid

    def _text(self, commit: Commit, path: str, limit: int = 1 << 20) -> str | None:
        blob = commit.files.get(path)
        if blob is None or blob.size > limit:
            return None
        return self._blob_path(blob).read_bytes().decode("utf-8", errors="replace")

    def _new_commit(
        self, repo: Repo, parent: Commit | None, files: Mapping[str, Blob], title: str, message: str, author: str | None
    ) -> Commit:
        self._commit_counter += 1
        seed = json.dumps(
            [repo.repo_id, parent and parent.oid, title, message, self._commit_counter, time.time_ns(),
             sorted((path, blob.git_oid) for path, blob in files.items())]
        )
        oid = hashlib.sha1(seed.encode()).hexdigest()
        commit = Commit(oid, parent and parent.oid, title, message, author, datetime.now(UTC), dict(files))
        repo.commits[oid] = commit
        return commit

    def _resolve(self, repo: Repo, rev: str) -> Commit:
        for ref in (rev, f"refs/heads/{rev}", f"refs/tags/{rev}"):
            if ref in repo.refs:
                return repo.commits[repo.refs[ref]]
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            found = [commit for oid, commit in repo.commits.items() if oid.startswith(rev)]
            if len(found) == 1:
                return found[0]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _branch_ref(self, repo: Repo, rev: str) -> str:
        ref = rev if rev.startswith(("refs/heads/", "refs/pr/")) else f"refs/heads/{rev}"
        if ref not in repo.refs:
            raise HubError(404, f"Invalid rev id: {rev} is not a branch", "RevisionNotFound")
        return ref

    def _url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # -- repo info -------------------------------------------------------------------------------

    def _card_data(self, commit: Commit) -> dict[str, Any] | None:
        text = self._text(commit, "README.md")
        try:
            meta = _front_matter(text) if text is not None else None
        except yaml.YAMLError:
            return None
        return meta if isinstance(meta, dict) else None

    def _config(self, commit: Commit) -> dict[str, Any] | None:
        text = self._text(commit, "config.json")
        try:
            config = json.loads(text) if text is not None else None
        except ValueError:
            return None
        if not isinstance(config, dict):
            return None
        return {k: config[k] for k in ("architectures", "model_type") if k in config}

    def _tags(self, commit: Commit, card: Mapping[str, Any], config: Mapping[str, Any] | None) -> list[str]:
        # The Hub derives tags from the card, the config and the files; these are the ones worth filtering on.
        tags: list[str] = []
        if isinstance(card.get("library_name"), str):
            tags.append(card["library_name"])
        tags += [t for t in card.get("tags") or [] if isinstance(t, str)]
        if config and isinstance(config.get("model_type"), str):
            tags.append(config["model_type"])
        if any(path.endswith(".safetensors") for path in commit.files):
            tags.append("safetensors")
        bases = card.get("base_model")
        relation = card.get("base_model_relation")
        for base in [bases] if isinstance(bases, str) else bases or []:
            tags.append(f"base_model:{base}")
            if relation:
                tags.append(f"base_model:{relation}:{base}")
        if isinstance(card.get("license"), str):
            tags.append(f"license:{card['license']}")
        return list(dict.fromkeys(tags))

    def _info(self, repo: Repo, commit: Commit, *, blobs: bool, siblings: bool, card: bool) -> dict[str, Any]:
        card_data = self._card_data(commit) or {}
        config = self._config(commit)
        info: dict[str, Any] = {
            "_id": repo.uid,
            "id": repo.repo_id,
            "author": repo.namespace,
            "sha": commit.oid,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": self._tags(commit, card_data, config),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            info.update({k: card_data[k] for k in ("library_name", "pipeline_tag") if k in card_data})
            if config:
                info["config"] = config
        if card and card_data:
            info["cardData"] = card_data
        if siblings:
            info["siblings"] = [self._sibling(path, blob, blobs) for path, blob in sorted(commit.files.items())]
        return info

    @staticmethod
    def _sibling(path: str, blob: Blob, blobs: bool) -> dict[str, Any]:
        if not blobs:
            return {"rfilename": path}
        sibling: dict[str, Any] = {"rfilename": path, "size": blob.size, "blobId": blob.git_oid}
        if blob.lfs:
            sibling["lfs"] = {"sha256": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
        return sibling

    @staticmethod
    def _file_entry(path: str, blob: Blob) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": blob.git_oid, "size": blob.size, "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
        return entry

    @staticmethod
    def _folder_entry(files: Mapping[str, Blob], folder: str) -> dict[str, Any]:
        listing = "\n".join(f"{p} {b.git_oid}" for p, b in sorted(files.items()) if p.startswith(folder + "/"))
        return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": folder}

    # -- endpoints: repos and accounts -----------------------------------------------------------

    def _create_repo(self, req: _Request) -> _Response:
        user = self._require_user(req)
        payload = req.json()
        name, namespace = str(payload.get("name") or ""), payload.get("organization") or user
        kind = payload.get("type") or "model"
        if kind not in _URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {kind}")
        if not _NAME.fullmatch(name) or len(name) > 96 or ".." in name or "--" in name:
            raise HubError(400, f"Invalid repo name: {name!r}")
        if not self._can_write(namespace, req.token):
            raise HubError(403, f'You don\'t have the rights to create a {kind} under the namespace "{namespace}"')
        repo_id = f"{namespace}/{name}"
        if (kind, repo_id) in self._repos:
            existing = self._repos[(kind, repo_id)]
            raise HubError(409, f"You already created this {kind} repo", extra={"url": self._url(existing)})
        private = payload.get("visibility") == "private" or payload.get("private") is True
        repo = Repo(kind, repo_id, private, datetime.now(UTC), creator=user)
        files = {".gitattributes": self._store_regular(_INITIAL_GITATTRIBUTES.encode())}
        repo.refs["refs/heads/main"] = self._new_commit(repo, None, files, "initial commit", "", user).oid
        self._repos[(kind, repo_id)] = repo
        return _json({"url": self._url(repo), "name": repo_id, "id": repo.uid})

    def _delete_repo(self, req: _Request) -> _Response:
        user = self._require_user(req)
        payload = req.json()
        repo_id = f"{payload.get('organization') or user}/{payload.get('name')}"
        repo = self._repo(payload.get("type") or "model", repo_id, req.token, "write")
        del self._repos[(repo.repo_type, repo.repo_id)]
        return _json({})

    def _settings(self, req: _Request, kind: str, repo: str) -> _Response:
        target = self._repo(_KINDS[kind], repo, req.token, "write")
        payload = req.json()
        if "private" in payload:
            target.private = bool(payload["private"])
        if "visibility" in payload:
            target.private = payload["visibility"] == "private"
        if "gated" in payload:
            target.gated = payload["gated"]
        return _json({})

    def _whoami(self, req: _Request) -> _Response:
        # The shape of the Hub's /api/whoami-v2: org roles under `roleInOrg`, the token's role under
        # `auth.accessToken.role`, and a fine-grained token's permissions under `auth.accessToken.fineGrained`.
        user = self._require_user(req)
        token = req.token
        assert token is not None
        orgs = [{"type": "org", "name": org, "fullname": org, "id": _entity_id(org), "roleInOrg": members[user]}
                for org, members in self._orgs.items() if user in members]
        access_token: dict[str, Any] = {"displayName": token.name, "role": token.role, "createdAt": "2024-01-01T00:00:00.000Z"}
        if token.role == "fineGrained":
            access_token["fineGrained"] = {
                "canReadGatedRepos": False,
                "global": list(token.global_permissions),
                "scoped": [{"entity": {"_id": _entity_id(name), "type": self._entity_type(name, user), "name": name},
                            "permissions": list(permissions)} for name, permissions in token.scoped.items()],
            }
        return _json({
            "type": "user", "id": _entity_id(user), "name": user, "fullname": user,
            "email": f"{user}@example.invalid", "emailVerified": True, "isPro": False, "orgs": orgs,
            "auth": {"type": "access_token", "accessToken": access_token},
        })

    def _entity_type(self, name: str, user: str) -> str:
        if "/" in name:
            return "model"
        return "user" if name == user else "org" if name in self._orgs else "user"

    def _agent_harnesses(self, req: _Request) -> _Response:
        # The client fetches this registry once per process to describe itself in its User-Agent.
        return _json({"standardEnvVars": [], "harnesses": {}})

    def _validate_yaml(self, req: _Request) -> _Response:
        content = str(req.json().get("content") or "")
        try:
            meta = _front_matter(content)
        except yaml.YAMLError as exc:
            problems = [f"Invalid YAML in the README metadata: {exc}"]
        else:
            if meta is None:
                return _json({"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
            problems = _card_problems(meta)
        if problems:
            return _json({"error": problems[0], "errors": [{"message": p} for p in problems]}, 400,
                         {"X-Error-Message": problems[0]})
        return _json({"errors": [], "warnings": []})

    def _list_repos(self, req: _Request, kind: str) -> _Response:
        author, search = req.param("author"), (req.param("search") or "").lower()
        filters = req.query.get("filter", [])
        full = req.flag("full")
        limit = int(req.param("limit") or 0) or None
        found = []
        for repo in self._repos.values():
            if repo.repo_type != _KINDS[kind] or not self._can_read(repo, req.token):
                continue
            if (author and repo.namespace != author) or search not in repo.repo_id.lower():
                continue
            info = self._info(repo, repo.head(), blobs=False, siblings=full, card=full or req.flag("cardData"))
            if all(f in info["tags"] or f == repo.repo_id for f in filters):
                found.append(info)
        return _json(found[:limit])

    def _repo_info(self, req: _Request, kind: str, repo: str, rev: str = "main") -> _Response:
        target = self._repo(_KINDS[kind], repo, req.token)
        commit = self._resolve(target, rev)
        return _json(self._info(target, commit, blobs=req.flag("blobs"), siblings=True, card=True))

    # -- endpoints: uploads and commits ----------------------------------------------------------

    def _preupload(self, req: _Request, kind: str, repo: str, rev: str) -> _Response:
        target = self._repo(_KINDS[kind], repo, req.token, "contribute" if req.flag("create_pr") else "write")
        commit = self._resolve(target, rev)
        payload = req.json()
        gitignore = payload.get("gitIgnore")
        if gitignore is None:
            gitignore = self._text(commit, ".gitignore")
        attributes = self._text(commit, ".gitattributes") or ""
        lfs_patterns = [line.split()[0] for line in attributes.splitlines() if "filter=lfs" in line]
        answers = []
        for item in payload.get("files") or []:
            try:
                path, size = str(item["path"]), int(item["size"])
                sample = base64.b64decode(item.get("sample") or "")
            except (KeyError, TypeError, ValueError) as exc:
                raise HubError(400, f"Malformed preupload entry: {item!r}") from exc
            # The Hub's rule: big, binary-looking (a NUL byte, as git judges) or LFS-tracked by name.
            lfs = size > LFS_THRESHOLD or b"\0" in sample or any(_matches(path, p) for p in lfs_patterns)
            answer = {
                "path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": _ignored(path, gitignore)
            }
            remote = commit.files.get(path)
            if remote is not None:
                # What the client compares with its own oid to skip unchanged files.
                answer["oid"] = remote.sha256 if remote.lfs else remote.git_oid
            answers.append(answer)
        return _json({"files": answers, "commitOid": commit.oid})

    def _lfs_batch(self, req: _Request, repo: str, prefix: str | None = None) -> _Response:
        target = self._repo(_KINDS[prefix or "models"], repo, req.token, "contribute")
        payload = req.json()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the LFS upload operation is supported")
        objects = []
        for obj in payload.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            entry: dict[str, Any] = {"oid": str(oid), "size": size if isinstance(size, int) else -1}
            if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid)) or not isinstance(size, int):
                entry["error"] = {"code": 422, "message": "oid must be a sha256 and size an integer"}
            elif not self._has_lfs(oid, size):  # an object already stored needs no upload: no "actions"
                ticket = secrets.token_urlsafe(16)
                self._tickets[ticket] = (oid, size)
                entry["authenticated"] = True
                entry["actions"] = {
                    "upload": {"href": f"{self.endpoint}/lfs-upload/{oid}/{ticket}"},
                    "verify": {"href": f"{self._url(target)}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        response = _json({"transfer": "basic", "objects": objects})
        response.headers["Content-Type"] = "application/vnd.git-lfs+json"
        return response

    def _lfs_put(self, req: _Request, oid: str, ticket: str) -> _Response:
        with self._lock:
            expected = self._tickets.get(ticket)
        if expected is None or expected[0] != oid:
            raise HubError(403, "Invalid or expired upload URL")
        tmp = self.root / "tmp" / f"{oid}.{secrets.token_hex(4)}"
        digest, written = hashlib.sha256(), 0
        try:
            with tmp.open("wb") as f:
                while chunk := req.body.read():
                    digest.update(chunk)
                    f.write(chunk)
                    written += len(chunk)
            if digest.hexdigest() != oid or written != expected[1]:
                raise HubError(
                    400,
                    f"Uploaded content does not match the LFS object: expected sha256 {oid} and {expected[1]} bytes,"
                    f" got {digest.hexdigest()} and {written} bytes",
                )
            os.replace(tmp, self._lfs_path(oid))
        finally:
            tmp.unlink(missing_ok=True)
        return _Response(200, headers={"ETag": f'"{oid}"'})

    def _lfs_verify(self, req: _Request, repo: str, prefix: str | None = None) -> _Response:
        self._repo(_KINDS[prefix or "models"], repo, req.token, "contribute")
        payload = req.json()
        if not self._has_lfs(str(payload.get("oid")), payload.get("size", -1)):
            raise HubError(404, f"LFS object {payload.get('oid')} of {payload.get('size')} bytes was not uploaded")
        return _json({"message": "Verified"})

    def _commit(self, req: _Request, kind: str, repo: str, rev: str) -> _Response:
        create_pr = req.flag("create_pr")
        target = self._repo(_KINDS[kind], repo, req.token, "contribute" if create_pr else "write")
        try:
            lines = [json.loads(line) for line in req.data().splitlines() if line.strip()]
        except ValueError as exc:
            raise HubError(400, f"Malformed ndjson body: {exc}") from exc
        if not all(isinstance(line, dict) for line in lines):
            raise HubError(400, "Every line of a commit must be a JSON object")
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        if not header.get("summary"):
            raise HubError(400, "A commit needs a summary")
        parent_oid = header.get("parentCommit")
        if create_pr:
            if rev.startswith(("refs/pr/", "refs/tags/")):
                raise HubError(400, f"Pull requests can only target a branch, not {rev}")
            branch = target.refs[self._branch_ref(target, rev)]
            base = self._resolve(target, parent_oid) if parent_oid else target.commits[branch]
            pr_num = target.next_pr
            ref = f"refs/pr/{pr_num}"
        else:
            ref = self._branch_ref(target, rev)
            base = target.commits[target.refs[ref]]
            if parent_oid and not base.oid.startswith(parent_oid.lower()):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(base.files)
        for line in lines[1:]:
            self._apply(files, line.get("key"), line.get("value") or {})
        commit = self._new_commit(target, base, files, header["summary"], header.get("description") or "", req.user)
        target.refs[ref] = commit.oid
        answer = {"success": True, "commitOid": commit.oid, "commitUrl": f"{self._url(target)}/commit/{commit.oid}",
                  "hookOutput": ""}
        if create_pr:
            target.next_pr += 1
            answer["pullRequestUrl"] = f"{self._url(target)}/discussions/{pr_num}"
        return _json(answer)

    def _apply(self, files: dict[str, Blob], key: str | None, value: Mapping[str, Any]) -> None:
        path = str(value.get("path") or "").strip("/")
        if not path:
            raise HubError(400, f"A {key} operation needs a path")
        if key == "file":
            if value.get("encoding") != "base64":
                raise HubError(400, f"Unsupported encoding for {path}: {value.get('encoding')}")
            content = base64.b64decode(value.get("content") or "")
            if len(content) > LFS_THRESHOLD:
                raise HubError(400, f"{path} is larger than 10 MiB: upload it with LFS")
            files[path] = self._store_regular(content)
        elif key == "lfsFile":
            oid = str(value.get("oid"))
            stored = self._lfs_path(oid)
            if not stored.exists():
                raise HubError(400, f"LFS object {oid} for {path} was never uploaded")
            size = stored.stat().st_size
            if value.get("size") not in (None, size):
                raise HubError(400, f"LFS object {oid} has {size} bytes, not {value.get('size')}")
            files[path] = Blob(size, oid, _git_oid(_lfs_pointer(oid, size)), lfs=True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"{path} does not exist", "EntryNotFound")
        elif key == "deletedFolder":
            inside = [p for p in files if p.startswith(path + "/")]
            if not inside:
                raise HubError(404, f"{path}/ does not exist", "EntryNotFound")
            for p in inside:
                del files[p]
        else:
            raise HubError(400, f"Unknown commit operation: {key}")

    # -- endpoints: reading the tree -------------------------------------------------------------

    def _tree(self, req: _Request, kind: str, repo: str, rev: str, path: str = "") -> _Response:
        commit = self._resolve(self._repo(_KINDS[kind], repo, req.token), rev)
        base = path.strip("/")
        prefix = f"{base}/" if base else ""
        inside = {p: b for p, b in commit.files.items() if p.startswith(prefix)}
        if base and not inside:
            raise HubError(404, f"{base} does not exist", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        recursive = req.flag("recursive")
        folders: set[str] = set()
        entries = []
        for p, blob in sorted(inside.items()):
            parts = p[len(prefix):].split("/")
            # The folders between `base` and the file: all of them when recursive, else the first one.
            depth = len(parts) if recursive else min(2, len(parts))
            folders.update(prefix + "/".join(parts[:i]) for i in range(1, depth))
            if recursive or len(parts) == 1:
                entries.append(self._file_entry(p, blob))
        return _json([self._folder_entry(commit.files, f) for f in sorted(folders)] + entries)

    def _paths_info(self, req: _Request, kind: str, repo: str, rev: str) -> _Response:
        commit = self._resolve(self._repo(_KINDS[kind], repo, req.token), rev)
        form = parse_qs(req.data().decode())
        entries = []
        for path in (p.strip("/") for p in form.get("paths", [])):
            if path in commit.files:
                entries.append(self._file_entry(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files):
                entries.append(self._folder_entry(commit.files, path))
        return _json(entries)

    def _refs(self, req: _Request, kind: str, repo: str) -> _Response:
        target = self._repo(_KINDS[kind], repo, req.token)

        def refs(prefix: str, short: bool = True) -> list[dict[str, str]]:
            return [{"name": ref[len(prefix):] if short else ref, "ref": ref, "targetCommit": oid}
                    for ref, oid in sorted(target.refs.items()) if ref.startswith(prefix)]

        data: dict[str, Any] = {"branches": refs("refs/heads/"), "converts": [], "tags": refs("refs/tags/")}
        if req.flag("include_prs"):
            data["pullRequests"] = refs("refs/pr/", short=False)
        return _json(data)

    def _commits(self, req: _Request, kind: str, repo: str, rev: str) -> _Response:
        target = self._repo(_KINDS[kind], repo, req.token)
        commit: Commit | None = self._resolve(target, rev)
        history = []
        while commit is not None:
            history.append({"id": commit.oid, "title": commit.title, "message": commit.message,
                            "authors": [{"user": commit.author}] if commit.author else [], "date": _iso(commit.date)})
            commit = target.commits.get(commit.parent) if commit.parent else None
        return _json(history)

    def _resolve_file(self, req: _Request, repo: str, rev: str, path: str, prefix: str | None = None) -> _Response:
        commit = self._resolve(self._repo(_KINDS[prefix or "models"], repo, req.token), rev)
        headers = {"X-Repo-Commit": commit.oid}
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers=headers)
        # hf_hub_download names the cached blob after the ETag: the sha256 for LFS files, the git oid otherwise.
        etag = f'"{blob.sha256 if blob.lfs else blob.git_oid}"'
        headers.update({"ETag": etag, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                        "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"'})
        if blob.lfs:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(blob.size)})
        start, end, status = 0, blob.size, 200
        # `bytes=N-` is how the client resumes an interrupted download; `bytes=N-M` comes free.
        byte_range = re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("Range") or "")
        if byte_range:
            start = int(byte_range[1])
            end = min(int(byte_range[2]) + 1, blob.size) if byte_range[2] else blob.size
            if start >= blob.size:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{blob.size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        return _Response(status, headers=headers, file=(self._blob_path(blob), start, end))

    # -- endpoints: branches and tags ------------------------------------------------------------

    def _create_branch(self, req: _Request, kind: str, repo: str, name: str) -> _Response:
        target = self._repo(_KINDS[kind], repo, req.token, "write")
        ref = f"refs/heads/{name}"
        if ref in target.refs:
            raise HubError(409, f"Reference already exists: {ref}")
        start = req.json().get("startingPoint")
        target.refs[ref] = (self._resolve(target, start) if start else target.head()).oid
        return _json({})

    def _delete_branch(self, req: _Request, kind: str, repo: str, name: str) -> _Response:
        target = self._repo(_KINDS[kind], repo, req.token, "write")
        if name == "main":
            raise HubError(403, "Cannot delete the default branch")
        if target.refs.pop(f"refs/heads/{name}", None) is None:
            raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
        return _json({})

    def _create_tag(self, req: _Request, kind: str, repo: str, rev: str) -> _Response:
        target = self._repo(_KINDS[kind], repo, req.token, "write")
        tag = str(req.json().get("tag") or "")
        if not tag:
            raise HubError(400, "A tag needs a name")
        ref = f"refs/tags/{tag}"
        if ref in target.refs:
            raise HubError(409, f"Tag already exists: {tag}")
        target.refs[ref] = self._resolve(target, rev).oid
        return _json({})

    def _delete_tag(self, req: _Request, kind: str, repo: str, name: str) -> _Response:
        target = self._repo(_KINDS[kind], repo, req.token, "write")
        if target.refs.pop(f"refs/tags/{name}", None) is None:
            raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
        return _json({})

    # -- endpoints: collections ------------------------------------------------------------------
    # As the Hub answers huggingface_hub's collection calls: a slug `namespace/title-words-<24 hex>`
    # (only the id part is looked up, so a renamed collection keeps answering to its old slug), 409 with
    # the existing slug for a title already used in the namespace or an item already listed, 404 for a
    # missing (or hidden private) collection, item or item target, 403 unless the token may write to the
    # namespace (a fine-grained token needs `collection.write` there).

    def collections(self) -> list[Collection]:
        """Every collection, in creation order (for tests to look at directly)."""
        with self._lock:
            return list(self._collections.values())

    def _can_write_collection(self, namespace: str, token: Token | None) -> bool:
        if token is None:
            return False
        role = self._role(namespace, token.user)
        return role in ("write", "admin") and token.grants("collection.write", namespace)

    def _can_read_collection(self, collection: Collection, token: Token | None) -> bool:
        if not collection.private:
            return True
        return (token is not None and self._role(collection.namespace, token.user) is not None
                and token.grants("collection.read", collection.namespace))

    def _collection(self, req: _Request, slug: str, write: bool = False) -> Collection:
        namespace, _, name = slug.partition("/")
        found = self._collections.get(name.rpartition("-")[2])
        if found is None or found.namespace != namespace or not self._can_read_collection(found, req.token):
            raise HubError(404, "Collection not found")
        if write:
            if req.token is None:
                raise HubError(401, "You must be authenticated to do this")
            if not self._can_write_collection(found.namespace, req.token):
                raise HubError(403, f"You don't have the rights to edit collections of {found.namespace}")
        return found

    def _collection_json(self, collection: Collection, *, listed: bool = False) -> dict[str, Any]:
        namespace = collection.namespace
        items = collection.items[:COLLECTION_LIST_ITEMS] if listed else collection.items
        data: dict[str, Any] = {
            "slug": collection.slug,
            "title": collection.title,
            "description": collection.description,
            "gating": False,
            "lastUpdated": _iso(collection.updated),
            "owner": {"_id": _entity_id(namespace), "name": namespace, "fullname": namespace,
                      "type": "org" if namespace in self._orgs else "user", "isPro": False, "isHf": False,
                      "avatarUrl": f"{self.endpoint}/avatars/{namespace}.svg"},
            "items": [self._collection_item_json(item, i) for i, item in enumerate(items)],
            "private": collection.private,
            "theme": collection.theme,
            "upvotes": 0,
            "isUpvotedByUser": False,
            "shareUrl": f"{self.endpoint}/collections/{collection.slug}",
        }
        if not listed:
            # The client adds a listing's position itself, and refuses a second one.
            data["position"] = collection.position
        return data

    def _collection_item_json(self, item: CollectionItem, position: int) -> dict[str, Any]:
        data: dict[str, Any] = {"_id": item.object_id, "id": item.item_id, "type": item.item_type, "position": position}
        if item.item_type in ("model", "dataset", "space"):
            data["repoType"] = item.item_type
            repo = self._repos.get((item.item_type, item.item_id))
            if repo is not None:
                data.update(author=repo.namespace, private=repo.private, gated=repo.gated, downloads=0, likes=0,
                            lastModified=_iso(repo.head().date))
        if item.note is not None:
            data["note"] = {"html": _html_text(item.note), "text": item.note}
        return data

    def _list_collections(self, req: _Request) -> _Response:
        owners = req.query.get("owner") or []
        wanted_items = req.query.get("item") or []
        limit = int(req.param("limit") or 0) or None
        found = []
        for collection in self._collections.values():
            if not self._can_read_collection(collection, req.token):
                continue
            if owners and collection.namespace not in owners:
                continue
            keys = {f"{i.item_type}s/{i.item_id}" for i in collection.items} | {i.item_id for i in collection.items}
            if wanted_items and not any(w in keys for w in wanted_items):
                continue
            found.append(collection)
        if req.param("sort") in (None, "lastModified"):
            found.sort(key=lambda c: c.updated, reverse=True)
        return _json([self._collection_json(c, listed=True) for c in found[:limit]])

    def _create_collection(self, req: _Request) -> _Response:
        user = self._require_user(req)
        payload = req.json()
        title, namespace = payload.get("title"), payload.get("namespace") or user
        description = payload.get("description")
        if not isinstance(title, str) or not title.strip():
            raise HubError(400, "A collection needs a title")
        if description is not None and (not isinstance(description, str) or len(description) > COLLECTION_DESCRIPTION_MAX):
            raise HubError(400, f"The description must be a string of at most {COLLECTION_DESCRIPTION_MAX} characters")
        if not self._can_write_collection(namespace, req.token):
            raise HubError(403, f"You don't have the rights to create a collection under the namespace \"{namespace}\"")
        for existing in self._collections.values():
            if existing.namespace == namespace and existing.title == title:
                raise HubError(409, "Collection already exists", extra={"slug": existing.slug})
        object_id = secrets.token_hex(12)
        position = sum(1 for c in self._collections.values() if c.namespace == namespace)
        collection = Collection(namespace, title, object_id, payload.get("private") is True, description, position=position)
        self._collections[object_id] = collection
        return _json(self._collection_json(collection))

    def _get_collection(self, req: _Request, slug: str) -> _Response:
        return _json(self._collection_json(self._collection(req, slug)))

    def _update_collection(self, req: _Request, slug: str) -> _Response:
        collection = self._collection(req, slug, write=True)
        payload = req.json()
        if "title" in payload:
            title = payload["title"]
            if not isinstance(title, str) or not title.strip():
                raise HubError(400, "A collection needs a title")
            collection.title = title
        if "description" in payload:
            description = payload["description"]
            if not isinstance(description, str) or len(description) > COLLECTION_DESCRIPTION_MAX:
                raise HubError(400, f"The description must be a string of at most {COLLECTION_DESCRIPTION_MAX} characters")
            collection.description = description
        for key in ("private", "theme", "position"):
            if key in payload:
                setattr(collection, key, payload[key])
        collection.updated = datetime.now(UTC)
        return _json({"success": True, "data": self._collection_json(collection)})

    def _delete_collection(self, req: _Request, slug: str) -> _Response:
        collection = self._collection(req, slug, write=True)
        del self._collections[collection.object_id]
        return _json({})

    def _add_collection_item(self, req: _Request, slug: str) -> _Response:
        collection = self._collection(req, slug, write=True)
        payload = req.json()
        item = payload.get("item")
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or item.get("type") not in _COLLECTION_ITEM_TYPES:
            raise HubError(400, f"An item needs an id and a type among {sorted(_COLLECTION_ITEM_TYPES)}")
        item_id, item_type = item["id"], item["type"]
        note = self._note(payload)
        if item_type in ("model", "dataset", "space"):
            repo = self._repos.get((item_type, item_id))
            if repo is None or not self._can_read(repo, req.token):
                raise HubError(404, f"{item_type} {item_id} not found")
        if any(i.item_type == item_type and i.item_id == item_id for i in collection.items):
            raise HubError(409, f"{item_id} is already in the collection")
        collection.items.append(CollectionItem(secrets.token_hex(12), item_id, item_type, note))
        collection.updated = datetime.now(UTC)
        return _json(self._collection_json(collection))

    def _update_collection_item(self, req: _Request, slug: str, item: str) -> _Response:
        collection = self._collection(req, slug, write=True)
        found = next((i for i in collection.items if i.object_id == item), None)
        if found is None:
            raise HubError(404, "Item not found in the collection")
        payload = req.json()
        if "note" in payload:
            found.note = self._note(payload)
        if "position" in payload:
            position = payload["position"]
            if not isinstance(position, int) or position < 0:
                raise HubError(400, "position must be a non-negative integer")
            collection.items.remove(found)
            collection.items.insert(min(position, len(collection.items)), found)
        collection.updated = datetime.now(UTC)
        return _json({"success": True})

    def _delete_collection_item(self, req: _Request, slug: str, item: str) -> _Response:
        collection = self._collection(req, slug, write=True)
        found = next((i for i in collection.items if i.object_id == item), None)
        if found is None:
            raise HubError(404, "Item not found in the collection")
        collection.items.remove(found)
        collection.updated = datetime.now(UTC)
        return _json({})

    @staticmethod
    def _note(payload: Mapping[str, Any]) -> str | None:
        note = payload.get("note")
        if note is None:
            return None
        if not isinstance(note, str) or len(note) > COLLECTION_NOTE_MAX:
            raise HubError(400, f"A note must be a string of at most {COLLECTION_NOTE_MAX} characters")
        return note
