"""Run the real app under uvicorn on an ephemeral port in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from omnistream.cli import uvicorn_options
from omnistream.settings import Settings
from omnistream.transports.app import create_app


@dataclass
class RunningServer:
    """A live server: its base URLs, settings and the app (for state inspection)."""

    host: str
    port: int
    settings: Settings
    app: Any
    server: uvicorn.Server

    @property
    def http(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def state(self) -> Any:
        return self.app.state.omni


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def run_server(**overrides: Any) -> Iterator[RunningServer]:
    """Start omnistream with ``Settings(**overrides)`` and stop it on exit."""
    overrides.setdefault("host", "127.0.0.1")
    overrides.setdefault("port", free_port())
    overrides.setdefault("log_level", "warning")
    settings = Settings(**overrides)
    app = create_app(settings)
    options = uvicorn_options(settings)
    config = uvicorn.Config(app, **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(settings.host, settings.port, settings, app, server)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
