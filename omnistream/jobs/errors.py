"""Errors of offline generation, each with an HTTP status and a stable code."""

from __future__ import annotations

import math


class GenerateError(Exception):
    """A request that cannot run as given; ``status`` maps to HTTP, ``code`` is stable.

    Raised before anything runs (bad inputs, unknown task or model) or while a run
    discovers a problem with its inputs; never for a bug on the server's side.
    """

    def __init__(
        self, status: int, code: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def headers(self) -> dict[str, str] | None:
        """``Retry-After`` for a 429 (the error's own wait, else 5 s)."""
        if self.status != 429:
            return None
        return {"Retry-After": str(max(1, math.ceil(self.retry_after or 5)))}

    def as_dict(self) -> dict[str, str]:
        """The ``error`` object of an error response."""
        return {
            "code": self.code,
            "message": self.message,
            "type": _TYPES.get(self.status, "error"),
        }


_TYPES = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class JobCancelled(Exception):
    """The job was cancelled; the run stops at the step that notices."""
