"""Identity: API keys and the principals they stand for."""

from gateway.auth.keys import ApiKey, IssuedKey, KeyStore, KeyStoreError, Principal

__all__ = ["ApiKey", "IssuedKey", "KeyStore", "KeyStoreError", "Principal"]
