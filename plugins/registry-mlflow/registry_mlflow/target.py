"""The `mlflow` target: each publish becomes a new version of a registered model in an MLflow Model Registry.

A version holds the model files as the artifacts of a run (or, with `link_only`, points at the Hub
commit that holds them), the card as its description, and tags naming the recipe, its source pins,
its parents and the smoke results. The alias (default `latest-smoke-passed`) moves to a new version
only when its smoke test passed. The version is created last, after its files are logged and read
back, so a failed publish never leaves a version without its files.

Any MLflow backend works (`MlflowClient(registry_uri=...)`): a tracking server over HTTP, Databricks,
or a database such as `sqlite:///registry.db` with no server at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from pydantic import field_validator

from registry.errors import PublishError
from registry.identity import card_identity
from registry.publish import PIN_FIELDS, Bundle, Published, PublishPlan, PublishResult, Target, TargetOptions

T = TypeVar("T")
TAG = "registry."  # prefix of every tag this target writes
ARTIFACT_PATH = "model"  # the run's artifact folder holding the model files
DEFAULT_ALIAS = "latest-smoke-passed"
# MLflow's SQL schema keeps a version description in VARCHAR(5000): PostgreSQL and MySQL refuse more.
DESCRIPTION_LIMIT = 5000
# A refused connection makes MLflow's REST client retry for about four minutes; ask once, briefly, first.
PROBE_TIMEOUT_S = 10.0
URI_HINT = "set registry_uri in the recipe's mlflow publish entry, or MLFLOW_REGISTRY_URI / MLFLOW_TRACKING_URI"


def check_model_name(name: str) -> str:
    """`name` if MLflow accepts it as a registered model name; else ValueError saying why."""
    if not name.strip():
        raise ValueError("model_name must not be empty")
    if "/" in name or ":" in name:
        suggestion = name.replace("/", "--").replace(":", "-")
        raise ValueError(f"model_name '{name}' may not contain '/' or ':' (MLflow refuses them); use e.g. '{suggestion}'")
    if any(c in name for c in "'\"`\\"):
        raise ValueError(f"model_name '{name}' may not contain quotes or backslashes")
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(".."):
        raise ValueError(f"model_name '{name}' must not look like a relative path (MLflow stores names as paths)")
    return name


def check_alias(alias: str) -> str:
    """`alias` if MLflow accepts it as a registered model alias; else ValueError saying why."""
    if not re.fullmatch(r"[\w\-]{1,255}", alias):
        raise ValueError(f"alias '{alias}' may only contain letters, digits, '_' and '-' (1 to 255 of them)")
    if alias.lower() == "latest":
        raise ValueError(f"alias '{alias}' is reserved by MLflow; choose another, e.g. '{DEFAULT_ALIAS}'")
    if re.fullmatch(r"[vV]\d+", alias):
        raise ValueError(f"alias '{alias}' is reserved by MLflow for version numbers")
    return alias


def default_model_name(repo_id: str) -> str:
    """The registered model name used when the recipe names none: the repo id with '/' as '--'."""
    return repo_id.replace("/", "--")


class MlflowOptions(TargetOptions):
    """Options of the `mlflow` target; unset URIs come from MLFLOW_REGISTRY_URI / MLFLOW_TRACKING_URI."""

    model_name: str | None = None  # default: the recipe's repo id with '/' replaced by '--'
    registry_uri: str | None = None  # default: $MLFLOW_REGISTRY_URI, else the tracking URI
    tracking_uri: str | None = None  # where the run holding the files is logged; default: $MLFLOW_TRACKING_URI, else the registry
    experiment: str = "registry"  # experiment of those runs, created when missing
    artifact_location: str | None = None  # artifact root of that experiment when this target creates it
    alias: str = DEFAULT_ALIAS  # moved to a new version only when its smoke test passed
    link_only: bool = False  # register the Hub commit as the source instead of uploading the files
    hub_revision: str = "main"  # with link_only: the Hub branch or commit that holds this merge

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        return None if value is None else check_model_name(value)

    @field_validator("alias")
    @classmethod
    def _alias(cls, value: str) -> str:
        return check_alias(value)

    @field_validator("experiment", "hub_revision", "registry_uri", "tracking_uri", "artifact_location")
    @classmethod
    def _not_blank(cls, value: str | None, info) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(f"{info.field_name} must not be empty")
        return value


def model_name(options: MlflowOptions, repo_id: str) -> str:
    """The registered model name for a recipe: the option, else derived from the repo id."""
    return options.model_name or check_model_name(default_model_name(repo_id))


def resolve_uris(options: MlflowOptions) -> tuple[str, str]:
    """(registry URI, tracking URI): the recipe's options first, then MLflow's environment variables."""
    env = os.environ
    registry = options.registry_uri or env.get("MLFLOW_REGISTRY_URI") or options.tracking_uri or env.get("MLFLOW_TRACKING_URI")
    if not registry:
        raise PublishError("no MLflow registry URI", URI_HINT)
    tracking = options.tracking_uri or env.get("MLFLOW_TRACKING_URI") or registry
    return registry, tracking


def redact(uri: str) -> str:
    """The URI with any password replaced by ***, for messages."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.password:
        return uri
    netloc = parts.netloc.rsplit("@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc[-1]}"))


