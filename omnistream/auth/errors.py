"""Error bodies in each surface's own shape, so a client's SDK parses our refusals.

OpenAI SDKs read ``{"error":{"message","type","code"}}``, Anthropic's SDK reads
``{"type":"error","error":{"type","message"}}``, the Omni task API documents
``{"error":{"code","message"}}`` and OmniRT (FastAPI) clients read ``{"detail": …}``.
"""

from __future__ import annotations

from typing import Any

from omnistream.auth.policy import Surface

_OPENAI_TYPES = {
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(surface: Surface, status: int, code: str, message: str) -> dict[str, Any]:
    """The JSON body of an error on ``surface``."""
    if surface == "openai":
        fallback = "invalid_request_error" if status < 500 else "server_error"
        kind = _OPENAI_TYPES.get(status, fallback)
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}
    if surface == "anthropic":
        fallback = "invalid_request_error" if status < 500 else "api_error"
        kind = _ANTHROPIC_TYPES.get(status, fallback)
        return {"type": "error", "error": {"type": kind, "message": message}}
    if surface == "omni":
        return {"error": {"code": code, "message": message}}
    return {"detail": message, "code": code}
