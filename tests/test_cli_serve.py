"""`omnistream serve` as a user runs it: flags and environment, log line, clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.server import free_port


def test_serve_prints_where_to_connect_and_answers() -> None:
    port = free_port()
    env = dict(os.environ, OMNISTREAM_MAX_SESSIONS="3", OMNISTREAM_LOG_LEVEL="info")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "omnistream.cli",
            "serve",
            "--port",
            str(port),
            "--model-tier",
            "core",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert ready is not None, "server never answered"
        assert ready["allowed_model_tiers"] == ["core"]
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json()["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    assert f"ws://127.0.0.1:{port}/" in output
    assert f"ws://127.0.0.1:{port}/v1/avatar/realtime" in output
    assert proc.returncode == 0


def test_serve_rejects_bad_flags() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "omnistream.cli", "serve", "--model-tier", "gold"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
