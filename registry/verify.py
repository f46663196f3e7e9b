"""`registry verify`: check a published model against its own provenance, card, reports and signature.

A target is `hf:REPO[@REV]` (downloaded at that exact commit into the cache), `SCHEME:REF` for a
scheme a plugin registers (`register_verify_sources`, e.g. `mlflow:MODEL/VERSION`), a local-registry
`REPO[@VERSION]`, or a folder. Each check yields one row; a failed row names the file. The verdict is
`verified`, `mismatch` (a file differs from what was published) or `cannot verify` (something needed
to check is missing: no signature where a key was given, a source not at hand for a rebuild).

The signature is OpenSSF model-signing's DSSE bundle `model.sig` at the repo root, covering every
other published file except `.gitattributes`; the card's `registry.signing_key` is the sha256 of the
public key's DER SubjectPublicKeyInfo.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import RegistryError, ReportError, UsageError, VerifyError
from .family import CHART_PNG, CHART_SVG
from .files import sha256_file
from .release import LOCK_FILE, RECIPE_FILE
from .reports import EVAL_FILE, FAMILY_FILE, PROVENANCE_FILE, SMOKE_FILE, Eval, Provenance, Smoke, read
from .signing import SIGNATURE_FILE, public_key_fingerprint

if TYPE_CHECKING:
    from .recipe import Recipe

CARD_FILE = "README.md"
# Files a publish adds beside the merged ones; the merged ones are listed in provenance.json.
BUNDLE_FILES = (CARD_FILE, PROVENANCE_FILE, SMOKE_FILE, RECIPE_FILE, LOCK_FILE, EVAL_FILE, SIGNATURE_FILE,
                FAMILY_FILE, CHART_SVG, CHART_PNG)  # the last three: a family's point
# The Hub adds this to every repo; nothing reads it.
IGNORED_FILES = (".gitattributes",)

Status = Literal["passed", "failed", "unverifiable", "skipped"]
Verdict = Literal["verified", "mismatch", "cannot verify"]


@dataclass(frozen=True)
class Check:
    """One check's outcome: `message` names the file it is about."""

    name: str
    status: Status
    message: str

    def to_dict(self) -> dict[str, str]:
        """The check as JSON-ready data."""
        return {"name": self.name, "status": self.status, "message": self.message}


@dataclass
class Verification:
    """What `verify` found about one target."""

    target: str
    folder: Path
    revision: str | None
    checks: list[Check] = field(default_factory=list)

    @property
    def verdict(self) -> Verdict:
        """mismatch when any check failed, cannot verify when one could not be made, else verified."""
        statuses = {c.status for c in self.checks}
        if "failed" in statuses:
            return "mismatch"
        return "cannot verify" if "unverifiable" in statuses else "verified"

    @property
    def exit_code(self) -> int:
        """0 verified, 1 mismatch, 3 cannot verify (2 is a usage error)."""
        return {"verified": 0, "mismatch": 1, "cannot verify": 3}[self.verdict]

    def to_dict(self) -> dict[str, Any]:
        """The verification as JSON-ready data."""
        return {"target": self.target, "folder": str(self.folder), "revision": self.revision, "verdict": self.verdict,
                "checks": [c.to_dict() for c in self.checks]}


@dataclass(frozen=True)
class Located:
    """A target's files at hand: the folder holding them and the published names (relative, '/'-separated)."""

    folder: Path
    names: tuple[str, ...]
    revision: str | None = None


@dataclass(frozen=True)
class VerifySource:
    """A plugin's target scheme: `fetch(ref, cache_dir)` puts exactly the published files of `SCHEME:REF` in a folder and returns it."""

    name: str
    fetch: Callable[[str, Path], Path]


# ---------------------------------------------------------------------------------------------
# Targets


