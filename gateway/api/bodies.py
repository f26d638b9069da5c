"""Reading a request body with the size limit answered in OpenAI's error shape.

Litestar raises its own 413 ``HTTPException`` when a body passes
``request_max_body_size`` (GOVGATE_MAX_BODY_BYTES); every endpoint that reads
a body turns it into the same ``body_too_large`` error here, so the message
names the setting wherever the limit is hit.
"""

from __future__ import annotations

from litestar import Request
from litestar.exceptions import HTTPException

from gateway.api_errors import ApiError


async def read_body(request: Request) -> bytes:
    """The whole body; over the limit: 413 ``body_too_large``."""
    try:
        return await request.body()
    except HTTPException as exc:
        if exc.status_code == 413:
            raise ApiError(413, "body_too_large", "The request body is larger than this gateway accepts "
                           "(GOVGATE_MAX_BODY_BYTES).") from None
        raise
