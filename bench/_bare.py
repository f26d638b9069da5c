"""The baseline every overhead figure is divided by: a bare Litestar app under the same uvicorn.

It parses the same body and answers with a chat-completion-shaped document
of similar size, so the difference to govgate is the governance path, not
the framework or JSON handling. Run as ``python -m bench._bare PORT``
(``bench/overhead.py`` starts it so), with the uvicorn options ``govgate
serve`` uses.
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any

CHAT_PATH = "/v1/chat/completions"
HEALTH_PATH = "/healthz"


def baseline_app() -> Any:
    """A Litestar app doing what any JSON endpoint does and nothing else."""
    from litestar import Litestar, get, post

    @post(CHAT_PATH, status_code=200)
    async def chat(data: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(data.get("model", "")),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "x"},
                "finish_reason": "length",
                "logprobs": None,
            }],
            "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
        }

    @get(HEALTH_PATH)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return Litestar(route_handlers=[chat, health], debug=False)


def serve_baseline(port: int, host: str = "127.0.0.1", log_level: str = "info") -> None:
    """Run the baseline with the uvicorn options ``govgate serve`` uses."""
    import uvicorn

    from gateway.http_head import BoundedHttpToolsProtocol

    uvicorn.run(baseline_app(), host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                loop="auto", http=BoundedHttpToolsProtocol)


if __name__ == "__main__":
    serve_baseline(int(sys.argv[1]))
