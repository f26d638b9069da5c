"""Route paths, in one place so controllers, tests and docs agree."""

from urllib.parse import quote

CHAT_COMPLETIONS = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"
MODEL = "/v1/models/{model_id:str}"
HEALTH = "/healthz"  # liveness; READY and METRICS below

#: Header a client may use to declare the purpose of a request (policies read it).
PURPOSE_HEADER = "X-Govgate-Purpose"
#: Header on every completion and error response naming its audit request id.
REQUEST_ID_HEADER = "X-Govgate-Request-Id"
#: The same id under the name OpenAI's clients read (``response._request_id``, ``APIStatusError.request_id``).
OPENAI_REQUEST_ID_HEADER = "x-request-id"
#: The ASGI scope extension (``scope["extensions"]``) where the served gateway's protocol puts its
#: connection's ``is_closing`` (``gateway/http_head.py``), read before a completion is answered.
CONNECTION_CLOSING = "govgate.connection_closing"
#: The scope extension where the served gateway's protocol puts the id it gave the request once its head was
#: read: the app's id (header, audit entries, logs) is that one, so that a 400 the protocol answers for a body
#: whose framing broke names the request its ``rejected`` entry is under.
REQUEST_ID_EXTENSION = "govgate.request_id"

#: The review API (reviewers, auditors, and every key for its own entries).
AUDIT = "/v1/audit"
AUDIT_ENTRIES = "/v1/audit/entries"
AUDIT_REQUEST = "/v1/audit/requests/{request_id:str}"
AUDIT_USAGE = "/v1/audit/usage"
AUDIT_EXPORT = "/v1/audit/export"

#: Key administration (keys with the ``admin`` role).
ADMIN_KEYS = "/admin/keys"
#: One key, relative to :data:`ADMIN_KEYS`.
ADMIN_KEY = "/{key_id:str}"
#: The review console (server-rendered pages for reviewers and auditors).
CONSOLE = "/console"
CONSOLE_QUEUE = "/console/"
CONSOLE_SEARCH = "/console/search"
CONSOLE_REQUEST = "/console/requests/{request_id:str}"
CONSOLE_USAGE = "/console/usage"
CONSOLE_CHAIN = "/console/chain"
CONSOLE_SIGN_IN = "/console/sign-in"
CONSOLE_SIGN_OUT = "/console/sign-out"
CONSOLE_STATIC = "/console/static"
CONSOLE_KEYS = "/console/keys"
CONSOLE_KEY = "/console/keys/{key_id:str}"


def console_request(request_id: str) -> str:
    """The console page of one request (the id quoted for a URL path)."""
    return CONSOLE_REQUEST.replace("{request_id:str}", quote(request_id, safe=""))


def console_key(key_id: str) -> str:
    """The console page of one key (admins)."""
    return CONSOLE_KEY.replace("{key_id:str}", quote(key_id, safe=""))
#: Operations (no key needed): liveness, readiness, Prometheus metrics.
READY = "/readyz"
METRICS = "/metrics"