class MlflowTarget(Target):
    """Registers each publish as a new version of a registered model in an MLflow Model Registry."""

    name = "mlflow"
    Options = MlflowOptions
    # A version's files are one run's artifacts: a new card means a new version with every file logged
    # again, so a card-only publish is not possible here and the pipeline builds the model for it.
    card_only = False

    def current(self, recipe, merge_id, options) -> Published | None:
        """The newest version of this merge, by its merge and card identity tags (no reports: MLflow keeps them as files)."""
        registry = Registry(options)
        found = registry.find(model_name(options, recipe.repo_id), merge_id)
        if found is None or not found.tags.get(TAG + "card_identity"):
            return None
        return Published(merge_id, found.tags[TAG + "card_identity"])

    def plan(self, bundle: Bundle, options) -> PublishPlan:
        registry = Registry(options)
        name = model_name(options, bundle.repo_id)
        found = registry.find(name, bundle.provenance.merge_identity, card_identity(bundle.card))
        if found is not None:
            return PublishPlan(self.name, registry.location(name, found.version), up_to_date=True)
        upload = [] if options.link_only else sorted(bundle.files)
        return PublishPlan(
            self.name, registry.location(name), up_to_date=False, upload=upload,
            upload_bytes=sum(bundle.files[rel].size for rel in upload),
        )

    def publish(self, bundle: Bundle, options) -> PublishResult:
        registry = Registry(options)
        name = model_name(options, bundle.repo_id)
        model = registry.registered_model(name)
        if model is not None:
            found = registry.find(name, bundle.provenance.merge_identity, card_identity(bundle.card))
            if found is not None:
                return PublishResult(
                    self.name, registry.location(name, found.version), str(found.version), changed=False,
                    detail=f"already published as version {found.version}",
                )
        tags = version_tags(bundle)
        if options.link_only:
            source, hub_tags = hub_source(bundle, options)
            tags.update(hub_tags)
            run_id, card_at = None, f"README.md at {source}"
        else:
            run_id, source = registry.log_files(bundle, options)
            card_at = f"README.md in this version's artifacts ({ARTIFACT_PATH}/README.md)"
        client = registry.client
        try:
            if model is None:
                registry.create_registered_model(name, bundle.repo_id)
            version = registry.call(
                f"register a new version of '{name}'",
                lambda: client.create_model_version(
                    name, source, run_id=run_id, tags=tags, description=version_description(bundle, card_at),
                ),
            ).version
            old = (model.aliases or {}).get(options.alias) if model is not None else None
            gate_failed = bundle.evaluation is not None and not bundle.evaluation.passed
            if bundle.smoke is not None and bundle.smoke.passed and not gate_failed:
                try:
                    registry.call(
                        f"move alias '{options.alias}' of '{name}'",
                        lambda: client.set_registered_model_alias(name, options.alias, str(version)),
                    )
                except PublishError:
                    registry.forget_version(name, version)
                    raise
                detail = f"version {version}; alias '{options.alias}' moved to it"
            else:
                why = "no smoke test" if bundle.smoke is None else "smoke test failed" if not bundle.smoke.passed else "eval gate failed"
                left = f"left at version {old}" if old is not None else "not set"
                detail = f"version {version}; {why}: alias '{options.alias}' {left}"
        except PublishError:
            if run_id is not None:
                registry.abandon_run(run_id)
            raise
        return PublishResult(self.name, registry.location(name, version), str(version), changed=True, detail=detail)


