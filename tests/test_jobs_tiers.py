"""Tier policy: ``--model-tier`` narrows the model list and refuses other models (403) on
every route, HTTP and WebSocket, offline and live."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
import websockets.sync.client as ws_client

from omnistream.engine.registry import Tier
from tests.jobs_helpers import b64, tone, wait_job
from tests.server import RunningServer, run_server


@pytest.fixture(scope="module")
def core_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    artifacts = tmp_path_factory.mktemp("tier-artifacts")
    with run_server(model_tiers=["core"], artifacts_dir=str(artifacts)) as srv:
        yield srv


def _refused_ws(url: str) -> int:
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        ws_client.connect(url, open_timeout=10)
    return int(refused.value.response.status_code)


def test_model_list_and_readyz_are_narrowed(core_only: RunningServer) -> None:
    with httpx.Client(base_url=core_only.http, timeout=30) as client:
        data = client.get("/v1/models").json()["data"]
        assert data and {m["tier"] for m in data} == {"core"}
        ids = {m["id"] for m in data}
        assert "whisper-tiny.en" in ids and "espeak-ng" not in ids
        ready = client.get("/readyz").json()
        assert ready["allowed_model_tiers"] == ["core"]
        assert "whisper-tiny.en" in ready["models"]


def test_other_tiers_are_403_on_http_routes(core_only: RunningServer) -> None:
    with httpx.Client(base_url=core_only.http, timeout=60) as client:
        r = client.post(
            "/v1/generate",
            json={"task": "text2audio", "model": "espeak-ng", "inputs": {"prompt": "hi"}},
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_tier_forbidden"
        r = client.post(
            "/v1/generate",
            json={
                "task": "audio2video",
                "model": "wav2lip-96",
                "inputs": {"audio": b64(tone(0.2))},
                "async_run": True,
            },
        )
        assert r.status_code == 403
        assert client.get("/v1/models/espeak-ng").status_code == 403
        r = client.post("/v1/text2audio/espeak-ng", json={"text": "hello", "stream": True})
        assert r.status_code == 403
        # A model of an allowed tier still works on the same server.
        r = client.post("/v1/generate", json={"task": "text2audio", "inputs": {"prompt": "Fine."}})
        assert r.status_code == 200, r.text


def test_other_tiers_are_403_on_websocket_routes(core_only: RunningServer) -> None:
    assert _refused_ws(f"{core_only.ws}/v1/audio2video/wav2lip-96") == 403
    with ws_client.connect(f"{core_only.ws}/v1/avatar/realtime", open_timeout=10) as ws:
        ws.send(json.dumps({"type": "session.create", "model": "wav2lip-96", "inputs": {}}))
        message = json.loads(ws.recv(timeout=10))
        assert message["type"] == "error" and message["code"] == "model_tier_forbidden"


def test_job_routes_follow_a_narrowed_policy(tmp_path: Path) -> None:
    """Jobs of a model the server no longer allows are refused on HTTP and WebSocket."""
    with (
        run_server(artifacts_dir=str(tmp_path)) as srv,
        httpx.Client(base_url=srv.http, timeout=60) as client,
    ):
        r = client.post(
            "/v1/generate",
            json={
                "task": "text2audio",
                "model": "espeak-ng",
                "inputs": {"prompt": "Hi."},
                "async_run": True,
            },
        )
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        assert wait_job(client, job_id)["state"] == "succeeded"
        srv.state.registry.allowed_tiers = frozenset({Tier.CORE})  # what --model-tier core sets
        assert client.get(f"/v1/jobs/{job_id}").status_code == 403
        assert client.get(f"/v1/jobs/{job_id}/events").status_code == 403
        assert _refused_ws(f"{srv.ws}/v1/jobs/{job_id}/stream") == 403
