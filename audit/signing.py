"""The Ed25519 key that signs checkpoints, and the public half a verifier trusts.

The private key lives in one PEM (PKCS #8) file, mode 0600, made at first
start; the public key is exported as PEM for whoever checks checkpoints
elsewhere. A checkpoint names its key by ``key_id`` = hex SHA-256 of the raw
32-byte public key, so a verifier sees at once whether a checkpoint was
signed by the key it trusts. Why a key beside the database is still worth
having, and what it cannot stop: README "Threat model", docs/architecture.md
"Checkpoints".
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import AuditError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

#: Length of a raw Ed25519 public key, and of a signature in bytes.
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class SigningKeyError(AuditError):
    """A signing or public key file that cannot be used (unreadable, not PEM, not Ed25519)."""


def key_id(public_raw: bytes) -> str:
    """Hex SHA-256 of a raw public key: the name a checkpoint gives its signer."""
    return hashlib.sha256(public_raw).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 public key: checks signatures, knows its ``key_id``."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != PUBLIC_KEY_BYTES:
            raise SigningKeyError(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, not {len(self.raw)}")

    @property
    def key_id(self) -> str:
        return key_id(self.raw)

    @property
    def hex(self) -> str:
        return self.raw.hex()

    def verifies(self, message: bytes, signature_hex: str) -> bool:
        """True if ``signature_hex`` is this key's Ed25519 signature of ``message``; never raises for bad input."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            signature = bytes.fromhex(signature_hex)
        except (TypeError, ValueError):
            return False
        if len(signature) != SIGNATURE_BYTES:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM, what ``govgate audit public-key`` writes."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        return Ed25519PublicKey.from_public_bytes(self.raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class SigningKey:
    """The private key; :meth:`sign` returns hex signatures."""

    def __init__(self, private: "Ed25519PrivateKey", path: Path | None = None) -> None:
        from cryptography.hazmat.primitives import serialization

        self._private = private
        self.path = path
        self.public = PublicKey(private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, message: bytes) -> str:
        return self._private.sign(message).hex()

    @classmethod
    def generate(cls) -> "SigningKey":
        """A fresh key in memory (tests; the gateway uses :func:`load_or_create_signing_key`)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    def private_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())


def load_signing_key(path: Path) -> SigningKey:
    """The key in ``path``; :class:`SigningKeyError` if it is missing, unreadable or not an Ed25519 PEM key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read audit signing key {path}: {exc.strerror or exc}") from None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"audit signing key {path} is not an unencrypted PEM private key "
                              f"({type(exc).__name__})") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise SigningKeyError(f"audit signing key {path} is not an Ed25519 key")
    return SigningKey(private, path)


def load_or_create_signing_key(path: Path) -> SigningKey:
    """The key in ``path``, made (0600, folders 0700) if there is no file yet.

    Creation is race-free: the key is written to a private temporary file and
    linked into place, so replicas starting together end up with the one key
    that won. An existing file is never replaced: a bad one is an error,
    because checkpoints already signed depend on the key.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        return load_signing_key(path)
    try:
        _private_folders(path.parent)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(SigningKey.generate().private_pem())
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass  # another process made it first: use theirs
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as exc:
        raise SigningKeyError(f"cannot create audit signing key {path}: {exc.strerror or exc}") from None
    return load_signing_key(path)


def load_public_key(path: Path) -> PublicKey:
    """A public key from a file: PEM (``govgate audit public-key``) or the raw key in hex.

    A private key file is accepted too (its public half is used), so the
    store's own key can be named the same way.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read public key {path}: {exc.strerror or exc}") from None
    text = data.strip()
    if b"PRIVATE KEY" in text:
        return load_signing_key(path).public
    if b"-----BEGIN" not in text:
        try:
            return PublicKey(bytes.fromhex(text.decode("ascii")))
        except (UnicodeDecodeError, ValueError):
            raise SigningKeyError(f"public key {path} is neither PEM nor a hex Ed25519 key") from None
    try:
        public = serialization.load_pem_public_key(text)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"public key {path} is not a PEM public key ({type(exc).__name__})") from None
    if not isinstance(public, Ed25519PublicKey):
        raise SigningKeyError(f"public key {path} is not an Ed25519 key")
    return PublicKey(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def _private_folders(folder: Path) -> None:
    """Create ``folder`` and any missing parent as 0700."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)
