"""Route paths, in one place so controllers, tests and docs agree."""

CHAT_COMPLETIONS = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"
MODEL = "/v1/models/{model_id:str}"
HEALTH = "/healthz"  # liveness; READY and METRICS below

#: Header a client may use to declare the purpose of a request (policies read it).
PURPOSE_HEADER = "X-Govgate-Purpose"
#: Header on every completion and error response naming its audit request id.
REQUEST_ID_HEADER = "X-Govgate-Request-Id"

#: The review API (reviewers, auditors, and every key for its own entries).
AUDIT = "/v1/audit"
AUDIT_ENTRIES = "/v1/audit/entries"
AUDIT_REQUEST = "/v1/audit/requests/{request_id:str}"
AUDIT_USAGE = "/v1/audit/usage"
AUDIT_EXPORT = "/v1/audit/export"

#: Operations (no key needed): liveness, readiness, Prometheus metrics.
READY = "/readyz"
METRICS = "/metrics"
