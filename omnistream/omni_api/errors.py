"""Errors of the hosted task API, in its documented shape ``{"error":{"code","message"}}``."""

from __future__ import annotations

import math

from starlette.responses import JSONResponse


class OmniError(Exception):
    """A refusal with an HTTP status, a stable code and a message that says what to change.

    ``retry_after`` (seconds) becomes a ``Retry-After`` header (429 answers carry one).
    """

    def __init__(
        self, status: int, code: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after if retry_after is not None or status != 429 else 5.0

    def response(self) -> JSONResponse:
        """The JSON error response."""
        headers = None
        if self.retry_after is not None:
            headers = {"Retry-After": str(max(1, math.ceil(self.retry_after)))}
        return JSONResponse(
            {"error": {"code": self.code, "message": self.message}},
            status_code=self.status,
            headers=headers,
        )
