"""API keys on every route and socket, scopes, quotas, ownership, Origin, CORS, body limits.

Real servers on ephemeral ports with a real key file; real clients (httpx, websockets, the
official openai SDK); a subprocess server for SIGHUP and the start-up refusals.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import websockets
from starlette.routing import Mount, Route, WebSocketRoute

from omnistream.auth.policy import EXEMPT_PATHS, KEY_OPTIONAL_PATHS, SIGNED_PATHS
from omnistream.cli import main as cli_main
from tests.avatar_client import ref_image_b64, speech_like
from tests.server import RunningServer, free_port, run_server

ADMIN = "admin-key-0123456789"
ALICE = "alice-key-0123456789"
BOB = "bob-key-0123456789abc"
TTS_ONLY = "tts-only-key-0123456"
LIMITED = "limited-key-01234567"
PLAIN = "plain-line-key-987654"

KEY_FILE = f"""
keys:
  - name: admin
    key: {ADMIN}
  - name: alice
    key: {ALICE}
    scopes: [realtime, tts, stt, generate, gateway, tasks]
  - name: bob
    sha256: "{__import__('hashlib').sha256(BOB.encode()).hexdigest()}"
    scopes: [realtime, tts, stt, generate]
  - name: tts-only
    key: {TTS_ONLY}
    scopes: [tts]
    tiers: [core]
  - name: limited
    key: {LIMITED}
    scopes: [realtime, tts, generate]
    max_sessions: 1
    requests_per_minute: 4
    max_queued_jobs: 1
"""


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(KEY_FILE)
    return path


@pytest.fixture(scope="module")
def srv(key_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    artifacts = tmp_path_factory.mktemp("artifacts")
    with run_server(api_key_file=str(key_file), artifacts_dir=str(artifacts),
                    max_body_bytes=64 * 1024, max_upload_bytes=256 * 1024,
                    log_level="info") as server:
        yield server


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def walk_routes(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(kind, path) of every endpoint, through included routers and mounts.

    ``kind`` is ``"ws"`` or an HTTP method.
    """
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:  # FastAPI's included router
            context = route.include_context
            yield from walk_routes(inner.routes, prefix + (context.prefix or ""))
        elif isinstance(route, WebSocketRoute) or type(route).__name__ == "APIWebSocketRoute":
            yield "ws", prefix + route.path
        elif isinstance(route, Route):
            for method in sorted(route.methods or []):
                if method != "HEAD":
                    yield method, prefix + route.path
        elif isinstance(route, Mount):
            yield from walk_routes(list(route.routes), prefix + route.path)


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", path)


async def _ws_status_async(url: str, **kwargs: Any) -> int:
    """The HTTP status a WebSocket handshake to ``url`` gets (101 when it opens)."""
    try:
        async with websockets.connect(url, open_timeout=10, **kwargs):
            return 101
    except websockets.InvalidStatus as exc:
        return int(exc.response.status_code)


def _ws_status(url: str, **kwargs: Any) -> int:
    return asyncio.run(_ws_status_async(url, **kwargs))


# -- keys on every route ---------------------------------------------------------------


def test_every_route_and_socket_refuses_without_a_key(srv: RunningServer) -> None:
    """Walk what the app registers: a route added later cannot forget the key."""
    checked = 0
    with httpx.Client(base_url=srv.http, timeout=10) as client:
        for kind, template in walk_routes(srv.app.routes):
            path = _concrete(template)
            if kind == "ws":
                for headers in ({}, {"x-api-key": "wrong-key-000000"}):
                    status = _ws_status(srv.ws + path, additional_headers=headers)
                    assert status == 401, f"WS {path} answered {status} without a valid key"
            elif template in EXEMPT_PATHS:
                r = client.request(kind, path)
                assert r.status_code < 400, f"{kind} {path} is exempt"
                continue
            elif SIGNED_PATHS.match(path):
                # The URL's signature is the credential: unsigned is refused, key or not.
                for headers in ({}, _bearer(ALICE)):
                    r = client.request(kind, path, headers=headers)
                    assert r.status_code == 403, f"{kind} {path} answered {r.status_code} unsigned"
            elif KEY_OPTIONAL_PATHS.match(path):
                assert client.request(kind, path).status_code < 400, f"{path} is public"
                wrong = client.request(kind, path, headers=_bearer("not-a-key-123456"))
                assert wrong.status_code == 401
            else:
                r = client.request(kind, path)
                assert r.status_code == 401, f"{kind} {path} answered {r.status_code} without a key"
                wrong = client.request(kind, path, headers=_bearer("not-a-key-123456"))
                assert wrong.status_code == 401
            checked += 1
    assert checked > 30  # the walk really saw the app's routes