class Registry:
    """An MLflow client for one registry, turning its failures into one-line PublishErrors."""

    def __init__(self, options: MlflowOptions):
        self.registry_uri, self.tracking_uri = resolve_uris(options)
        self.where = redact(self.registry_uri)
        for uri in dict.fromkeys((self.registry_uri, self.tracking_uri)):
            probe(uri)
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one client call; any failure becomes a PublishError naming the registry and the step."""
        try:
            return fn()
        except PublishError:
            raise
        except Exception as exc:
            raise self.error(exc, what) from None

    def error(self, exc: Exception, what: str) -> PublishError:
        """A one-line PublishError for a failed client call (passwords in URIs redacted)."""
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        line = next((ln.strip() for ln in str(message).splitlines() if ln.strip()), type(exc).__name__)
        if self.registry_uri != self.where:
            line = line.replace(self.registry_uri, self.where)
        if _unreachable(exc, line):
            return PublishError(f"cannot reach the MLflow registry at {self.where} to {what}: {line}", URI_HINT)
        return PublishError(f"could not {what} in the MLflow registry at {self.where}: {line}")

    def location(self, name: str, version: int | str | None = None) -> str:
        """Where a model (version) is: its page for a tracking server, else its models:/ URI and registry."""
        if urllib.parse.urlsplit(self.registry_uri).scheme in ("http", "https"):
            page = f"{self.where.rstrip('/')}/#/models/{urllib.parse.quote(name, safe='')}"
            return page + (f"/versions/{version}" if version is not None else "")
        return f"models:/{name}" + (f"/{version}" if version is not None else "") + f" at {self.where}"

    def registered_model(self, name: str):
        """The registered model, or None when there is none by that name."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            if exc.error_code == "INVALID_PARAMETER_VALUE":
                raise PublishError(
                    f"the MLflow registry at {self.where} refused the model name '{name}': {exc.message.splitlines()[0]}",
                    "set a valid model_name in the recipe's mlflow publish entry",
                ) from None
            raise self.error(exc, f"read registered model '{name}'") from None
        except Exception as exc:
            raise self.error(exc, f"read registered model '{name}'") from None

    def find(self, name: str, merge_id: str, card_id: str | None = None):
        """The newest ready version registered from this merge (and, given `card_id`, with this card), or None."""
        query = f"name = '{name}' and tags.`{TAG}merge_identity` = '{merge_id}'"
        found = self.call(f"search the versions of '{name}'", lambda: self.client.search_model_versions(query))
        matching = [v for v in found if v.status == "READY" and card_id in (None, v.tags.get(TAG + "card_identity"))]
        return max(matching, key=lambda v: int(v.version), default=None)

    def versions(self, name: str) -> list:
        """Every version of a registered model, oldest first."""
        found = self.call(f"list the versions of '{name}'", lambda: self.client.search_model_versions(f"name = '{name}'"))
        return sorted(found, key=lambda v: int(v.version))

    def create_registered_model(self, name: str, repo_id: str) -> None:
        """Create the registered model; someone else creating it meanwhile is fine."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                name, tags={TAG + "repo_id": repo_id}, description=f"Merges of {repo_id}, published by registry from its recipe.",
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise self.error(exc, f"create registered model '{name}'") from None
        except Exception as exc:
            raise self.error(exc, f"create registered model '{name}'") from None

    def experiment_id(self, options: MlflowOptions) -> str:
        """The id of the experiment that holds publish runs, created when missing."""
        from mlflow.exceptions import MlflowException

        name = options.experiment
        experiment = self.call(f"read experiment '{name}'", lambda: self.client.get_experiment_by_name(name))
        if experiment is None:
            try:
                return self.client.create_experiment(name, artifact_location=options.artifact_location)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise self.error(exc, f"create experiment '{name}'") from None
            except Exception as exc:
                raise self.error(exc, f"create experiment '{name}'") from None
            experiment = self.call(f"read experiment '{name}'", lambda: self.client.get_experiment_by_name(name))
        if experiment is None or experiment.lifecycle_stage == "deleted":
            raise PublishError(
                f"experiment '{name}' in {redact(self.tracking_uri)} is deleted",
                "restore it (`mlflow experiments restore`) or set another experiment in the recipe's mlflow publish entry",
            )
        return experiment.experiment_id

    def log_files(self, bundle: Bundle, options: MlflowOptions) -> tuple[str, str]:
        """Log the bundle's files to a new run and check they all arrived: (run id, artifact URI of the model)."""
        experiment = self.experiment_id(options)
        run = self.call(
            "start a run",
            lambda: self.client.create_run(
                experiment, run_name=f"publish {bundle.repo_id} {bundle.short_sha}",
                tags={TAG + "repo_id": bundle.repo_id, TAG + "recipe_sha256": bundle.recipe_sha256},
            ),
        )
        run_id = run.info.run_id
        try:
            for rel, entry in sorted(bundle.files.items()):
                folder = posixpath.join(ARTIFACT_PATH, posixpath.dirname(rel)).rstrip("/")
                self.call(f"log {rel}", partial(self._log_file, run_id, rel, entry.path, folder))
            self._check_logged(run_id, bundle)
            if bundle.evaluation is not None:
                metrics = eval_metrics(bundle.evaluation)
                self.call("log the eval scores", lambda: self.client.log_batch(run_id, metrics=metrics))
            self.call("finish the run", lambda: self.client.set_terminated(run_id, "FINISHED"))
        except PublishError:
            self.abandon_run(run_id)
            raise
        return run_id, f"{run.info.artifact_uri.rstrip('/')}/{ARTIFACT_PATH}"

    def _log_file(self, run_id: str, rel: str, path: Path, folder: str) -> None:
        name = posixpath.basename(rel)
        if Path(path).name == name:
            self.client.log_artifact(run_id, str(path), folder)
            return
        # MLflow names an artifact after its local file; give it the name it has in the bundle.
        with tempfile.TemporaryDirectory(prefix="registry-mlflow-") as tmp:
            named = Path(tmp) / name
            shutil.copyfile(path, named)
            self.client.log_artifact(run_id, str(named), folder)

    def _check_logged(self, run_id: str, bundle: Bundle) -> None:
        """Every file is in the artifact store with its size: an upload dropped midway is caught here."""
        stored: dict[str, int | None] = {}
        pending = [ARTIFACT_PATH]
        while pending:
            folder = pending.pop()
            for item in self.call("list the logged files", partial(self.client.list_artifacts, run_id, folder)):
                if item.is_dir:
                    pending.append(item.path)
                else:
                    stored[posixpath.relpath(item.path, ARTIFACT_PATH)] = item.file_size
        for rel, entry in sorted(bundle.files.items()):
            if rel not in stored or stored[rel] not in (None, entry.size):
                have = "is missing" if rel not in stored else f"has {stored[rel]} bytes, not {entry.size}"
                raise PublishError(f"{rel} {have} in the artifact store after logging it; no version was registered", "publish again")

    def abandon_run(self, run_id: str) -> None:
        """Mark a publish run failed and delete it (best effort: the publish is failing already)."""
        for call in (lambda: self.client.set_terminated(run_id, "FAILED"), lambda: self.client.delete_run(run_id)):
            try:
                call()
            except Exception:
                pass

    def forget_version(self, name: str, version: int | str) -> None:
        """Delete a version this publish just created (best effort), so a failure leaves none behind."""
        try:
            self.client.delete_model_version(name, str(version))
        except Exception:
            pass


