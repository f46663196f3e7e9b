"""The `hf` target: the Hugging Face Hub (or any server speaking its API, via HF_ENDPOINT).

One publish is one atomic commit of every file whose content differs from the remote one, made on
top of the revision's head as it was read (`parent_commit`), so a concurrent push is a clear conflict
and never a silent overwrite; a card-only publish is a commit of README.md alone. Before anything
heavy runs, `whoami` tells whether the token may write to the repo's namespace, and `current` reads
back what the repo holds under this merge identity (the card's `registry.merge_identity`, then
`provenance.json` checked against the remote file hashes, `smoke.json` and `README.md`), from which
the pipeline decides whether anything is to be sent. A commit deletes only the files
an earlier publish recorded in the remote `provenance.json`; anyone else's files are kept.

A family (weight sweep) is also a Collection in its points' namespace, titled with the family name:
found by title, created when missing, each published point a model item whose note gives its weights
(and NLL). Publishing it again adds nothing and only rewrites a note that changed.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import PublishError, ReportError
from ..hookspecs import hookimpl
from . import CARD_NAME, Bundle, Published, PublishPlan, PublishResult, Target, TargetOptions, published, release_files

if TYPE_CHECKING:
    from ..reports import Family, FamilyRow, Report

    R = TypeVar("R", bound=Report)

if TYPE_CHECKING:
    from ..hub_errors import HubFailure

T = TypeVar("T")
MAX_ATTEMPTS = 5
MAX_DELAY_S = 60.0
# The Hub's limits on a collection item's note and a collection's description (huggingface_hub documents them).
NOTE_MAX = 500
DESCRIPTION_MAX = 150


class HfOptions(TargetOptions):
    """Options of the `hf` target."""

    private: bool = False
    revision: str | None = None
    create_pr: bool = False


class HfTarget(Target):
    """Publishes to a Hub model repo in one atomic commit."""

    name = "hf"
    Options = HfOptions
    card_only = True

    def __init__(self, *, sleep: Callable[[float], None] = time.sleep):
        self._api = None
        self._token: str | None = None
        self._sleep = sleep

    # -- what is there already ----------------------------------------------------------------

    def check_access(self, recipe, options) -> None:
        """Refuse a token that cannot write to the recipe's repo, before any merge."""
        from huggingface_hub.errors import HfHubHTTPError

        api = self._client()

        def whoami():
            try:
                return api.whoami()
            except HfHubHTTPError as exc:
                if exc.response is not None and exc.response.status_code == 404:
                    return None  # a server without whoami: the commit will tell
                raise

        identity = self._retry(whoami, "check the token")
        reason = write_refusal(identity, recipe.repo_id, pull_request=options.create_pr) if identity else None
        if reason is not None:
            namespace = recipe.repo_id.split("/")[0]
            raise PublishError(
                f"the token cannot write to {namespace}: {reason}; nothing was merged or sent",
                f"use a token with write access to {namespace}: `hf auth login` or HF_TOKEN",
            )

    def current(self, recipe, merge_id, options) -> Published | None:
        """The remote card and reports when the revision holds an intact build with this merge identity."""
        info = self._remote_info(recipe.repo_id, options)
        # The card names its merge: another one means no download at all.
        if info is None or _card_registry(info).get("merge_identity") != merge_id:
            return None
        from ..reports import Eval, Provenance, Smoke

        provenance = self._remote_report(Provenance, recipe.repo_id, info.sha)
        # The card and the weights beside it must describe the same merge.
        if provenance is None or provenance.merge_identity != merge_id:
            return None
        remote = _remote_files(info)
        for rel, meta in provenance.files.items():
            have = remote.get(rel)
            if have is None or have["size"] != meta.size or (have["sha256"] is not None and have["sha256"] != meta.sha256):
                return None
        card = self._remote_text(recipe.repo_id, CARD_NAME, info.sha)
        if card is None:
            return None
        evaluation = self._remote_report(Eval, recipe.repo_id, info.sha) if recipe.eval is not None else None
        return published(merge_id, card, provenance, self._remote_report(Smoke, recipe.repo_id, info.sha), evaluation)

    def plan(self, bundle: Bundle, options) -> PublishPlan:
        info = self._remote_info(bundle.repo_id, options)
        remote = _remote_files(info) if info is not None else {}
        upload = [rel for rel, f in sorted(bundle.files.items()) if not _same_file(f, remote.get(rel))]
        missing = [rel for rel in upload if bundle.files[rel].path is None]
        if missing:
            raise PublishError(
                f"{bundle.repo_id} on the Hub lacks {missing[0]}, which this card-only publish keeps and does not have here",
                "run `registry publish` again: it will rebuild the model",
            )
        extra = sorted(rel for rel in remote if rel not in bundle.files and rel != ".gitattributes")
        # Only what an earlier publish put there goes; a file someone else committed is theirs to remove.
        ours = self._published_files(bundle.repo_id, info) if extra else set()
        delete = [rel for rel in extra if rel in ours]
        return PublishPlan(
            self.name, self._url(bundle.repo_id, options), up_to_date=not upload and not delete,
            upload=upload, delete=delete, upload_bytes=sum(bundle.files[rel].size for rel in upload),
            kept=[rel for rel in extra if rel not in ours],
        )

    def _published_files(self, repo_id: str, info) -> set[str]:
        """The files the remote provenance.json lists: what an earlier publish of this tool put there."""
        if info is None:
            return set()
        from ..reports import Provenance

        provenance = self._remote_report(Provenance, repo_id, info.sha)
        return set(provenance.files) | set(release_files()) if provenance is not None else set()

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, bundle: Bundle, options) -> PublishResult:
        api = self._client()
        repo_id, revision = bundle.repo_id, options.revision or "main"
        self._retry(lambda: api.create_repo(repo_id, private=options.private, exist_ok=True), "create the repo", repo_id)
        if revision != "main":
            self._retry(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), f"create branch {revision}", repo_id)
        info = self._remote_info(repo_id, options)
        if info is None:
            raise PublishError(f"{repo_id}@{revision} cannot be read back after creating it")
        plan = self.plan(bundle, options)
        if plan.up_to_date and _card_recipe_sha(info) == bundle.recipe_sha256:
            return PublishResult(self.name, plan.location, info.sha, changed=False, detail="already published", kept=plan.kept,
                                 repo_id=repo_id)
        commit = self._commit(bundle, options, parent=info.sha, plan=plan)
        if options.create_pr:
            return PublishResult(self.name, commit.pr_url or plan.location, commit.pr_revision, changed=True,
                                 detail="pull request opened", kept=plan.kept, repo_id=repo_id)
        tag = f"recipe-{bundle.short_sha}"
        self._retry(lambda: api.create_tag(repo_id, tag=tag, revision=commit.oid, exist_ok=True), f"tag {tag}", repo_id)
        return PublishResult(self.name, plan.location, commit.oid, changed=True, detail=f"tagged {tag}", kept=plan.kept,
                             repo_id=repo_id)

    # -- families -------------------------------------------------------------------------------

    def publish_family(self, family: Family, results: list[PublishResult], options) -> PublishResult | None:
        """The family as a Collection in its points' namespace: created if missing, one item per published point."""
        published = {r.repo_id for r in results if r.repo_id}
        rows = [row for row in family.points if row.repo_id in published]
        if not rows:
            return None
        by_namespace: dict[str, list[FamilyRow]] = {}
        for row in rows:
            by_namespace.setdefault(str(row.repo_id).split("/")[0], []).append(row)
        done = [self._collect(family, namespace, found, options) for namespace, found in by_namespace.items()]
        changed = [d for d in done if d[2]]
        detail = "; ".join(d[2] for d in changed) if changed else "collection up to date"
        first = done[0]
        return PublishResult(self.name, first[0], first[1], changed=bool(changed), detail=detail,
                             notes=[f"also collection {d[1]}" for d in done[1:]])

    def _collect(self, family: Family, namespace: str, rows: list[FamilyRow], options) -> tuple[str, str, str]:
        """Make the collection of `family` in `namespace` hold `rows` with their notes: (url, slug, what changed or "")."""
        api = self._client()
        where = f"the collection {family.family} of {namespace}"
        collection = self._find_collection(family.family, namespace, where)
        created = collection is None
        if collection is None:
            description = f"Merge family: weights of {', '.join(family.aliases)} swept; one model per point"
            collection = self._retry(
                lambda: api.create_collection(family.family, namespace=namespace, description=description[:DESCRIPTION_MAX],
                                              private=options.private, exists_ok=True),
                "create the collection", where)
        slug = collection.slug
        items = {i.item_id: i for i in collection.items if i.item_type == "model"}
        added = updated = 0
        for row in rows:
            note, have = family_note(row), items.get(str(row.repo_id))
            if have is None:
                self._retry(lambda row=row, note=note: api.add_collection_item(slug, row.repo_id, "model", note=note, exists_ok=True),
                            f"add {row.repo_id} to the collection", where)
                added += 1
            elif have.note != note:
                self._retry(lambda have=have, note=note: api.update_collection_item(slug, have.item_object_id, note=note),
                            f"update the note of {row.repo_id} in the collection", where)
                updated += 1
        parts = (["created"] if created else []) + ([f"{added} added"] if added else []) + ([f"{updated} notes updated"] if updated else [])
        return collection.url, slug, f"collection {', '.join(parts)}" if parts else ""

    def _find_collection(self, title: str, namespace: str, where: str):
        """The namespace's collection titled `title`, with all its items; None when it has none."""
        api = self._client()
        listed = self._retry(lambda: [c for c in api.list_collections(owner=namespace) if c.title == title],
                             "list the collections", where)
        if not listed:
            return None
        # A listing shows a few items of each collection; the collection itself shows all.
        return self._retry(lambda: api.get_collection(listed[0].slug), "read the collection", where)

    def _commit(self, bundle: Bundle, options, *, parent: str, plan: PublishPlan):
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.errors import HfHubHTTPError

        api = self._client()
        repo_id, revision = bundle.repo_id, options.revision or "main"

        def operations():
            # create_commit mutates its operations: build them afresh for every attempt. Only what
            # differs is sent: a card-only publish is one commit of README.md (and whatever else changed).
            ops: list[Any] = [CommitOperationAdd(rel, str(bundle.files[rel].path)) for rel in plan.upload]
            ops += [CommitOperationDelete(rel) for rel in plan.delete]
            return ops

        for attempt in range(MAX_ATTEMPTS):
            try:
                return api.create_commit(
                    repo_id, operations(), commit_message=bundle.commit_message(), revision=revision,
                    parent_commit=None if options.create_pr else parent, create_pr=options.create_pr,
                )
            except HfHubHTTPError as exc:
                found = self._failure(exc, repo_id, revision)
                if found.kind == "conflict":
                    raise PublishError(
                        f"{repo_id}@{revision} changed while publishing (someone else pushed); "
                        "nothing was committed: run `registry publish` again to publish on top of it"
                    ) from None
                if not found.retryable or attempt == MAX_ATTEMPTS - 1:
                    raise self._error(found, "commit") from None
                failure: BaseException = exc
            except RuntimeError as exc:
                # An LFS upload failed after the client's own retries: no commit was attempted.
                cause = self._redact(str(exc.__cause__ or exc).splitlines()[0])
                raise PublishError(
                    f"{exc} ({cause}); nothing was committed", "run `registry publish` again; uploaded files are not re-sent"
                ) from None
            except Exception as exc:  # a dropped connection: the commit may or may not have landed
                from ..hub_errors import is_transport_error

                if not is_transport_error(exc):
                    raise
                if attempt == MAX_ATTEMPTS - 1:
                    raise PublishError(
                        f"the connection to the Hub dropped {MAX_ATTEMPTS} times during the commit; nothing was committed",
                        "check the network and run `registry publish` again",
                    ) from None
                failure = exc
            landed = self._landed(bundle, options, parent)
            if landed is not None:
                return landed
            self._sleep(_delay(failure, attempt))
        raise AssertionError("unreachable")

    def _landed(self, bundle: Bundle, options, parent: str):
        """After an ambiguous failure: the commit, if it landed; None to retry; error if someone else pushed."""
        from huggingface_hub import CommitInfo

        if options.create_pr:
            return None  # a retried PR at worst opens a second PR; never a wrong main
        info = self._remote_info(bundle.repo_id, options)
        if info is None or info.sha == parent:
            return None
        if _card_recipe_sha(info) == bundle.recipe_sha256 and not self.plan(bundle, options).upload:
            return CommitInfo(commit_url="", commit_message=bundle.commit_message(), commit_description="", oid=info.sha)
        raise PublishError(
            f"{bundle.repo_id}@{options.revision or 'main'} changed while publishing (someone else pushed); "
            "run `registry publish` again to publish on top of it"
        )

    # -- plumbing -----------------------------------------------------------------------------

    def _client(self):
        if self._api is None:
            from huggingface_hub import HfApi, get_token

            self._token = os.environ.get("HF_TOKEN") or get_token()
            if not self._token:
                raise PublishError("no Hub token: run `hf auth login` or set HF_TOKEN")
            self._api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=self._token)
        return self._api

    def _url(self, repo_id: str, options) -> str:
        from huggingface_hub import constants

        base = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        rev = options.revision
        return f"{base}/{repo_id}" + (f"/tree/{rev}" if rev and rev != "main" else "")

    def _remote_info(self, repo_id: str, options):
        """model_info of the target revision, or None when the repo or revision does not exist."""
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        api = self._client()
        try:
            return self._retry(
                lambda: api.model_info(repo_id, revision=options.revision or "main", files_metadata=True),
                f"read {repo_id}", repo_id,
            )
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return None

    def _remote_text(self, repo_id: str, name: str, sha: str) -> str | None:
        """A small file published at `sha` as text; None when there is none."""
        from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError

        api = self._client()
        try:
            path = self._retry(lambda: api.hf_hub_download(repo_id, name, revision=sha), f"read {name}", repo_id)
            return Path(path).read_bytes().decode("utf-8")
        except (RemoteEntryNotFoundError, UnicodeDecodeError):
            return None
        except HfHubHTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                return None
            raise

    def _remote_report(self, kind: type[R], repo_id: str, sha: str) -> R | None:
        """The `kind` report published at `sha`; None when there is none, or it is corrupt or of another format (not current)."""
        text = self._remote_text(repo_id, kind.FILE, sha)
        if text is None:
            return None
        try:
            from ..reports import parse

            return parse(kind, text, f"{repo_id}@{sha[:12]}/{kind.FILE}")
        except ReportError:
            return None

    def _retry(self, call: Callable[[], T], what: str, repo_id: str | None = None) -> T:
        """Run a Hub call, retrying 429, 5xx and dropped connections with backoff that honours Retry-After."""
        from ..hub_errors import ANSWERS

        for attempt in range(MAX_ATTEMPTS):
            try:
                return call()
            except Exception as exc:
                found = self._failure(exc, repo_id)
                if found is None or found.kind in ANSWERS:
                    raise  # not the Hub's; or an answer the caller knows the meaning of (no such repo, revision, file)
                if not found.retryable or attempt == MAX_ATTEMPTS - 1:
                    raise self._error(found, what) from None
                self._sleep(_delay(exc, attempt))
        raise AssertionError("unreachable")

    def _failure(self, exc: BaseException, repo_id: str | None, revision: str | None = None) -> HubFailure | None:
        from ..hub_errors import describe

        return describe(exc, repo_id or "the repo", revision, os.environ.get("HF_ENDPOINT") or None)

    def _error(self, failure: HubFailure, what: str) -> PublishError:
        """The failure as one line; the token's own value never appears in it."""
        if failure.kind in ("unauthorized", "forbidden"):
            return PublishError(self._redact(failure.message))
        return PublishError(self._redact(f"cannot {what}: {failure.message}"))

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text


