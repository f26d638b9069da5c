"""What operators watch: Prometheus metrics, the request context, structured logs.

Kept apart from the request path so the hooks there stay one line each
(docs/architecture.md, "Operations").
"""
