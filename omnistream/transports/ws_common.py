"""Shared WebSocket plumbing: bounded receive, timed sends, JSON parsing, model checks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from omnistream.transports.state import AppState, ModelAccessError
from omnistream.transports.ws_protocol import TRANSPORT_EXTENSION, ConnectionControl

T = TypeVar("T")


class ClientGone(Exception):
    """The peer disconnected or stopped reading; the handler should clean up and return."""


@dataclass
class Incoming:
    """One client message: exactly one of ``text`` / ``data`` is set."""

    text: str | None = None
    data: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.text.encode()) if self.text is not None else len(self.data or b"")


async def receive(ws: WebSocket) -> Incoming:
    """Next message from the client.

    Raises:
        ClientGone: the socket closed.
    """
    try:
        message = await ws.receive()
    except (WebSocketDisconnect, RuntimeError) as exc:
        raise ClientGone() from exc
    if message["type"] == "websocket.disconnect":
        raise ClientGone()
    if message.get("bytes") is not None:
        return Incoming(data=message["bytes"])
    return Incoming(text=message.get("text") or "")


async def send_json(ws: WebSocket, payload: dict[str, Any], timeout: float) -> None:
    """Send a JSON text frame; a client that does not take it within ``timeout`` is gone."""
    await _send(ws, {"type": "websocket.send", "text": json.dumps(payload)}, timeout)


async def send_bytes(ws: WebSocket, data: bytes, timeout: float) -> None:
    """Send a binary frame with the same timeout rule as :func:`send_json`."""
    await _send(ws, {"type": "websocket.send", "bytes": data}, timeout)


async def _send(ws: WebSocket, message: dict[str, Any], timeout: float) -> None:
    if ws.application_state != WebSocketState.CONNECTED:
        raise ClientGone()
    try:
        await asyncio.wait_for(ws.send(message), timeout)
    except TimeoutError as exc:
        # The peer stopped reading: a graceful close would wait on it forever, holding
        # the socket and its send buffer. Drop the connection now.
        abort_connection(ws)
        raise ClientGone() from exc
    except (WebSocketDisconnect, RuntimeError, OSError) as exc:
        raise ClientGone() from exc


def _control(ws: WebSocket) -> ConnectionControl | None:
    control = ws.scope.get("extensions", {}).get(TRANSPORT_EXTENSION)
    return control if isinstance(control, ConnectionControl) else None


def abort_connection(ws: WebSocket) -> None:
    """Drop the TCP connection at once (no close handshake, unsent data discarded).

    Under a server without omnistream's protocol (see :mod:`ws_protocol`) this does
    nothing, and the socket closes when the handler returns.
    """
    control = _control(ws)
    if control is not None and not control.gone:
        control.abort()
        metrics = getattr(getattr(ws.app.state, "omni", None), "metrics", None)
        if metrics is not None:
            metrics.ws_aborted.inc()


def client_gone(ws: WebSocket) -> bool:
    """Whether the peer has already left (checked before costly work for a connection).

    Seen without reading from the socket: the server's protocol notices a lost
    connection as soon as the kernel reports it, while a handler busy with an earlier
    message would find out only at its next ``receive``.
    """
    if ws.application_state == WebSocketState.DISCONNECTED:
        return True
    control = _control(ws)
    return control is not None and control.gone


OFFLOAD_BYTES = 64 * 1024  # larger payloads are parsed or decoded in a worker thread


async def off_loop(func: Callable[..., T], *args: Any, size: int) -> T:
    """Run a CPU-bound parse or decode inline when small, in a thread when large.

    A multi-megabyte ``init`` (a base64 reference image) takes tens of milliseconds to
    parse and decode; on the event loop that would stall every other session's frames.
    """
    if size > OFFLOAD_BYTES:
        return await asyncio.to_thread(func, *args)
    return func(*args)


def parse_json(text: str) -> dict[str, Any] | None:
    """The JSON object in a text frame, or ``None`` when it is not JSON at all."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else {"type": value}


async def deny_unless_allowed(ws: WebSocket, state: AppState, model_id: str, task: str) -> bool:
    """Refuse the handshake with the HTTP status of the model check (404/403/503).

    Returns True when the model may be used and the caller should accept the socket.
    """
    try:
        state.resolve_model(model_id, task)
    except ModelAccessError as exc:
        if exc.status == 503 and state.takes_request_checkpoints(model_id):
            return True  # the session's own ``model_path`` may bring the weights
        body = {
            "error": {"message": exc.message, "type": "invalid_request_error", "code": exc.code}
        }
        try:
            await ws.send_denial_response(JSONResponse(body, status_code=exc.status))
        except RuntimeError:  # server without the denial extension: plain 403
            await ws.close(code=1008)
        return False
    return True


CLOSE_TIMEOUT_S = 1.0


async def close_quietly(ws: WebSocket, code: int = 1000) -> None:
    """Close the socket if it is still open, ignoring a peer that already left.

    A peer that stopped reading would block the close frame forever; after a short wait
    the connection is aborted.
    """
    if ws.application_state == WebSocketState.CONNECTED:
        try:
            await asyncio.wait_for(ws.close(code), CLOSE_TIMEOUT_S)
        except TimeoutError:
            abort_connection(ws)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