def probe(uri: str) -> None:
    """Fail fast, with one line, when an http(s) registry does not answer at all."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = host + (f":{parts.port}" if parts.port else "")  # credentials stay out of the probe
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    try:
        urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answered: reachable, whatever it thinks of /health
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        text = getattr(reason, "strerror", None) or str(reason)
        raise PublishError(f"cannot reach the MLflow registry at {redact(uri)}: {text}", URI_HINT) from None


def _unreachable(exc: Exception, line: str) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ConnectionError", "OperationalError", "Timeout"}) or "Max retries exceeded" in line


# ---------------------------------------------------------------------------------------------
# What a version records


def version_tags(bundle: Bundle) -> dict[str, str]:
    """The version's tags: recipe, source pins, parents and smoke results (never a local path)."""
    pins = {alias: {f: pin.get(f) for f in PIN_FIELDS} for alias, pin in sorted(bundle.pins.items())}
    tags = {
        TAG + "repo_id": bundle.repo_id,
        TAG + "recipe_sha256": bundle.recipe_sha256,
        TAG + "merge_identity": bundle.provenance.merge_identity,
        TAG + "card_identity": card_identity(bundle.card),
        TAG + "pins": json.dumps(pins, sort_keys=True, separators=(",", ":")),
        TAG + "sources": "; ".join(f"{alias}={_describe_pin(pin)}" for alias, pin in pins.items()),
        TAG + "smoke": "not run" if bundle.smoke is None else "passed" if bundle.smoke.passed else "failed",
    }
    parents = bundle.metadata.get("base_model")
    if parents:
        tags[TAG + "base_model"] = ", ".join([parents] if isinstance(parents, str) else map(str, parents))
    for check in bundle.smoke.checks if bundle.smoke is not None else []:
        status, reason = check.status, check.reason
        key = TAG + "smoke." + re.sub(r"[^\w.\-]", "_", check.name)
        tags[key] = f"{status}: {reason}" if reason and status != "passed" else status
    if bundle.evaluation is not None:
        evaluation = bundle.evaluation
        tags[TAG + "eval"] = "passed" if evaluation.passed else "failed"
        tags[TAG + "eval.evaluator"] = f"{evaluation.evaluator} {evaluation.evaluator_version}"
    return tags


