"""The HTTP API: OpenAI-compatible controllers and their request shapes."""
