"""uvicorn's sans-I/O WebSocket protocol, plus the transport control omnistream needs.

Two gaps in the stock protocol matter to a server facing careless clients:

* A client that stops reading fills the socket's send buffer. When the app gives up on
  it and returns, uvicorn calls ``transport.close()``, which waits for the buffer to
  drain before closing: it never drains, so the TCP connection (one fd, megabytes of
  kernel buffer) stays open forever, outside every session cap. This protocol hands the
  app a :class:`ConnectionControl` (``scope["extensions"]["omnistream.transport"]``)
  whose :meth:`~ConnectionControl.abort` drops the connection at once, and aborts by
  itself any connection still lingering :data:`CLOSE_LINGER_S` after the app returned.
  :func:`lingering_connections` counts those in the meantime (a Prometheus gauge).
* A handshake refused with an HTTP response (the ``websocket.http.response`` extension)
  is logged by uvicorn as ``ASGI callable returned without completing handshake``: the
  refusal *is* a completed handshake, so it is marked as one.

Selected with ``uvicorn.run(..., ws=OmnistreamWebSocketProtocol)``
(:func:`omnistream.cli.uvicorn_options`). Under another server the extension is absent
and :mod:`omnistream.transports.ws_common` falls back to plain closes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

TRANSPORT_EXTENSION = "omnistream.transport"

#: How long a connection may stay open after the app is done with it (close handshake,
#: unsent data) before it is aborted. uvicorn's own close handshake timeout.
CLOSE_LINGER_S = 10.0

_lingering: set[OmnistreamWebSocketProtocol] = set()


def lingering_connections() -> int:
    """WebSocket connections the app is done with whose socket is not closed yet."""
    return len(_lingering)


class ConnectionControl:
    """What a WebSocket handler may do to its own TCP connection."""

    def __init__(self, protocol: OmnistreamWebSocketProtocol) -> None:
        self._protocol = protocol

    @property
    def gone(self) -> bool:
        """The peer left or the connection is being torn down: nothing more will arrive."""
        transport = self._protocol.transport
        return self._protocol.disconnected or transport is None or transport.is_closing()

    def abort(self) -> None:
        """Drop the connection now (TCP RST), discarding whatever is still unsent.

        For a peer that stopped reading: a graceful close would wait for it forever.
        """
        self._protocol.abort_connection()


class OmnistreamWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's ``websockets-sansio`` protocol with :class:`ConnectionControl`."""

    _linger_timer: asyncio.TimerHandle | None = None

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope: Any = getattr(self, "scope", None)
        if scope is not None:  # None: the upgrade itself was refused, no app runs
            scope["extensions"][TRANSPORT_EXTENSION] = ConnectionControl(self)

    def abort_connection(self) -> None:
        """Abort the transport unless it is already gone."""
        if not self.disconnected and self.transport is not None:
            self.transport.abort()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message.get("type") == "websocket.http.response.body" and self.close_sent:
            # The HTTP refusal went out: for the server this handshake is complete.
            self.handshake_complete = True

    async def run_asgi(self) -> None:
        await super().run_asgi()
        if not self.disconnected:
            # The app is done; the socket may still wait for a close frame or for unsent
            # data a peer will never read. Count it, and abort it if it outstays.
            _lingering.add(self)
            self._linger_timer = self.loop.call_later(CLOSE_LINGER_S, self.abort_connection)

    def connection_lost(self, exc: Exception | None) -> None:
        _lingering.discard(self)
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)