def family_note(row: FamilyRow) -> str:
    """A point's note in its family's collection: its weights, and its NLL when measured (`cos=0.3 fmt=0.7 · NLL 0.302`)."""
    # Three decimals, as the family table and the card show an NLL.
    note = row.label + (f" · NLL {row.nll:.3f}" if row.nll is not None else "")
    return note if len(note) <= NOTE_MAX else note[:NOTE_MAX - 1] + "…"


WRITE_ROLES = ("write", "admin", "contributor")  # org roles that may create repos (a contributor: and write its own)


def write_refusal(identity: dict[str, Any], repo_id: str, *, pull_request: bool = False) -> str | None:
    """Why the token `identity` (whoami-v2) cannot write to repo_id's namespace; None when it can or cannot be told."""
    namespace = repo_id.split("/")[0]
    user = identity.get("name")
    auth = identity.get("auth") if isinstance(identity.get("auth"), dict) else {}
    token = auth.get("accessToken") if isinstance(auth.get("accessToken"), dict) else {}
    role = token.get("role")
    if role == "read":
        return "it is a read-only token"
    if role == "fineGrained":
        fine = token.get("fineGrained") if isinstance(token.get("fineGrained"), dict) else {}
        granted = set(fine.get("global") or [])
        for scope in fine.get("scoped") or []:
            if isinstance(scope, dict) and (scope.get("entity") or {}).get("name") in (namespace, repo_id):
                granted.update(scope.get("permissions") or [])
        needed = ("repo.write", "discussion.write") if pull_request else ("repo.write",)
        if not granted & set(needed):
            return f"the fine-grained token has no {' or '.join(needed)} permission on {namespace}"
    if pull_request or namespace == user:
        return None  # anyone who may write opens pull requests; a user's own namespace is theirs
    orgs = {o.get("name"): o.get("roleInOrg") for o in identity.get("orgs") or [] if isinstance(o, dict)}
    if namespace not in orgs:
        return f"{user} is not a member of {namespace}"
    if orgs[namespace] is not None and orgs[namespace] not in WRITE_ROLES:
        return f"{user} has the {orgs[namespace]} role in {namespace}"
    return None