def eval_metrics(evaluation) -> list:
    """eval.json's scores as MLflow metrics: `eval/TASK/METRIC` (and `_stderr`) for the merge, `parent/ALIAS/...` for its parents."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    found: dict[str, float] = {}
    for prefix, tasks in [("eval", evaluation.tasks), *((f"parent/{alias}", t) for alias, t in evaluation.parents.items())]:
        for task, scores in tasks.items():
            for metric, score in scores.metrics.items():
                key = _metric_key(f"{prefix}/{task}/{metric}")
                if score.value is not None:
                    found[key] = score.value
                if score.stderr is not None:
                    found[key + "_stderr"] = score.stderr
    return [Metric(key, value, now, 0) for key, value in found.items()]


def _metric_key(text: str) -> str:
    """A metric name MLflow accepts (letters, digits, `_ - . : /` and spaces); lm-eval's `exact_match,none` becomes `exact_match_none`."""
    return re.sub(r"[^\w\-.:/ ]", "_", text)


def _describe_pin(pin: dict[str, Any]) -> str:
    if pin.get("kind") == "hub":
        return f"{pin.get('repo_id')}@{pin.get('revision')}"
    return f"local sha256:{pin.get('content_sha256')}"


def version_description(bundle: Bundle, card_at: str) -> str:
    """The card without its front matter (that is in the tags), cut to MLflow's description limit."""
    text = bundle.card
    match = re.match(r"---\n.*?\n---\n", text, re.S)
    body = text[match.end():] if match else text
    body = body.lstrip("\n")
    if len(body) <= DESCRIPTION_LIMIT:
        return body
    note = f"\n\n*The card is cut here to fit MLflow's description limit; the full card is {card_at}.*\n"
    cut = body[: DESCRIPTION_LIMIT - len(note)]
    cut = cut[: cut.rfind("\n")] if "\n" in cut else cut
    return cut.rstrip() + note


# ---------------------------------------------------------------------------------------------
# link_only: the Hub commit as the version's source


