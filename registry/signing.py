"""Signing a published bundle with OpenSSF `model-signing` (the optional extra `registry[sign]`).

The signature is `model.sig` at the root of the published files: a Sigstore bundle (DSSE envelope
around an in-toto statement with one sha256 per file) as model-signing writes it, covering every
other published file; `.gitattributes` and `model.sig` itself are left out. It is written after the
card is rendered, into the folder being published, so it travels in the same Hub commit or local
version. Signers register through the `register_signers` hook; the built-ins are `key` (a local
elliptic-curve private key) and `sigstore` (keyless, with the ambient OIDC identity of a CI job, which
needs the network), chosen by the recipe's `sign: {method: ...}` or `REGISTRY_SIGNING_METHOD`. A
key's path comes from the recipe's `sign: {key: ...}` or `REGISTRY_SIGNING_KEY`; it is never printed,
and only its public key's fingerprint is recorded (the card's `registry.signing_key`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import PublishError
from .hookspecs import hookimpl

if TYPE_CHECKING:
    from .recipe import Recipe

SIGNATURE_FILE = "model.sig"
KEY_VARIABLE = "REGISTRY_SIGNING_KEY"
METHOD_VARIABLE = "REGISTRY_SIGNING_METHOD"
EXTRA_HINT = "install the signing extra: pip install 'registry[sign]'"


@dataclass(frozen=True)
class SigningPlan:
    """How this publish will be signed: the signer, its key (never shown) and the fingerprint the card records."""

    signer: Signer
    key: Path | None
    fingerprint: str | None  # sha256 of the public key's DER SubjectPublicKeyInfo, hex; None for keyless signing

    def sign(self, folder: Path) -> Path:
        """Sign every file of `folder` (hidden ones and an old signature excepted) into folder/model.sig."""
        return self.signer.sign(folder, self.key)


class Signer:
    """A way of signing a folder; plugins subclass it and register it through `register_signers`."""

    name: ClassVar[str]
    needs_key: ClassVar[bool] = True

    def fingerprint(self, key: Path | None) -> str | None:
        """The fingerprint the card records for `key`; raises PublishError when the key cannot be used."""
        return None

    def sign(self, folder: Path, key: Path | None) -> Path:
        """Write folder/model.sig over the folder's published files."""
        raise NotImplementedError


class KeySigner(Signer):
    """A local elliptic-curve private key (PEM), through model-signing's elliptic key signer."""

    name = "key"

    def fingerprint(self, key: Path | None) -> str | None:
        assert key is not None
        _require_model_signing()
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            data = key.read_bytes()
        except OSError as exc:
            raise PublishError(f"cannot read the signing key: {exc.strerror}", _KEY_HINT) from None
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            # The loader's message can quote the key's bytes: say only what is wrong.
            raise PublishError("the signing key is not an unencrypted PEM private key", _KEY_HINT) from None
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise PublishError("the signing key is not an elliptic-curve key", _KEY_HINT)
        return public_key_fingerprint(private.public_key())

    def sign(self, folder: Path, key: Path | None) -> Path:
        from model_signing import signing

        assert key is not None
        return _sign(signing.Config().use_elliptic_key_signer(private_key=key), folder, secret=str(key))


class SigstoreSigner(Signer):
    """Keyless Sigstore signing with the ambient OIDC identity (a GitHub Actions job with `id-token: write`)."""

    name = "sigstore"
    needs_key = False

    def fingerprint(self, key: Path | None) -> str | None:
        _require_model_signing()
        return None

    def sign(self, folder: Path, key: Path | None) -> Path:
        from model_signing import signing

        return _sign(signing.Config().use_sigstore_signer(use_ambient_credentials=True), folder)


_KEY_HINT = f"set sign.key in the recipe or {KEY_VARIABLE} to an EC private key file (secp256r1, secp384r1 or secp521r1)"


def public_key_fingerprint(public_key: Any) -> str:
    """sha256 of a public key's DER SubjectPublicKeyInfo, in hex: what the card's `registry.signing_key` records."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def signing_plan(
    recipe: Recipe, options: list[Any], signers: Mapping[str, Signer], environ: Mapping[str, str] | None = None
) -> SigningPlan | None:
    """How to sign this publish (`signers`: plugins.get_signers()), or None; PublishError when it is required and impossible.

    Cheap (no hashing): called before any work, beside the targets' access checks.
    """
    environ = os.environ if environ is None else environ
    spec = recipe.sign
    required = bool(spec is not None and spec.required) or any(getattr(o, "require_signature", False) for o in options)
    method = (spec.method if spec is not None else None) or environ.get(METHOD_VARIABLE) or KeySigner.name
    signer = signers.get(method)
    if signer is None:
        from .hints import suggest

        hint = suggest(method, list(signers))
        raise PublishError(f"unknown signing method '{method}'" + (f" (did you mean '{hint}'?)" if hint else ""),
                           f"registered: {', '.join(sorted(signers))}")
    key = _key_path(recipe, environ) if signer.needs_key else None
    if signer.needs_key and key is None:
        if required:
            raise PublishError(
                f"{recipe.repo_id} must be signed and no signing key is set; nothing was done", _KEY_HINT,
            )
        return None
    return SigningPlan(signer, key, signer.fingerprint(key))


def _key_path(recipe: Recipe, environ: Mapping[str, str]) -> Path | None:
    from .sources import expand_local

    written = recipe.sign.key if recipe.sign is not None and recipe.sign.key else environ.get(KEY_VARIABLE) or None
    if written is None:
        return None
    base = recipe.path.parent if recipe.path is not None else Path.cwd()
    try:
        return expand_local(written, base)
    except KeyError as exc:
        raise PublishError(f"the signing key's path names ${{{exc.args[0]}}}, which is not set", _KEY_HINT) from None


def _require_model_signing() -> None:
    from importlib.util import find_spec

    # Found, not imported: an unchanged publish never signs, and importing model-signing costs ~0.2 s.
    if find_spec("model_signing") is None:
        raise PublishError("signing needs the model-signing package, which is not installed", EXTRA_HINT)


def _sign(config: Any, folder: Path, secret: str | None = None) -> Path:
    """Sign `folder` with a model-signing signing config; hidden files and the signature itself are not covered."""
    from model_signing import hashing

    signature = folder / SIGNATURE_FILE
    signature.unlink(missing_ok=True)
    # What a target publishes: no hidden file (the staging marker, a lock). The ignored names are
    # recorded in the signature, so model-signing's verifier skips model.sig too.
    hidden = sorted({path.relative_to(folder).as_posix() for path in folder.rglob(".*")})
    ignored = [SIGNATURE_FILE, *hidden]
    config.set_hashing_config(hashing.Config().set_ignored_paths(paths=ignored, ignore_git_paths=True))
    staged = folder.parent / f".{folder.name}.{SIGNATURE_FILE}.{os.getpid()}"
    try:
        config.sign(folder, staged)
        os.replace(staged, signature)
    except PublishError:
        raise
    except Exception as exc:
        # model-signing's messages are about files and formats, never the key's bytes; its path is left out too.
        said = (str(exc).splitlines() or [""])[0]
        if secret:
            said = said.replace(secret, "<signing key>")
        raise PublishError(f"signing {folder.name} failed: {type(exc).__name__}: {said}", "check the key and the model-signing version") from None
    finally:
        staged.unlink(missing_ok=True)
    return signature


@hookimpl
def register_signers(register):
    register(KeySigner())
    register(SigstoreSigner())