def _card_registry(info) -> dict[str, Any]:
    """The remote card's `registry:` block (recipe_sha256, merge_identity), empty when it has none."""
    data = info.card_data.to_dict() if info.card_data is not None else {}
    registry = data.get("registry")
    return registry if isinstance(registry, dict) else {}


def _card_recipe_sha(info) -> str | None:
    return _card_registry(info).get("recipe_sha256")


def _remote_files(info) -> dict[str, dict[str, Any]]:
    """Remote files: sha256 for LFS files, git blob id for the rest."""
    out = {}
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        out[sibling.rfilename] = {
            "sha256": lfs.sha256 if lfs is not None else None,
            "blob_id": sibling.blob_id,
            "size": lfs.size if lfs is not None else sibling.size,
        }
    return out


def _same_file(local, remote: dict[str, Any] | None) -> bool:
    if remote is None:
        return False
    if remote["sha256"] is not None:
        return remote["sha256"] == local.sha256
    if local.path is None:
        # Kept from the published version, whose provenance `current` checked against these files.
        return remote["size"] == local.size
    return remote["blob_id"] == _git_blob_sha1(local.path)


def _git_blob_sha1(path) -> str:
    digest = hashlib.sha1()
    size = os.path.getsize(path)
    digest.update(f"blob {size}\0".encode())
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _delay(exc: BaseException, attempt: int) -> float:
    response = getattr(exc, "response", None)
    retry_after = response.headers.get("Retry-After") if response is not None else None
    if retry_after:
        try:
            return min(float(retry_after), MAX_DELAY_S)
        except ValueError:
            pass
    return min(2.0 ** attempt + random.uniform(0, 0.5), MAX_DELAY_S)


@hookimpl
def register_targets(register):
    register(HfTarget)