def test_error_shapes_follow_the_surface(srv: RunningServer) -> None:
    with httpx.Client(base_url=srv.http, timeout=10) as client:
        openai_route = client.post("/v1/audio/speech", json={"input": "hi"})
        assert openai_route.json()["error"]["code"] == "invalid_api_key"
        assert openai_route.headers["www-authenticate"] == "Bearer"
        omnirt = client.get("/v1/jobs")
        assert "detail" in omnirt.json()
        forbidden = client.post("/v1/generate", headers=_bearer(TTS_ONLY), json={})
        assert forbidden.status_code == 403
        assert "generate" in forbidden.json()["detail"]


def test_key_in_header_query_or_x_api_key(srv: RunningServer) -> None:
    with httpx.Client(base_url=srv.http, timeout=10) as client:
        assert client.get("/v1/models", headers=_bearer(ALICE)).status_code == 200
        assert client.get("/v1/models", headers={"x-api-key": ALICE}).status_code == 200
        assert client.get("/v1/models", params={"api_key": ALICE}).status_code == 200
        # A key stored as its sha256 works the same.
        assert client.get("/v1/jobs", headers=_bearer(BOB)).status_code == 200
        for path in ("/healthz", "/health", "/readyz"):
            assert client.get(path).status_code == 200


def test_openai_sdk_sees_an_authentication_error(srv: RunningServer) -> None:
    bad = openai.OpenAI(base_url=srv.http + "/v1", api_key="sk-wrong-000000000")
    with pytest.raises(openai.AuthenticationError) as info:
        bad.audio.speech.create(model="tts-1", voice="alloy", input="hi")
    assert info.value.code == "invalid_api_key"
    good = openai.OpenAI(base_url=srv.http + "/v1", api_key=ALICE)
    audio = good.audio.speech.create(
        model="tts-1", voice="alloy", input="Hello.", response_format="pcm"
    )
    assert len(audio.content) > 2400