def hub_source(bundle: Bundle, options: MlflowOptions) -> tuple[str, dict[str, str]]:
    """The Hub URL of the commit holding exactly this bundle, and tags naming it; error when it is not there."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    repo, rev = bundle.repo_id, options.hub_revision
    first = "publish it to the Hub first (list the hf target before mlflow)"
    try:
        info = HfApi(endpoint=endpoint).model_info(repo, revision=rev, files_metadata=True)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise PublishError(f"link_only: {repo}@{rev} is not on the Hub at {endpoint}", first) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise PublishError(f"link_only: the Hub at {endpoint} answered {status} when reading {repo}@{rev}") from None
    except Exception as exc:
        # The Hub client's transport errors (httpx's) share no base class with OSError.
        names = {cls.__name__ for cls in type(exc).__mro__}
        if not names & {"OSError", "TransportError", "ConnectionError", "TimeoutException"}:
            raise
        raise PublishError(f"link_only: cannot reach the Hub at {endpoint}: {exc}", "check HF_ENDPOINT and the network") from None
    card = info.card_data.to_dict() if info.card_data is not None else {}
    held = (card.get("registry") or {}).get("recipe_sha256") if isinstance(card.get("registry"), dict) else None
    if held != bundle.recipe_sha256:
        what = f"recipe sha256:{held[:12]}" if held else "no registry recipe"
        raise PublishError(f"link_only: {repo}@{rev} on the Hub holds {what}, not this recipe (sha256:{bundle.short_sha})", first)
    remote = {s.rfilename: s for s in info.siblings or []}
    for rel, entry in sorted(bundle.files.items()):
        if not _same_as_remote(entry, remote.get(rel)):
            raise PublishError(f"link_only: {rel} differs in {repo}@{info.sha[:12]} on the Hub", first)
    return f"{endpoint}/{repo}/tree/{info.sha}", {TAG + "hub_repo": repo, TAG + "hub_revision": info.sha}


def _same_as_remote(entry, sibling) -> bool:
    if sibling is None:
        return False
    if sibling.lfs is not None:
        return sibling.lfs.sha256 == entry.sha256
    return sibling.blob_id == _git_blob_sha1(Path(entry.path))


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    digest.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading back (for `registry mlflow versions`)


def fetch_version(ref: str, cache: Path) -> Path:
    """Download the artifacts of version `ref` (MODEL/VERSION) into a fresh folder under `cache`, for `registry verify`."""
    from registry.errors import UsageError

    name, _, version = ref.rpartition("/")
    try:
        check_model_name(name)
    except ValueError as exc:
        raise UsageError(f"mlflow:{ref}: {exc}") from None
    if not version.isdigit():
        raise UsageError(f"mlflow:{ref}: expected mlflow:MODEL/VERSION (a registered model name and a version number)")
    registry = Registry(MlflowOptions())
    found = registry.call(f"read version {version} of '{name}'", lambda: registry.client.get_model_version(name, version))
    if not found.run_id:
        raise UsageError(f"mlflow:{ref}: the version holds no files, it links {found.source}", "verify that Hub commit with hf:REPO@REVISION")
    folder = cache / name / version
    # A fresh folder: a file left from an earlier download would count as an extra published file.
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return Path(registry.call(f"download the files of version {version} of '{name}'",
                              lambda: registry.client.download_artifacts(found.run_id, ARTIFACT_PATH, str(folder))))


def list_versions(options: MlflowOptions, name: str) -> list[dict[str, Any]]:
    """Every version of a registered model as plain data: recipe, smoke result, aliases, source."""
    registry = Registry(options)
    model = registry.registered_model(name)
    if model is None:
        raise PublishError(f"no registered model '{name}' at {registry.where}", "check the name and --registry-uri")
    aliases: dict[str, list[str]] = {}
    for alias, version in sorted((model.aliases or {}).items()):
        aliases.setdefault(str(version), []).append(alias)
    return [
        {
            "version": int(v.version),
            "recipe_sha256": v.tags.get(TAG + "recipe_sha256"),
            "smoke": v.tags.get(TAG + "smoke"),
            "aliases": aliases.get(str(v.version), []),
            "source": v.source,
            "run_id": v.run_id,
            "status": v.status,
        }
        for v in registry.versions(name)
    ]