def locate(target: str) -> Located:
    """The files of `target`: a Hub repo at its exact commit, a plugin's SCHEME:REF, a local-registry version, or a folder."""
    if target.startswith("hf:"):
        repo, _, revision = target[3:].partition("@")
        return _download(repo, revision or None)
    path = Path(target)
    if path.is_dir():
        return Located(path, _walk(path))
    if scheme := re.match(r"([a-z][a-z0-9+.-]*):", target):
        return _fetch(scheme.group(1), target[scheme.end():])
    from . import registry_home
    from .publish.local import checked_version_folder, versions

    repo, _, version = target.partition("@")
    found = versions(None, repo)
    if version:
        found = [entry for entry in found if entry.get("version") == version]
    if not found:
        what = f"version {version} of '{repo}'" if version else f"'{repo}'"
        raise UsageError(f"{target}: not a folder, and {what} is not in the local registry {registry_home()}",
                         "`registry show REPO` lists the versions; use hf:REPO for a Hub repo")
    entry = found[-1]
    folder = checked_version_folder(registry_home(), entry)
    return Located(folder, _walk(folder), entry.get("version"))


def _fetch(scheme: str, ref: str) -> Located:
    """The files of `SCHEME:REF` through the plugin that registered the scheme, in the registry's cache."""
    from .plugins import get_verify_sources
    from .sources import cache_dir

    found = get_verify_sources()
    if scheme not in found:
        known = ", ".join(f"{name}:" for name in ["hf", *sorted(found)])
        raise UsageError(f"{scheme}:{ref}: no installed plugin reads '{scheme}:' targets (known: {known})",
                         "install the plugin that provides it, or pass a folder or a local-registry REPO[@VERSION]")
    folder = found[scheme].fetch(ref, cache_dir() / "verify" / scheme)
    return Located(folder, _walk(folder))


def _walk(folder: Path) -> tuple[str, ...]:
    return tuple(sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()))