def test_key_never_reaches_a_log(srv: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with httpx.Client(base_url=srv.http, timeout=10) as client:
        client.get("/v1/models", params={"api_key": ALICE})
        client.get("/v1/models", params={"api_key": "wrong-but-secret-key"})
    assert _ws_status(f"{srv.ws}/?api_key={ALICE}") == 101
    time.sleep(0.2)
    server_logs = [r for r in caplog.records if r.name.startswith(("uvicorn", "omnistream"))]
    text = "\n".join(r.getMessage() for r in server_logs)
    assert "/v1/models" in text  # the access log did record the requests
    assert ALICE not in text and "wrong-but-secret-key" not in text
    metrics = httpx.get(srv.http + "/metrics", headers=_bearer(ADMIN)).text
    assert ALICE not in metrics
    assert 'omnistream_key_requests_total{key="alice",outcome="ok"}' in metrics


def test_metrics_needs_the_metrics_scope(srv: RunningServer) -> None:
    assert httpx.get(srv.http + "/metrics", headers=_bearer(ALICE)).status_code == 403
    assert httpx.get(srv.http + "/metrics", headers=_bearer(ADMIN)).status_code == 200
    with run_server(api_key_file=srv.settings.api_key_file, public_metrics=True) as public:
        assert httpx.get(public.http + "/metrics").status_code == 200
        assert httpx.get(public.http + "/v1/models").status_code == 401


def test_key_tiers_limit_the_models(srv: RunningServer) -> None:
    with httpx.Client(base_url=srv.http, timeout=20) as client:
        core = client.post("/v1/text2audio/stream", headers=_bearer(TTS_ONLY),
                           json={"text": "Hi.", "model": "hibari"})
        assert core.status_code == 200
        adjacent = client.post("/v1/text2audio/stream", headers=_bearer(TTS_ONLY),
                               json={"text": "Hi.", "model": "espeak-ng"})
        assert adjacent.status_code == 403
        assert "tts-only" in adjacent.text


# -- WebSockets --------------------------------------------------------------------------


def test_websocket_handshakes_need_a_key(srv: RunningServer) -> None:
    assert _ws_status(srv.ws + "/") == 401
    assert _ws_status(srv.ws + "/v1/avatar/realtime") == 401
    assert _ws_status(srv.ws + "/v1/avatar/realtime", additional_headers=_bearer(TTS_ONLY)) == 403
    assert _ws_status(srv.ws + "/v1/avatar/realtime", additional_headers=_bearer(ALICE)) == 101

    async def flashtalk_with_query_key() -> dict[str, object]:
        async with websockets.connect(f"{srv.ws}/?api_key={ALICE}", max_size=None) as ws:
            await ws.send(json.dumps({"type": "init", "ref_image": ref_image_b64()}))
            init_ok: dict[str, object] = json.loads(await ws.recv())
            chunk = int(init_ok["chunk_samples"])  # type: ignore[call-overload]
            await ws.send(b"AUDI" + speech_like(chunk))
            reply = await ws.recv()
            assert isinstance(reply, bytes) and reply[:4] == b"VIDX"
            return init_ok

    assert asyncio.run(flashtalk_with_query_key())["type"] == "init_ok"


def test_client_secret_for_browsers(srv: RunningServer) -> None:
    with httpx.Client(base_url=srv.http, timeout=10) as client:
        assert client.post("/v1/realtime/client_secrets", json={}).status_code == 401
        minted = client.post(
            "/v1/realtime/client_secrets", headers=_bearer(ALICE),
            json={"expires_after": {"anchor": "created_at", "seconds": 1}},
        ).json()
        secret = minted["value"]
        assert secret.startswith("ek_") and minted["expires_at"] <= time.time() + 2
        # The secret opens realtime surfaces, by query parameter or subprotocol...
        assert _ws_status(f"{srv.ws}/v1/avatar/realtime?api_key={secret}") == 101
        assert _ws_status(
            srv.ws + "/v1/avatar/realtime",
            subprotocols=[f"openai-insecure-api-key.{secret}"],
        ) in (101, 400)  # opened (or the app declined a subprotocol it does not speak)
        assert client.get("/v1/webrtc/config", headers=_bearer(secret)).status_code == 200
        # ...and nothing else.
        assert client.get("/v1/jobs", headers=_bearer(secret)).status_code == 403
        time.sleep(1.3)
        assert client.get("/v1/webrtc/config", headers=_bearer(secret)).status_code == 401


def test_demo_page_carries_a_client_secret_not_the_key(srv: RunningServer) -> None:
    page = httpx.get(srv.http + "/demo", params={"api_key": ALICE}).text
    secret = re.search(r'omnistream-client-secret" content="(ek_[^"]+)"', page)
    assert secret and ALICE not in page
    config = httpx.get(srv.http + "/v1/webrtc/config", headers=_bearer(secret.group(1)))
    assert config.status_code == 200
    assert httpx.get(srv.http + "/demo").status_code == 401


# -- ownership and quotas ----------------------------------------------------------------


def _submit_job(client: httpx.Client, key: str, text: str = "Hello there.") -> httpx.Response:
    return client.post("/v1/generate", headers=_bearer(key), json={
        "task": "text2audio", "inputs": {"prompt": text}, "async_run": True})


def _wait_job(client: httpx.Client, key: str, job_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        record: dict[str, object] = client.get(f"/v1/jobs/{job_id}", headers=_bearer(key)).json()
        if record["state"] in ("succeeded", "failed", "cancelled"):
            return record
        time.sleep(0.1)
    raise AssertionError("job did not finish")


def test_jobs_and_files_belong_to_their_key(srv: RunningServer) -> None:
    with httpx.Client(base_url=srv.http, timeout=30) as client:
        created = _submit_job(client, ALICE, "A private prompt.")
        assert created.status_code == 200, created.text
        job_id = created.json()["id"]
        record = _wait_job(client, ALICE, job_id)
        assert record["state"] == "succeeded" and record["owner"] == "key:alice"
        url = record["result"]["outputs"][0]["url"]  # type: ignore[index]
        file_path = httpx.URL(url).path

        assert client.get(f"/v1/jobs/{job_id}", headers=_bearer(BOB)).status_code == 404
        assert client.delete(f"/v1/jobs/{job_id}", headers=_bearer(BOB)).status_code == 404
        assert client.get(f"/v1/jobs/{job_id}/trace", headers=_bearer(BOB)).status_code == 404
        assert client.get(f"/v1/jobs/{job_id}/events", headers=_bearer(BOB)).status_code == 404
        assert client.get(file_path, headers=_bearer(BOB)).status_code == 404
        listed = client.get("/v1/jobs", headers=_bearer(BOB)).json()["data"]
        assert job_id not in {j["id"] for j in listed}
        assert "private prompt" not in json.dumps(listed)

        assert client.get(file_path, headers=_bearer(ALICE)).status_code == 200
        mine = client.get("/v1/jobs", headers=_bearer(ALICE)).json()["data"]
        assert job_id in {j["id"] for j in mine}
        everything = client.get("/v1/jobs", headers=_bearer(ADMIN)).json()["data"]
        assert job_id in {j["id"] for j in everything}
        assert client.get(file_path, headers=_bearer(ADMIN)).status_code == 200


def test_request_rate_quota(srv: RunningServer) -> None:
    with httpx.Client(base_url=srv.http, timeout=10) as client:
        statuses = [client.get("/v1/jobs", headers=_bearer(LIMITED)) for _ in range(6)]
    codes = [r.status_code for r in statuses]
    assert 429 in codes and codes.index(429) >= 1
    refused = statuses[codes.index(429)]
    assert int(refused.headers["retry-after"]) >= 1
    assert "requests per minute" in refused.json()["detail"]
    # Another key is untouched by that one's limit.
    assert httpx.get(srv.http + "/v1/jobs", headers=_bearer(ALICE)).status_code == 200


def test_session_and_job_quotas(key_file: Path, tmp_path: Path) -> None:
    with run_server(api_key_file=str(key_file), artifacts_dir=str(tmp_path)) as server:

        async def sessions() -> tuple[int, int]:
            url = f"{server.ws}/v1/avatar/realtime?api_key={LIMITED}"
            async with websockets.connect(url):
                second = await _ws_status_async(url)
            await asyncio.sleep(0.2)
            return second, await _ws_status_async(url)

        second, after_close = asyncio.run(sessions())
        assert second == 429 and after_close == 101

    with run_server(api_key_file=str(key_file), artifacts_dir=str(tmp_path),
                    max_running_jobs=1) as server, httpx.Client(base_url=server.http,
                                                                 timeout=30) as client:
        long_text = "This sentence takes a while to say. " * 12
        first = _submit_job(client, LIMITED, long_text)
        assert first.status_code == 200
        second = _submit_job(client, LIMITED)
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "rate_limited"
        assert "retry-after" in second.headers
        assert _submit_job(client, ALICE).status_code == 200  # other keys still submit


# -- browsers: Origin and CORS -----------------------------------------------------------


def test_origin_check_on_websockets_and_posts(srv: RunningServer) -> None:
    evil = {"origin": "http://evil.example"}
    url = f"{srv.ws}/v1/avatar/realtime?api_key={ALICE}"
    assert _ws_status(url, origin="http://evil.example") == 403
    assert _ws_status(url, origin=f"http://127.0.0.1:{srv.port}") == 101
    posted = httpx.post(srv.http + "/v1/generate", headers={**evil, **_bearer(ALICE)}, json={})
    assert posted.status_code == 403 and "Origin" in posted.json()["detail"]
    # A page on the same host, and any client that sends no Origin, go on.
    assert httpx.get(srv.http + "/v1/jobs", headers={**evil, **_bearer(ALICE)}).status_code == 200

    with run_server(allowed_origins=["http://evil.example"]) as open_server:
        assert _ws_status(open_server.ws + "/v1/avatar/realtime",
                          origin="http://evil.example") == 101


def test_cors_is_off_unless_configured() -> None:
    preflight = {"origin": "http://app.example", "access-control-request-method": "POST"}
    with run_server() as plain:
        r = httpx.options(plain.http + "/v1/audio/speech", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    with run_server(cors_origins=["http://app.example"]) as cors:
        r = httpx.options(cors.http + "/v1/audio/speech", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "http://app.example"
        speech = httpx.post(cors.http + "/v1/audio/speech", headers={"origin": "http://app.example"},
                            json={"input": "Hi.", "response_format": "pcm"})
        assert speech.status_code == 200
        assert speech.headers["access-control-allow-origin"] == "http://app.example"


# -- bodies --------------------------------------------------------------------------------


def test_body_limits_are_enforced_while_streaming(srv: RunningServer) -> None:
    def endless(total: int) -> Iterator[bytes]:
        sent = 0
        while sent < total:
            yield b'{"text": "' if sent == 0 else b"a" * 65536
            sent += 65536

    with httpx.Client(base_url=srv.http, timeout=30, headers=_bearer(ALICE)) as client:
        # Chunked (no Content-Length): refused once past the limit, not after buffering.
        r = client.post("/v1/text2audio/stream", content=endless(50 * 1024 * 1024),
                        headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert r.json()["code"] == "request_too_large"
        # Declared too large: refused before reading.
        r = client.post("/v1/audio/speech", content=b"x" * (70 * 1024),
                        headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        # Upload routes take up to max_upload_bytes.
        r = client.post("/v1/generate", files={"audio": ("a.wav", b"\0" * (600 * 1024))},
                        data={"task": "audio2text"})
        assert r.status_code == 413 and r.json()["code"] == "file_too_large"


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/webrtc/offer", "/v1/audio/speech",
                                  "/v1/text2audio/stream"])
def test_deeply_nested_json_is_a_400(srv: RunningServer, path: str) -> None:
    body = "[" * 20000 + "]" * 20000
    r = httpx.post(srv.http + path, content=body, timeout=10,
                   headers={"content-type": "application/json", **_bearer(ALICE)})
    assert r.status_code == 400
    assert "nested deeper" in r.text
    # Brackets inside strings do not count.
    fine = json.dumps({"text": "[[[[" * 100 + "Hello.", "sample_rate": 16000})
    ok = httpx.post(srv.http + "/v1/text2audio/stream", content=fine, timeout=30,
                    headers={"content-type": "application/json", **_bearer(ALICE)})
    assert ok.status_code == 200


# -- the command line ----------------------------------------------------------------------


def test_public_address_without_keys_refuses_to_start(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli_main(["serve", "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "--api-key-file" in err and "--no-auth" in err
    broken = tmp_path / "keys.yaml"
    broken.write_text("keys:\n  - name: a\n    key: short\n")
    assert cli_main(["serve", "--api-key-file", str(broken), "--port", str(free_port())]) == 2
    assert "at least 8 characters" in capsys.readouterr().err


def test_sighup_reloads_keys_without_dropping_sessions(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{ALICE}\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "omnistream.cli", "serve", "--port", str(port),
         "--api-key-file", str(keys), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "OMNISTREAM_ARTIFACTS_DIR": str(tmp_path / "artifacts")},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert httpx.get(base + "/v1/jobs", headers=_bearer(ALICE)).status_code == 200

        async def live_session_survives_reload() -> None:
            async with websockets.connect(f"ws://127.0.0.1:{port}/?api_key={ALICE}",
                                          max_size=None) as ws:
                await ws.send(json.dumps({"type": "init", "ref_image": ref_image_b64()}))
                init_ok = json.loads(await ws.recv())
                keys.write_text(f"# alice rotated out\n{BOB}\n")
                proc.send_signal(signal.SIGHUP)
                await asyncio.sleep(0.5)
                await ws.send(b"AUDI" + speech_like(int(init_ok["chunk_samples"])))
                reply = await ws.recv()
                assert isinstance(reply, bytes) and reply[:4] == b"VIDX"

        asyncio.run(live_session_survives_reload())
        assert httpx.get(base + "/v1/jobs", headers=_bearer(ALICE)).status_code == 401
        assert httpx.get(base + "/v1/jobs", headers=_bearer(BOB)).status_code == 200
        # A broken file on reload keeps the keys in force.
        keys.write_text("keys: [{name: x}]\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert httpx.get(base + "/v1/jobs", headers=_bearer(BOB)).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=15)
