"""Sealing what gateway and workers pass through Redis, and the keys for it.

AES-GCM under a key file both sides share, because Redis persists every job
and result; why, and where the key lives: docs/architecture.md, "Processes"
and "Design notes by package" (workers).
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

#: Bytes of a key made by :func:`load_or_create_key` (AES-256; also an HMAC-SHA256 key).
KEY_BYTES = 32
_NONCE_BYTES = 12


class SealError(Exception):
    """A token that this key did not seal (forged, altered, truncated, or another key's)."""


class KeyFileError(ValueError):
    """A key file that holds no usable key (govgate never overwrites one: digests depend on it)."""


class Sealer:
    """Seal and unseal bytes with one AES-GCM key: ``nonce || ciphertext+tag``."""

    def __init__(self, key: bytes) -> None:
        if len(key) not in (16, 24, 32):
            raise ValueError("an AES-GCM key has 16, 24 or 32 bytes")
        # Imported here: processes that only handle key files (the supervisor, a
        # worker's main process) would otherwise hold cryptography's ~6 MB for nothing.
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)

    def seal(self, data: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, None)

    def unseal(self, token: bytes) -> bytes:
        if len(token) < _NONCE_BYTES + 16:
            raise SealError("sealed token too short")
        from cryptography.exceptions import InvalidTag  # already loaded with AESGCM: a dict look-up

        try:
            return self._aead.decrypt(token[:_NONCE_BYTES], token[_NONCE_BYTES:], None)
        except InvalidTag:
            raise SealError("sealed token failed authentication") from None

    def seal_text(self, data: bytes) -> str:
        """:meth:`seal` as ASCII, for JSON messages (Celery's serializer, pub/sub)."""
        return base64.b64encode(self.seal(data)).decode("ascii")

    def unseal_text(self, token: str | bytes) -> bytes:
        try:
            raw = base64.b64decode(token, validate=True)
        except (ValueError, TypeError):
            raise SealError("sealed token is not base64") from None
        return self.unseal(raw)


def load_or_create_key(path: Path) -> bytes:
    """The key in ``path``; a new random one (file 0600, folder 0700) if there is none yet.

    Creation is race-free: the key is written to a private temporary file
    and linked into place, so processes starting together all end up with
    the one key that won.
    """
    path = Path(path)
    try:
        try:
            return _read_key(path)
        except FileNotFoundError:
            pass
        _private_folders(path.parent)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(base64.b64encode(secrets.token_bytes(KEY_BYTES)) + b"\n")
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass  # another process made it first: use theirs
        finally:
            temporary.unlink(missing_ok=True)
        return _read_key(path)
    except OSError as exc:  # a folder where the file should be, no permission, a read-only disk: one clear line
        raise KeyFileError(f"key file {path} cannot be read or made: {exc.strerror or exc}") from None


def _private_folders(folder: Path) -> None:
    """Create ``folder`` and any missing parent as 0700 (``mkdir(parents=True)`` would make parents 0755)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)


def _read_key(path: Path) -> bytes:
    text = path.read_bytes().strip()
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        raise KeyFileError(f"key file {path} does not hold a base64 key") from None
    if len(key) not in (16, 24, 32):
        raise KeyFileError(f"key file {path} holds a key of {len(key)} bytes; 16, 24 or 32 are needed")
    return key
