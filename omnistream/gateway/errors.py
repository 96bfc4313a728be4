"""The one error type the gateway raises, carrying the HTTP status and stable code.

Routes turn it into each surface's own error shape (OpenAI's ``{"error": {...}}``,
Anthropic's ``{"type": "error", "error": {...}}``, Ollama's ``{"error": "..."}``); other
callers (the voice-agent session) read ``status``/``code`` directly. Messages never carry
an upstream API key: upstream error bodies are shortened and scrubbed before they are
quoted.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """A request the gateway could not serve.

    Attributes:
        status: HTTP status to answer with (400 invalid_model, 429 rate_limited,
            503 circuit_open, 502 upstream_error…).
        code: stable machine-readable code (the reference's error codes).
        message: human-readable reason, safe to show to the caller.
        retry_after: seconds the caller should wait (``Retry-After``), if known.
        param: the request field at fault, when there is one.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        retry_after: float | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.param = param

    @property
    def error_type(self) -> str:
        """OpenAI's ``error.type`` family for this status."""
        if self.status == 401:
            return "authentication_error"
        if self.status == 403:
            return "permission_error"
        if self.status == 404:
            return "not_found_error"
        if self.status == 429:
            return "rate_limit_error"
        if self.status < 500:
            return "invalid_request_error"
        return "server_error"

    def openai_body(self) -> dict[str, Any]:
        """``{"error": {message, type, code, param}}`` as OpenAI answers."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "code": self.code,
                "param": self.param,
            }
        }

    def anthropic_body(self) -> dict[str, Any]:
        """``{"type": "error", "error": {type, message}}`` as Anthropic answers."""
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            413: "request_too_large",
            429: "rate_limit_error",
            529: "overloaded_error",
        }.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        if self.status == 503:
            kind = "overloaded_error"
        return {"type": "error", "error": {"type": kind, "message": self.message,
                                           "code": self.code}}

    def headers(self) -> dict[str, str]:
        """``Retry-After`` (whole seconds, at least 1) when the caller should wait."""
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, int(self.retry_after + 0.999)))}


def invalid_request(message: str, param: str | None = None,
                    code: str = "invalid_request") -> GatewayError:
    """A 400 for a malformed body: the caller's fault, never retried on another target."""
    return GatewayError(400, code, message, param=param)
