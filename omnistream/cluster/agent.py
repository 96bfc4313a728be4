"""The HAProxy agent-check port: one line saying whether this node takes sessions.

HAProxy connects to ``agent-port`` every ``agent-inter`` and reads one line. The node
answers ``ready maxconn:<N>`` where N is how many realtime sessions it would hold now
(its session slots, or only those already open once measured capacity is used up), or
``drain`` while it drains; HAProxy's view of a node then follows omnistream's own
admission instead of a static number in the load balancer's config.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 1.0


class AgentServer:
    """A tiny TCP server answering HAProxy agent checks.

    Args:
        host: address to bind (the node's own).
        port: the agent port.
        status: returns the line to answer (without the newline).
    """

    def __init__(self, host: str, port: int, status: Callable[[], str]) -> None:
        self.host = host
        self.port = port
        self.status = status
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Bind and serve (raises ``OSError`` when the port is taken)."""
        self._server = await asyncio.start_server(self._answer, self.host, self.port)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write((self.status() + "\n").encode("ascii"))
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT_S)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), READ_TIMEOUT_S)

    async def aclose(self) -> None:
        """Stop answering."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None


async def ask_agent(host: str, port: int, timeout: float = 2.0) -> str:
    """What an agent port answers (HAProxy's view, for tests and operators)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    return line.decode("ascii", "replace").strip()
