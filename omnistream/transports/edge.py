"""Mount the edge on an app: keys and limits, CORS, error shapes, client secrets.

Errors raised as ``HTTPException`` or request validation failures are rendered in the
shape of the surface the path belongs to (see :mod:`omnistream.auth.errors`), so a body
limit or a malformed body reads the same to a client's SDK as the route's own errors.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from omnistream.auth import principal_of
from omnistream.auth.errors import error_body
from omnistream.auth.middleware import EdgeMiddleware
from omnistream.auth.policy import UPLOAD_PATHS, rule_for
from omnistream.settings import Settings
from omnistream.transports.state import get_state

router = APIRouter()

_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 429: "rate_limited"}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    surface = rule_for(request.url.path).surface
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    code = _CODES.get(status, "http_error")
    if status == 413:
        limit = request.scope.get(MAX_BODY_SIZE_SCOPE_KEY)
        message = (f"Request body is larger than this route accepts ({limit} bytes)."
                   if limit else "Request body too large.")
        code = "file_too_large" if UPLOAD_PATHS.search(request.url.path) else "request_too_large"
    elif status == 400 and "nested" in message:
        code = "json_too_deep"
    if surface == "omnirt" and status != 413 and code != "json_too_deep":
        body: dict[str, Any] = {"detail": exc.detail}
    else:
        body = error_body(surface, status, code, message)
    return JSONResponse(body, status_code=status, headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    surface = rule_for(request.url.path).surface
    if surface == "omnirt":
        return await request_validation_exception_handler(request, exc)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = f"{where}: {first.get('msg', 'invalid value')}" if where else str(
        first.get("msg", "Invalid request body.")
    )
    return JSONResponse(error_body(surface, 400, "invalid_request", message), status_code=400)


class ExpiresAfter(BaseModel):
    """OpenAI's ``expires_after``: seconds after creation."""

    anchor: str = "created_at"
    seconds: int = Field(600, ge=1, le=7200)


class ClientSecretRequest(BaseModel):
    """``POST /v1/realtime/client_secrets`` (OpenAI's shape; ``session`` is echoed)."""

    expires_after: ExpiresAfter | None = None
    session: dict[str, Any] | None = None


@router.post("/v1/realtime/client_secrets")
async def client_secrets(request: Request, body: ClientSecretRequest | None = None) -> Response:
    """Mint a short-lived secret a browser may use instead of a key (realtime routes only).

    The page passes it as the ``api_key`` query parameter or the
    ``openai-insecure-api-key.<secret>`` WebSocket subprotocol.
    """
    state = get_state(request)
    body = body or ClientSecretRequest()
    ttl = (body.expires_after.seconds if body.expires_after
           else state.settings.client_secret_ttl_s)
    value, expires_at = state.auth.secrets.mint(principal_of(request), ttl)
    return JSONResponse(
        {
            "value": value,
            "expires_at": int(expires_at),
            "created_at": int(time.time()),
            "session": body.session or {"type": "realtime"},
        }
    )


def install_edge(app: FastAPI, settings: Settings) -> None:
    """Add the edge middleware (and CORS, when origins are set) and the error shapes."""
    app.add_middleware(EdgeMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["authorization", "x-api-key", "content-type", "idempotency-key"],
            expose_headers=["retry-after", "x-audio-sample-rate"],
        )
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.include_router(router)