def _download(repo: str, revision: str | None) -> Located:
    """Download every file of `repo` at `revision`, pinned to its commit first, into the registry's cache."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .hub_errors import describe
    from .sources import cache_dir

    try:
        # Also keeps the cache folder below inside the cache: a repo id has no '..' or leading '/'.
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise UsageError(f"hf:{repo}: not a Hub repo id ({exc})", "write hf:OWNER/NAME[@REVISION]") from None
    try:
        info = HfApi().model_info(repo, revision=revision)
        names = tuple(sorted(s.rfilename for s in info.siblings or ()))
        # Files land as plain files (not cache symlinks), in a folder keyed by the commit itself.
        folder = cache_dir() / "verify" / repo / info.sha
        snapshot_download(repo, revision=info.sha, local_dir=folder)
    except Exception as exc:
        failure = describe(exc, repo, revision, constants.ENDPOINT)
        if failure is None:
            raise
        raise VerifyError(f"hf:{repo}: {failure.message}") from None
    return Located(folder, names, info.sha)


# ---------------------------------------------------------------------------------------------
# Checks


def verify(
    target: str,
    *,
    key: Path | None = None,
    identity: tuple[str, str] | None = None,
    rebuild: bool = False,
    recipe: Path | None = None,
    sources: Mapping[str, Path] | None = None,
    device: str = "cpu",
    workers: int | None = None,
) -> Verification:
    """Check `target`: files against provenance.json, no extra file, card and reports of this merge, signature, rebuild."""
    if key is not None and identity is not None:
        raise UsageError("--key and --identity check two kinds of signature; pass one of them")
    if key is not None and not key.is_file():
        raise UsageError(f"{key}: no such public key file")
    if recipe is not None and not recipe.is_file():
        raise UsageError(f"{recipe}: no such recipe file")
    located = locate(target)
    result = Verification(target, located.folder, located.revision)
    checks = result.checks
    try:
        provenance = read(Provenance, located.folder)
    except ReportError as exc:
        checks.append(Check("provenance", "failed", str(exc.message)))
        return result
    if provenance is None:
        checks.append(Check("provenance", "unverifiable", f"{PROVENANCE_FILE}: missing, so the files cannot be checked"))
        return result
    checks.append(Check("provenance", "passed", f"{PROVENANCE_FILE}: merge {provenance.merge_identity[:12]}"))
    checks.append(check_files(located.folder, provenance, located.names, workers))
    checks.append(check_extra(provenance, located.names))
    card = _card_metadata(located.folder)
    checks.append(check_card(card, provenance))
    checks.append(check_smoke(located.folder, provenance))
    if EVAL_FILE in located.names:
        checks.append(check_eval(located.folder, provenance))
    if identity is not None:
        checks.append(check_sigstore(located.folder, located.names, *identity))
    else:
        checks.append(check_signature(located.folder, located.names, key, card))
    if rebuild:
        checks.append(check_rebuild(located.folder, provenance, recipe, sources or {}, device))
    return result


def check_files(folder: Path, provenance: Provenance, names: tuple[str, ...], workers: int | None = None) -> Check:
    """Each file provenance.json lists is present, with its sha256."""
    present = set(names)
    missing = [rel for rel in provenance.files if rel not in present]
    if missing:
        return Check("files", "failed", f"{missing[0]}: listed in {PROVENANCE_FILE} but missing"
                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    found = hash_files(folder, list(provenance.files), workers)
    differ = [rel for rel, record in provenance.files.items() if found[rel] != record.sha256]
    if differ:
        rel = differ[0]
        more = f" (and {len(differ) - 1} more: {', '.join(differ[1:])})" if len(differ) > 1 else ""
        return Check("files", "failed", f"{rel}: sha256 {found[rel]}, but {PROVENANCE_FILE} lists {provenance.files[rel].sha256}{more}")
    return Check("files", "passed", f"{len(provenance.files)} files match {PROVENANCE_FILE}")


def hash_files(folder: Path, names: list[str], workers: int | None = None) -> dict[str, str]:
    """sha256 of each of `names` under `folder`, several at once (hashlib releases the GIL)."""
    workers = workers or min(len(names), os.cpu_count() or 1) or 1
    # The largest first, so one big shard does not start last.
    order = sorted(names, key=lambda rel: -(folder / rel).stat().st_size)
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(order, pool.map(lambda rel: sha256_file(folder / rel), order), strict=True))


def check_extra(provenance: Provenance, names: tuple[str, ...]) -> Check:
    """No file beyond those provenance.json lists and the bundle's own, `.gitattributes` aside."""
    allowed = set(provenance.files) | set(BUNDLE_FILES) | set(IGNORED_FILES)
    extra = [rel for rel in names if rel not in allowed]
    if extra:
        return Check("extra files", "failed", f"{extra[0]}: not a published file (not in {PROVENANCE_FILE})"
                     + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return Check("extra files", "passed", "no file beyond those published")


def _card_metadata(folder: Path) -> dict[str, Any] | None:
    """The card's `registry:` front-matter block; None when there is no card or block."""
    from . import frontmatter

    path = folder / CARD_FILE
    if not path.is_file():
        return None
    try:
        data, _ = frontmatter.load(path.read_text(encoding="utf-8", errors="replace"))
    except Exception:  # yaml.YAMLError, imported lazily: a broken block is no block
        return None
    block = (data or {}).get("registry")
    return block if isinstance(block, dict) else None


def check_card(card: dict[str, Any] | None, provenance: Provenance) -> Check:
    """The card's front-matter `registry.merge_identity` is provenance's."""
    if card is None:
        return Check("card", "failed", f"{CARD_FILE}: missing, or without a registry: block in its front matter")
    found = card.get("merge_identity")
    if found != provenance.merge_identity:
        return Check("card", "failed", f"{CARD_FILE}: registry.merge_identity {found}, but {PROVENANCE_FILE} has {provenance.merge_identity}")
    return Check("card", "passed", f"{CARD_FILE}: describes merge {provenance.merge_identity[:12]}")


def check_smoke(folder: Path, provenance: Provenance) -> Check:
    """smoke.json belongs to this merge."""
    try:
        smoke = read(Smoke, folder)
    except ReportError as exc:
        return Check("smoke", "failed", exc.message)
    if smoke is None:
        return Check("smoke", "failed", f"{SMOKE_FILE}: missing")
    if smoke.merge_identity != provenance.merge_identity:
        return Check("smoke", "failed", f"{SMOKE_FILE}: merge_identity {smoke.merge_identity}, but {PROVENANCE_FILE} has {provenance.merge_identity}")
    return Check("smoke", "passed", f"{SMOKE_FILE}: {'passed' if smoke.passed else 'failed (published with --force)'}, for this merge")


def check_eval(folder: Path, provenance: Provenance) -> Check:
    """eval.json (published with an eval: section) belongs to this merge."""
    try:
        evaluation = read(Eval, folder)
    except ReportError as exc:
        return Check("eval", "failed", exc.message)
    if evaluation is None or evaluation.merge_identity != provenance.merge_identity:
        found = evaluation.merge_identity if evaluation is not None else None
        return Check("eval", "failed", f"{EVAL_FILE}: merge_identity {found}, but {PROVENANCE_FILE} has {provenance.merge_identity}")
    gate = "no gate" if not evaluation.gate else "gate passed" if evaluation.passed else "gate failed (published with --force)"
    return Check("eval", "passed", f"{EVAL_FILE}: {evaluation.evaluator} {evaluation.evaluator_version}, {gate}, for this merge")


def key_fingerprint(public_key: Path) -> str:
    """sha256 hex of a PEM public key's DER SubjectPublicKeyInfo (what the card's registry.signing_key holds)."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(public_key.read_bytes())
    except ValueError:
        raise UsageError(f"{public_key}: not a PEM public key", "pass the public half of the signing key") from None
    return public_key_fingerprint(key)


def check_signature(folder: Path, names: tuple[str, ...], key: Path | None, card: dict[str, Any] | None) -> Check:
    """model.sig verifies with `key` over the folder, and `key` is the one the card names."""
    signed = SIGNATURE_FILE in names
    if key is None:
        if signed:
            return Check("signature", "skipped", f"{SIGNATURE_FILE}: not checked; pass --key PUBLIC_KEY.pem to check it")
        return Check("signature", "skipped", f"{SIGNATURE_FILE}: none (the model is not signed)")
    if not signed:
        return Check("signature", "unverifiable", f"{SIGNATURE_FILE}: missing, so the key cannot be checked (the model is not signed)")
    fingerprint = key_fingerprint(key)
    named = (card or {}).get("signing_key")
    if named is not None and named != fingerprint:
        return Check("signature", "failed", f"{CARD_FILE}: registry.signing_key {named}, but the key given has fingerprint {fingerprint}")
    try:
        from model_signing import verifying
    except ImportError:
        return Check("signature", "unverifiable", f"{SIGNATURE_FILE}: model-signing is not installed; pip install 'registry[sign]'")
    # Only the signed files are hashed: model.sig itself, and the Hub client's .cache/ in a download, are not
    # part of the bundle (the extra-files check covers anything else).
    config = verifying.Config().use_elliptic_key_verifier(public_key=key).set_ignore_unsigned_files(True)
    try:
        config.verify(folder, folder / SIGNATURE_FILE)
    except Exception as exc:  # model-signing raises ValueError, and others from its parsers, for a bad signature
        return Check("signature", "failed", f"{SIGNATURE_FILE}: does not verify with {key.name}: {_signature_reason(exc, folder)}")
    return Check("signature", "passed", f"{SIGNATURE_FILE}: signed by key {fingerprint[:12]}")


def check_sigstore(folder: Path, names: tuple[str, ...], identity: str, issuer: str) -> Check:
    """model.sig is a keyless Sigstore signature by `identity` (an e-mail or CI workflow URL) from OIDC `issuer`; needs the network."""
    if SIGNATURE_FILE not in names:
        return Check("signature", "unverifiable", f"{SIGNATURE_FILE}: missing, so the identity cannot be checked (the model is not signed)")
    try:
        from model_signing import verifying
        from sigstore.errors import NetworkError, TUFError
    except ImportError:
        return Check("signature", "unverifiable", f"{SIGNATURE_FILE}: model-signing is not installed; pip install 'registry[sign]'")
    try:
        config = verifying.Config().use_sigstore_verifier(identity=identity, oidc_issuer=issuer).set_ignore_unsigned_files(True)
        config.verify(folder, folder / SIGNATURE_FILE)
    except (NetworkError, TUFError) as exc:
        # Sigstore's trust root (TUF metadata) and transparency log are online: offline, nothing can be concluded.
        return Check("signature", "unverifiable", f"{SIGNATURE_FILE}: a Sigstore signature needs the network to check, "
                                                  f"and it could not be reached ({_signature_reason(exc, folder)})")
    except Exception as exc:  # a bad bundle, another identity, a changed file
        return Check("signature", "failed", f"{SIGNATURE_FILE}: not a Sigstore signature by {identity}: {_signature_reason(exc, folder)}")
    return Check("signature", "passed", f"{SIGNATURE_FILE}: signed by {identity} ({issuer}) through Sigstore")


def _signature_reason(exc: BaseException, folder: Path) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.replace(str(folder) + os.sep, "").replace(str(folder), ".")


# ---------------------------------------------------------------------------------------------
# Rebuild


def check_rebuild(folder: Path, provenance: Provenance, recipe_file: Path | None, given: Mapping[str, Path], device: str) -> Check:
    """Merge again from the published recipe and the pinned sources, and compare every file byte for byte."""
    import filecmp
    import tempfile

    from .identity import merge_identity
    from .merge import merge
    from .sources import plan

    path = recipe_file or folder / RECIPE_FILE
    if not path.is_file():
        return Check("rebuild", "unverifiable", f"{RECIPE_FILE}: not published with this model; pass --recipe FILE to rebuild from one")
    try:
        recipe = _rebuild_recipe(path, provenance, given)
        pinned = plan(recipe, update=True, check_resources=False)
    except RegistryError as exc:  # a source not found or not readable, a recipe that does not validate
        return Check("rebuild", "unverifiable", _one_line(exc))
    for src in pinned.sources:
        want = provenance.sources.get(src.name)
        if want is None:
            return Check("rebuild", "failed", f"{path.name}: source '{src.name}' is not in {PROVENANCE_FILE}")
        if (src.kind, src.pin) != (want.kind, want.pin):
            pinned = f"{want.repo_id}@{want.pin}" if want.kind == "hub" else want.pin
            where = f"the Hub has {src.repo_id}@{src.pin}" if src.kind == "hub" else f"{src.model} holds sha256 {src.pin}"
            return Check("rebuild", "failed", f"source '{src.name}' no longer matches its pin: {PROVENANCE_FILE} pins {pinned}, {where}")
    found = merge_identity(recipe, pinned)
    if found != provenance.merge_identity:
        return Check("rebuild", "failed", f"{path.name}: merge identity {found}, but {PROVENANCE_FILE} has {provenance.merge_identity}")
    with tempfile.TemporaryDirectory(prefix="registry-rebuild-") as tmp:
        out = Path(tmp) / "model"
        try:
            merge(recipe, pinned, out, device)
        except RegistryError as exc:  # not enough disk or memory, a source changed while read
            return Check("rebuild", "unverifiable", f"the merge failed: {_one_line(exc)}")
        for rel in provenance.files:
            if not (out / rel).is_file() or not filecmp.cmp(out / rel, folder / rel, shallow=False):
                return Check("rebuild", "failed", f"{rel}: the rebuilt file differs from the published one")
        made = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {PROVENANCE_FILE}
        if extra := sorted(made - set(provenance.files)):
            return Check("rebuild", "failed", f"{extra[0]}: the rebuild writes it, but {PROVENANCE_FILE} does not list it")
    return Check("rebuild", "passed", f"{len(provenance.files)} files rebuilt bit-identical from {path.name} and the pinned sources")


def _one_line(exc: RegistryError) -> str:
    # A SourceError or RecipeError holds one problem a line (each source that cannot be found): joined here.
    return "; ".join(" ".join(line.split()) for line in str(exc).splitlines() if line.strip())


def _rebuild_recipe(path: Path, provenance: Provenance, given: Mapping[str, Path]) -> Recipe:
    """The recipe at `path`, each source pointed at a folder given, its own (${VAR} set), or its Hub pin."""
    from .plugins import get_targets
    from .recipe import Source, load_recipe, parse_ref

    recipe = load_recipe(path, targets=get_targets())
    if unknown := sorted(set(given) - set(recipe.sources)):
        raise UsageError(f"--source {unknown[0]}: the recipe has no source of that name ({', '.join(sorted(recipe.sources))})")
    sources: dict[str, Source] = {}
    for name, src in recipe.sources.items():
        pin = provenance.sources.get(name)
        if name in given:
            src = src.model_copy(update={"model": str(Path(given[name]).absolute()), "revision": None})
        elif pin is not None and pin.kind == "hub" and parse_ref(src.model).kind == "hub":
            # A Hub source is read at the commit the merge read, whatever the recipe's branch now points at.
            src = src.model_copy(update={"revision": pin.revision})
        sources[name] = src
    # model_copy keeps the recipe's path: relative source paths still resolve from its folder.
    return recipe.model_copy(update={"sources": sources})


def parse_sources(values: list[str]) -> dict[str, Path]:
    """`--source alias=PATH` options as a mapping; a UsageError for one without `=`."""
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--source {value}: expected ALIAS=PATH")
        out[name] = Path(path)
    return out

