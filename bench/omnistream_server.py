"""``omnistream serve`` as a separate process on a free port, for the bench scripts.

A benchmark measures the server the way users run it: its own process (its own GIL),
started by the real console entry point, with the client in the benchmark's process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def omnistream_server(**env: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start the server with extra ``OMNISTREAM_*``-style environment, yield its address.

    Yields ``("127.0.0.1:PORT", process)`` once ``/healthz`` answers; the process is
    terminated on exit.
    """
    port = free_port()
    environ = os.environ | {"OMNISTREAM_LOG_LEVEL": "warning"} | env
    proc = subprocess.Popen(
        [sys.executable, "-m", "omnistream.cli", "serve", "--port", str(port)],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"http://{address}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("omnistream serve did not start")
            time.sleep(0.2)
        yield address, proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)
