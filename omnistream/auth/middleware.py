"""The edge every HTTP request and WebSocket handshake passes, before any route runs.

In order: the browser ``Origin`` check (WebSockets and state-changing requests), the key
(header, ``api_key`` query parameter or ``openai-insecure-api-key.`` subprotocol), the
route's scope, the key's request rate, then for WebSockets a per-key session slot held
for the socket's life, and for HTTP the body size limit enforced while the body streams
in plus a bound on JSON nesting. Refusals are answered before any route code runs (for a
WebSocket, before the upgrade) in the shape of the route's surface.

Because it guards by path, a route added later is covered without doing anything; the
rule table in :mod:`omnistream.auth.policy` fails closed for paths it does not know.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode

import numpy as np
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omnistream.auth import ANONYMOUS, PRINCIPAL_SCOPE_KEY, PUBLIC, Principal, bind_principal
from omnistream.auth.errors import error_body
from omnistream.auth.limits import retry_after_header
from omnistream.auth.policy import (
    EXEMPT_PATHS,
    KEY_OPTIONAL_PATHS,
    SIGNED_PATHS,
    UPLOAD_PATHS,
    RouteRule,
    rule_for,
)
from omnistream.auth.service import AuthService, QuotaExceeded

#: Query parameters that may carry a key; their values never reach a log.
CREDENTIAL_PARAMS = ("api_key",)
#: The subprotocol prefix OpenAI's browser clients use to carry a key or client secret.
SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Scopes whose WebSockets are live sessions and count against a key's ``max_sessions``.
SESSION_SCOPES = frozenset({"realtime", "tts"})
#: JSON bodies above this size are scanned for nesting in a worker thread.
_SCAN_OFF_LOOP_BYTES = 32 * 1024
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = b"[]{}"
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _BRACKETS)


class JsonTooDeep(HTTPException):
    """A JSON body nests deeper than the server parses (400, before any parser sees it)."""

    def __init__(self, limit: int) -> None:
        super().__init__(400, f"JSON body is nested deeper than {limit} levels.")


def json_depth(body: bytes) -> int:
    """How deep ``body``'s arrays and objects nest, without parsing it.

    Strings are removed first (brackets inside them do not count); what remains is
    reduced to brackets and their running balance computed in numpy, so a large body
    costs a few milliseconds and no recursion.
    """
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max())


def _credential(scope: Scope, headers: Headers) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    if headers.get("x-api-key"):
        return headers["x-api-key"].strip()
    query: bytes = scope.get("query_string", b"")
    for name, value in parse_qsl(query.decode("latin-1")):
        if name in CREDENTIAL_PARAMS and value:
            return value
    if scope["type"] == "websocket":
        protocols: list[str] = scope.get("subprotocols", [])
        for proto in protocols:
            if proto.startswith(SUBPROTOCOL_PREFIX) and len(proto) > len(SUBPROTOCOL_PREFIX):
                return proto[len(SUBPROTOCOL_PREFIX):]
    return None


def _redact_query(scope: Scope) -> None:
    """Blank credential values in the query string, in place: access logs read it there."""
    raw = scope.get("query_string", b"")
    if not raw or not any(p.encode() in raw for p in CREDENTIAL_PARAMS):
        return
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    scope["query_string"] = urlencode(
        [(k, "REDACTED" if k in CREDENTIAL_PARAMS else v) for k, v in pairs]
    ).encode("latin-1")


async def _refuse(
    scope: Scope, send: Send, rule: RouteRule, status: int, code: str, message: str,
    retry_after: float | None = None,
) -> None:
    body = json.dumps(error_body(rule.surface, status, code, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", retry_after_header(retry_after).encode()))
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class EdgeMiddleware:
    """Keys, scopes, quotas, Origin, body limits: see the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = getattr(scope["app"].state, "omni", None)
        auth: AuthService | None = getattr(state, "auth", None)
        if auth is None:  # not started yet: nothing to guard with
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        rule = rule_for(path)
        headers = Headers(scope=scope)
        credential = _credential(scope, headers)
        _redact_query(scope)
        is_ws = scope["type"] == "websocket"
        method = scope.get("method", "GET")
        signed = SIGNED_PATHS.match(path) is not None  # the route checks the URL's signature
        exempt = (path in EXEMPT_PATHS or signed
                  or (path == "/metrics" and auth.settings.public_metrics))

        origin = headers.get("origin")
        if (origin and not exempt and (is_ws or method not in SAFE_METHODS)
                and not auth.origin_allowed(origin, headers.get("host"))):
            await _refuse(scope, send, rule, 403, "origin_not_allowed",
                          f"Origin '{origin}' may not use this server (see --allowed-origin).")
            return

        principal: Principal = ANONYMOUS
        preflight = method == "OPTIONS" and origin is not None  # browsers send no key there
        if auth.enabled and (exempt or preflight
                             or (credential is None and KEY_OPTIONAL_PATHS.match(path))):
            principal = PUBLIC  # answered without a key, so granted no scope either
        elif auth.enabled:
            refused = self._authorise(auth, rule, credential)
            if (isinstance(refused, tuple) and refused[2] == 403
                    and KEY_OPTIONAL_PATHS.match(path)):
                refused = PUBLIC  # a key without the scope sees what no key sees
            if isinstance(refused, tuple):
                auth.requests.labels(refused[0], refused[1]).inc()
                await _refuse(scope, send, rule, *refused[2:])
                return
            principal = refused
            auth.requests.labels(principal.name, "ok").inc()
        scope[PRINCIPAL_SCOPE_KEY] = principal
        bind_principal(principal)

        if is_ws:
            await self._websocket(auth, rule, principal, scope, receive, send)
            return
        limit = (upload_body_limit(auth.settings.max_upload_bytes) if UPLOAD_PATHS.search(path)
                 else auth.settings.max_body_bytes)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            # Refused before a byte is read, in the surface's shape (the streaming check
            # below covers bodies that do not declare their length).
            code = "file_too_large" if UPLOAD_PATHS.search(path) else "request_too_large"
            await _refuse(scope, send, rule, 413, code,
                          f"Request body is larger than this route accepts ({limit} bytes).")
            return
        inner = self._json_depth_guard(auth, headers) if _is_json(headers) else self.app
        await RequestBodyLimitMiddleware(inner, limit)(scope, receive, send)

    @staticmethod
    def _authorise(
        auth: AuthService, rule: RouteRule, credential: str | None
    ) -> Principal | tuple[Any, ...]:
        """The principal, or (key, outcome, status, code, message[, retry_after])."""
        if credential is None:
            return ("-", "missing", 401, "invalid_api_key",
                    "No API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.")
        principal = auth.authenticate(credential)
        if principal is None:
            return ("-", "invalid", 401, "invalid_api_key", "Invalid API key.")
        if not principal.has_scope(rule.scope):
            return (principal.name, "forbidden", 403, "insufficient_scope",
                    f"Key '{principal.name}' lacks the '{rule.scope}' scope this route needs.")
        wait = auth.check_rate(principal)
        if wait > 0:
            return (principal.name, "rate_limited", 429, "rate_limited",
                    f"Key '{principal.name}' is over its {principal.requests_per_minute:g} "
                    "requests per minute.", wait)
        return principal

    async def _websocket(
        self, auth: AuthService, rule: RouteRule, principal: Principal,
        scope: Scope, receive: Receive, send: Send,
    ) -> None:
        if rule.scope not in SESSION_SCOPES or principal.max_sessions is None:
            await self.app(scope, receive, send)
            return
        try:
            auth.acquire_session(principal)
        except QuotaExceeded as exc:
            await _refuse(scope, send, rule, 429, "rate_limited", exc.message, exc.retry_after)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            auth.release_session(principal)

    def _json_depth_guard(self, auth: AuthService, headers: Headers) -> ASGIApp:
        limit = auth.settings.max_json_depth
        app = self.app

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            parts: list[bytes] = []

            async def receive_checked() -> Message:
                message = await receive()
                if message["type"] == "http.request":
                    parts.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        body = b"".join(parts)
                        parts.clear()
                        depth = (await asyncio.to_thread(json_depth, body)
                                 if len(body) > _SCAN_OFF_LOOP_BYTES else json_depth(body))
                        if depth > limit:
                            raise JsonTooDeep(limit)
                return message

            await app(scope, receive_checked, send)

        return guarded


def _is_json(headers: Headers) -> bool:
    return "json" in headers.get("content-type", "").lower()


def upload_body_limit(max_upload_bytes: int) -> int:
    """The body limit of a route that takes files: base64 in JSON is 4/3 the bytes."""
    return max_upload_bytes * 4 // 3 + 64 * 1024
