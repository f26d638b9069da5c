"""Route paths, in one place so controllers, tests and docs agree."""

CHAT_COMPLETIONS = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"
MODEL = "/v1/models/{model_id:str}"
HEALTH = "/healthz"

#: Header a client may use to declare the purpose of a request (policies read it).
PURPOSE_HEADER = "X-Govgate-Purpose"
#: Header on every completion and error response naming its audit request id.
REQUEST_ID_HEADER = "X-Govgate-Request-Id"
