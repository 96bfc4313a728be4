"""Helpers for the hosted task API tests: media, key files, curl, polling."""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

KEYS = {"alice": "alice-key-0001", "bob": "bob-key-00002", "carol": "carol-key-0003",
        "admin": "admin-key-0004"}


def write_key_file(path: Path) -> Path:
    """A YAML key file: alice and bob (tasks), carol (one queued job at most), admin."""
    path.write_text(
        "keys:\n"
        f"  - {{name: alice, key: {KEYS['alice']}, scopes: [tasks]}}\n"
        f"  - {{name: bob, key: {KEYS['bob']}, scopes: [tasks]}}\n"
        f"  - {{name: carol, key: {KEYS['carol']}, scopes: [tasks], max_queued_jobs: 1}}\n"
        f"  - {{name: admin, key: {KEYS['admin']}, scopes: [admin]}}\n"
    )
    return path


def bearer(name: str) -> dict[str, str]:
    """The Authorization header of a test key."""
    return {"Authorization": f"Bearer {KEYS[name]}"}


def png_bytes(width: int = 32, height: int = 32) -> bytes:
    """A small PNG with a gradient."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                    np.full_like(x, 128)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def curl(*args: str, timeout: float = 60.0) -> tuple[int, bytes]:
    """Run curl as the quickstart does; returns (HTTP status, body)."""
    done = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", *args],
        capture_output=True,
        timeout=timeout,
        check=True,
    )
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status), body


def curl_json(*args: str) -> tuple[int, Any]:
    """curl, with the body parsed as JSON."""
    status, body = curl(*args)
    return status, json.loads(body)


def poll(
    client: httpx.Client, task_id: str, headers: dict[str, str], timeout: float = 60.0,
    until: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
) -> dict[str, Any]:
    """Poll ``GET /api/omni/tasks/{id}`` as the quickstart's step 5 does, until ``until``."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/api/omni/tasks/{task_id}", headers=headers)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        if body["status"] in until:
            return body
        assert time.monotonic() < deadline, f"task {task_id} still {body['status']}"
        time.sleep(0.05)
