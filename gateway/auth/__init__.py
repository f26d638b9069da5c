"""Identity: API keys, the principals they stand for, and the gateway's cache of them."""

from gateway.auth.authenticator import Authenticator
from gateway.auth.key_change_listener import KeyChangeListener
from gateway.auth.keys import ApiKey, IssuedKey, KeyStore, KeyStoreError, Principal
from gateway.auth.principal_cache import PrincipalCache

__all__ = ["ApiKey", "Authenticator", "IssuedKey", "KeyChangeListener", "KeyStore", "KeyStoreError", "Principal",
           "PrincipalCache"]
