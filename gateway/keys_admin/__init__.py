"""Key administration for admins: one service the HTTP API (and later the console) calls, and the role rules
it shares with ``govgate keys``."""

from gateway.keys_admin.roles import RolesUnreadable, UnknownRoles, checked_roles, policy_roles
from gateway.keys_admin.service import (ADMIN_ROLE, InvalidField, KeyAdmin, KeyAdminError, KeyChange, KeyIsRevoked,
                                        KeyNotFound, KeyPage, KeysUnavailable, LastAdmin, NotAdmin, UnknownCursor,
                                        UnknownRole)
from gateway.keys_admin.signal import KeyChangeSignal

__all__ = ["ADMIN_ROLE", "InvalidField", "KeyAdmin", "KeyAdminError", "KeyChange", "KeyChangeSignal", "KeyIsRevoked",
           "KeyNotFound", "KeyPage", "KeysUnavailable", "LastAdmin", "NotAdmin", "RolesUnreadable", "UnknownCursor",
           "UnknownRole", "UnknownRoles", "checked_roles", "policy_roles"]
