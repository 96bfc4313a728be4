"""The hosted task API (Omni API shape) on a real server, driven the way the quickstart
drives it: curl and httpx, API keys, upload slots, polling, signed output URLs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from omnistream.cli import main as cli_main
from omnistream.jobs.tasks import TASK_IMPLS
from omnistream.omni_api.catalog import Catalog, GroupsFileError, parse_groups
from omnistream.omni_api.signing import SignatureError, UrlSigner
from omnistream.omni_api.uploads import matches
from tests.jobs_helpers import tone
from tests.omni_helpers import (
    KEYS,
    bearer,
    curl,
    curl_json,
    png_bytes,
    poll,
    write_key_file,
)
from tests.server import RunningServer, run_server

SECRET = "omni-test-signing-secret"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "omni_quickstart.py"
MAX_UPLOAD = 2_000_000
HAS_DIFFUSION = all(
    importlib.util.find_spec(m) for m in ("torch", "diffusers", "transformers")
) and importlib.util.find_spec("tests.diffusion_helpers") is not None
needs_diffusion = pytest.mark.skipif(not HAS_DIFFUSION, reason="diffusion extra not installed")
TINY = {"width": 32, "height": 32, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("omni")


@pytest.fixture(scope="module")
def srv(root: Path) -> Iterator[RunningServer]:
    """Keys on (alice, bob, carol with a one-job quota, admin), one job slot, tiny models."""
    models_dir = None
    if HAS_DIFFUSION:
        from tests.diffusion_helpers import build_models

        build_models(root / "models", video=False)
        models_dir = str(root / "models")
    with run_server(
        api_key_file=str(write_key_file(root / "keys.yaml")),
        artifacts_dir=str(root / "artifacts"),
        models_dir=models_dir,
        omni_signing_secret=SECRET,
        max_running_jobs=1,
        max_upload_bytes=MAX_UPLOAD,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def client(srv: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.http, timeout=60) as c:
        yield c


def _create(client: httpx.Client, who: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return client.post("/api/omni/tasks/create", json=body, headers={**bearer(who), **headers})


def _audio_task(client: httpx.Client, who: str = "alice", **extra: Any) -> dict[str, Any]:
    r = _create(client, who, {
        "model_group": "omni-avatar", "task_type": "audio_to_video",
        "input": {"width": 96, "height": 128, "fps": 10, **extra},
        "files_to_upload": [{"field": "audio", "filename": "a.wav", "content_type": "audio/wav"}],
    })
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["status"] == "awaiting_upload"
    return body


# -- step 2: the catalog --------------------------------------------------------------------


def test_catalog_lists_ready_groups_with_schemas(srv: RunningServer) -> None:
    # Exactly the quickstart's step 2: no key.
    status, body = curl_json(f"{srv.http}/api/omni/models")
    assert status == 200
    groups = {g["model_group"]: g for g in body["model_groups"]}
    assert {"omni-tts", "omni-avatar", "omni-stt"} <= set(groups)
    assert "omni-video" not in groups  # no video pipeline loaded: hidden from the public
    tts = groups["omni-tts"]["task_types"][0]
    assert tts["task_type"] == "text_to_speech" and tts["models"][0] == "hibari"
    assert tts["input_schema"]["required"] == ["text"]
    assert tts["output_schema"]["properties"]["kind"]["const"] == "audio"
    avatar = groups["omni-avatar"]["task_types"][0]
    assert [f["field"] for f in avatar["files"]] == ["audio", "portrait_image"]
    if HAS_DIFFUSION:
        image = {t["task_type"]: t for t in groups["omni-image-aio"]["task_types"]}
        assert set(image) == {"text_to_image", "image_to_image", "single_image_edit", "inpaint"}
        assert image["text_to_image"]["input_schema"]["properties"]["width"]["anyOf"][0][
            "multipleOf"] == 8
        assert image["single_image_edit"]["models"] == ["tiny-pix2pix"]


def test_catalog_all_needs_admin_and_gives_reasons(client: httpx.Client) -> None:
    r = client.get("/api/omni/models", params={"all": "true"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    r = client.get("/api/omni/models", params={"all": "true"}, headers=bearer("alice"))
    assert r.status_code == 403
    r = client.get("/api/omni/models", headers={"Authorization": "Bearer wrong-key-123"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = client.get("/api/omni/models", params={"all": "true"}, headers=bearer("admin"))
    assert r.status_code == 200
    video = next(g for g in r.json()["model_groups"] if g["model_group"] == "omni-video")
    assert video["ready"] is False and video["reason"]
    t2v = next(t for t in video["task_types"] if t["task_type"] == "text_to_video")
    # Why: no model serves it, or (with a models dir) which weights were looked for.
    assert t2v["ready"] is False and ("text2video" in t2v["reason"] or "no weights" in t2v[
        "reason"])


# -- steps 3-5: text task, file task, polling, outputs -------------------------------------


@needs_diffusion
def test_quickstart_image_tasks_with_curl(srv: RunningServer, client: httpx.Client,
                                          root: Path) -> None:
    auth = f"Authorization: Bearer {KEYS['alice']}"
    base = srv.http
    # 3. A text task, created with curl exactly as the quickstart does.
    status, created = curl_json(
        "-X", "POST", f"{base}/api/omni/tasks/create", "-H", auth,
        "-H", "Content-Type: application/json",
        "-d", json.dumps({"model_group": "omni-image-aio", "task_type": "text_to_image",
                          "input": {"prompt": "a clean studio product photo", **TINY}}),
    )
    assert status == 200, created
    assert created["status"] == "queued" and created["portal_task_id"].startswith("pt_")
    assert created["queue"]["position"] >= 1 and created["uploads"] == []
    # 4. A file task: an upload slot, then a PUT of the PNG with curl (no key).
    status, edit = curl_json(
        "-X", "POST", f"{base}/api/omni/tasks/create", "-H", auth,
        "-H", "Content-Type: application/json",
        "-d", json.dumps({
            "model_group": "omni-image-aio", "task_type": "single_image_edit",
            "input": {"prompt": "make the product photo cleaner", "num_inference_steps": 2},
            "files_to_upload": [{"field": "source_image", "filename": "input.png",
                                 "content_type": "image/png"}],
        }),
    )
    assert status == 200, edit
    assert edit["status"] == "awaiting_upload"
    (slot,) = edit["uploads"]
    assert slot["field"] == "source_image" and slot["method"] == "PUT"
    assert slot["headers"] == {"Content-Type": "image/png"} and slot["expires_at"]
    picture = root / "input.png"
    picture.write_bytes(png_bytes(40, 24))
    status, put = curl_json("-X", "PUT", slot["upload_url"], "-H", "Content-Type: image/png",
                            "--data-binary", f"@{picture}")
    assert status == 200, put
    assert put["bytes"] == picture.stat().st_size and put["status"] in ("queued", "running",
                                                                        "succeeded")
    # 5. Poll both until they succeed; outputs come back as signed URLs.
    for task_id, size in ((created["portal_task_id"], (32, 32)),
                          (edit["portal_task_id"], (40, 24))):
        done = poll(client, task_id, bearer("alice"), timeout=120)
        assert done["status"] == "succeeded", done
        (out,) = done["outputs"]
        assert (out["kind"], out["mime"]) == ("image", "image/png")
        assert (out["width"], out["height"]) == size
        assert done["started_at"] and done["finished_at"] and done["error"] is None
        # The URL needs no key, serves the right type and honours ranges.
        r = httpx.get(out["url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content[:8] == b"\x89PNG\r\n\x1a\n" and len(r.content) == out["bytes"]
        part = httpx.get(out["url"], headers={"Range": "bytes=0-7"})
        assert part.status_code == 206 and part.content == r.content[:8]
    assert done["model"] == "tiny-pix2pix"


def test_tts_and_stt_tasks_end_to_end(srv: RunningServer, client: httpx.Client) -> None:
    status, created = curl_json(
        "-X", "POST", f"{srv.http}/api/omni/tasks/create",
        "-H", f"Authorization: Bearer {KEYS['alice']}", "-H", "Content-Type: application/json",
        "-d", json.dumps({"model_group": "omni-tts", "task_type": "text_to_speech",
                          "input": {"text": "Hello from the task API."}}),
    )
    assert status == 200, created
    assert created["status"] in ("queued", "running", "succeeded")
    done = poll(client, created["portal_task_id"], bearer("alice"))
    assert done["status"] == "succeeded", done
    (out,) = done["outputs"]
    assert out["kind"] == "audio" and out["mime"] == "audio/wav" and 0.5 < out["duration_s"] < 5
    status, wav = curl(out["url"])
    assert status == 200 and wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    # And back: the speech through speech_to_text gives the words as text.
    r = _create(client, "alice", {
        "model_group": "omni-stt", "task_type": "speech_to_text",
        "input": {"language": "en", "prompt": "task API"},
        "files_to_upload": [{"field": "audio", "filename": "hello.wav",
                             "content_type": "audio/wav"}]})
    assert r.status_code == 200, r.text
    put = httpx.put(r.json()["uploads"][0]["upload_url"], content=wav,
                    headers={"Content-Type": "audio/wav"})
    assert put.status_code == 200, put.text
    heard = poll(client, r.json()["portal_task_id"], bearer("alice"))
    assert heard["status"] == "succeeded", heard
    (text,) = heard["outputs"]
    assert text["kind"] == "text" and text["mime"] == "application/json"
    assert "hello" in text["text"].lower()


def test_avatar_task_end_to_end(srv: RunningServer, client: httpx.Client, root: Path) -> None:
    task = _audio_task(client)
    (slot,) = [u for u in task["uploads"] if u["field"] == "audio"]
    speech = root / "speech.wav"
    speech.write_bytes(tone(1.0))
    status, body = curl("-X", "PUT", slot["upload_url"], "-H", "Content-Type: audio/wav",
                        "--data-binary", f"@{speech}")
    assert status == 200, body
    done = poll(client, task["portal_task_id"], bearer("alice"))
    assert done["status"] == "succeeded", done
    (out,) = done["outputs"]
    assert (out["kind"], out["mime"], out["width"], out["height"]) == ("video", "video/mp4",
                                                                        96, 128)
    assert out["duration_s"] == pytest.approx(1.0, abs=0.11)
    video = httpx.get(out["url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert video.content[4:8] == b"ftyp"
    assert done["uploads"][0]["uploaded"] is True and "upload_url" not in done["uploads"][0]


# -- the queue ---------------------------------------------------------------------------------


def test_queue_position_counts_down(client: httpx.Client) -> None:
    # One job slot: a long avatar render holds it while three speech tasks wait.
    blocker = _audio_task(client, width=256, height=320, fps=25)
    r = httpx.put(blocker["uploads"][0]["upload_url"], content=tone(40.0),
                  headers={"Content-Type": "audio/wav"})
    assert r.status_code == 200, r.text
    poll(client, blocker["portal_task_id"], bearer("alice"), until=("running",))
    deadline = time.monotonic() + 30
    while (progress := client.get(f"/api/omni/tasks/{blocker['portal_task_id']}",
                                  headers=bearer("alice")).json()["progress"]) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert progress["stage"] == "render" and 0 < progress["fraction"] < 1
    waiting = []
    for index in range(3):
        r = _create(client, "alice", {"model_group": "omni-tts", "task_type": "text_to_speech",
                                      "input": {"text": f"Number {index}."}})
        assert r.status_code == 200, r.text
        waiting.append(r.json()["portal_task_id"])

    def queue(task_id: str) -> dict[str, Any]:
        body = client.get(f"/api/omni/tasks/{task_id}", headers=bearer("alice")).json()
        assert body["status"] == "queued", body
        return dict(body["queue"])

    assert [queue(t)["position"] for t in waiting] == [1, 2, 3]
    last = queue(waiting[2])
    assert last["tasks_ahead"] == 2 and last["running"] == 1
    # Measured run times (earlier tasks) give an estimate that grows down the queue.
    assert last["estimated_wait_s"] is not None
    assert last["estimated_wait_s"] >= queue(waiting[0])["estimated_wait_s"] >= 0
    r = client.post(f"/api/omni/tasks/{waiting[0]}/cancel", headers=bearer("alice"))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert [queue(t)["position"] for t in waiting[1:]] == [1, 2]
    r = client.delete(f"/api/omni/tasks/{blocker['portal_task_id']}", headers=bearer("alice"))
    assert r.status_code in (200, 202) and r.json()["status"] in ("cancelled", "running")
    for task_id in waiting[1:]:
        assert poll(client, task_id, bearer("alice"))["status"] == "succeeded"
    cancelled = poll(client, blocker["portal_task_id"], bearer("alice"))
    assert cancelled["status"] == "cancelled" and cancelled["error"]["code"]
    r = client.delete(f"/api/omni/tasks/{waiting[0]}", headers=bearer("alice"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "task_finished"


# -- upload slots and signed URLs ------------------------------------------------------------


def test_upload_slot_rules(client: httpx.Client) -> None:
    task = _audio_task(client)
    url = task["uploads"][0]["upload_url"]
    wav = tone(0.5)
    r = httpx.put(url, content=wav, headers={"Content-Type": "image/png"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "content_type_mismatch"
    r = httpx.put(url, content=png_bytes(), headers={"Content-Type": "audio/wav"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_file"
    r = httpx.put(url, content=b"RIFF" + bytes(MAX_UPLOAD), headers={"Content-Type": "audio/wav"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    r = httpx.put(url, content=wav, headers={"Content-Type": "audio/wav"})
    assert r.status_code == 200, r.text
    r = httpx.put(url, content=wav, headers={"Content-Type": "audio/wav"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "already_uploaded"
    assert poll(client, task["portal_task_id"], bearer("alice"))["status"] == "succeeded"
    metrics = client.get("/metrics", headers=bearer("admin")).text
    assert 'omnistream_omni_uploads_total{outcome="already_uploaded"} 1.0' in metrics
    assert 'omnistream_omni_tasks_ended_total{status="succeeded",task_type="audio_to_video"}' in (
        metrics)


def test_tampered_and_expired_urls_are_refused(client: httpx.Client) -> None:
    task = _audio_task(client)
    task_id = task["portal_task_id"]
    url = httpx.URL(task["uploads"][0]["upload_url"])
    params = dict(url.params)
    wav = {"content": tone(0.3), "headers": {"Content-Type": "audio/wav"}}
    tampered = [
        url.copy_with(params={**params, "sig": params["sig"][:-2] + "AA"}),
        url.copy_with(params={**params, "expires": str(int(params["expires"]) + 3600)}),
        url.copy_with(params={"expires": params["expires"]}),
        url.copy_with(path=url.path.replace("/audio", "/portrait_image")),
    ]
    for bad in tampered:
        r = httpx.put(bad, **wav)  # type: ignore[arg-type]
        assert r.status_code == 403, (bad, r.text)
        assert r.json()["error"]["code"] == "invalid_signature"
    # A correctly signed URL whose time has passed: 410, and the task fails.
    past = UrlSigner(SECRET).sign("upload", task_id, "audio", expires=int(time.time()) - 5)
    r = httpx.put(url.copy_with(query=past.encode().encode()), **wav)  # type: ignore[arg-type]
    assert r.status_code == 410 and r.json()["error"]["code"] == "upload_expired"
    failed = client.get(f"/api/omni/tasks/{task_id}", headers=bearer("alice")).json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "upload_expired"
    # Output URLs: another file id, or an expired signature, are refused too.
    r = _create(client, "alice", {"model_group": "omni-tts", "task_type": "text_to_speech",
                                  "input": {"text": "Signed."}})
    done = poll(client, r.json()["portal_task_id"], bearer("alice"))
    out = httpx.URL(done["outputs"][0]["url"])
    assert httpx.get(out).status_code == 200
    forged = out.copy_with(path=out.path[: out.path.rindex("/")] + "/file_000000000000000000000000")
    r = httpx.get(forged)
    assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_signature"
    tid, fid = out.path.split("/")[-2:]
    old = UrlSigner(SECRET).sign("file", tid, fid, expires=int(time.time()) - 1)
    r = httpx.get(out.copy_with(query=old.encode().encode()))
    assert r.status_code == 410 and r.json()["error"]["code"] == "url_expired"


# -- create: validation, idempotency, ownership, quotas --------------------------------------


def test_bad_input_names_the_field(client: httpx.Client) -> None:
    cases = [
        ({"model_group": "omni-nope", "task_type": "text_to_speech", "input": {"text": "x"}},
         "invalid_model_group", "model_group"),
        ({"model_group": "omni-tts", "task_type": "text_to_image", "input": {"prompt": "x"}},
         "invalid_task_type", "task_type"),
        ({"model_group": "omni-tts", "task_type": "text_to_speech", "input": {}},
         "invalid_input", "input.text"),
        ({"model_group": "omni-tts", "task_type": "text_to_speech",
          "input": {"text": "x", "speed": "fast"}}, "invalid_input", "input.speed"),
        ({"model_group": "omni-tts", "task_type": "text_to_speech",
          "input": {"text": "x", "pitch": 2}}, "invalid_input", "input.pitch"),
        ({"model_group": "omni-avatar", "task_type": "audio_to_video", "input": {"width": 97}},
         "invalid_input", "input.width"),
        ({"model_group": "omni-avatar", "task_type": "audio_to_video", "input": {}},
         "missing_file", "'audio'"),
        ({"model_group": "omni-avatar", "task_type": "audio_to_video", "input": {},
          "files_to_upload": [{"field": "audio", "content_type": "image/gif"}]},
         "invalid_content_type", "files_to_upload[0].content_type"),
        ({"model_group": "omni-stt", "task_type": "speech_to_text",
          "files_to_upload": [{"field": "audio", "content_type": "audio/wav"},
                              {"field": "video", "content_type": "audio/wav"}]},
         "invalid_file_field", "files_to_upload[1].field"),
        ({"model_group": "omni-tts", "task_type": "text_to_speech",
          "input": {"text": "x", "voice": "nobody"}}, "invalid_voice", "nobody"),
        ({"task_type": "text_to_speech"}, "invalid_request", "model_group"),
    ]
    for body, code, named in cases:
        r = _create(client, "alice", body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["code"] == code and named in error["message"], (body, error)
    r = client.post("/api/omni/tasks/create", content=b"{", headers={
        **bearer("alice"), "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] in ("invalid_json",
                                                                 "invalid_request")


def test_idempotent_create(client: httpx.Client) -> None:
    body = {"model_group": "omni-stt", "task_type": "speech_to_text", "input": {"language": "en"},
            "files_to_upload": [{"field": "audio", "content_type": "audio/wav"}]}
    first = _create(client, "alice", body, **{"Idempotency-Key": "retry-1"})
    again = _create(client, "alice", body, **{"Idempotency-Key": "retry-1"})
    assert first.status_code == again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["portal_task_id"] == first.json()["portal_task_id"]
    assert again.json()["uploads"][0]["upload_url"] == first.json()["uploads"][0]["upload_url"]
    other = _create(client, "alice", {**body, "input": {"language": "de"}},
                    **{"Idempotency-Key": "retry-1"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    # Keys are per API key: bob's "retry-1" is his own task.
    bobs = _create(client, "bob", body, **{"Idempotency-Key": "retry-1"})
    assert bobs.status_code == 200
    assert bobs.json()["portal_task_id"] != first.json()["portal_task_id"]
    fresh = _create(client, "alice", body)
    assert fresh.json()["portal_task_id"] != first.json()["portal_task_id"]
    for who, task in (("alice", first), ("bob", bobs), ("alice", fresh)):
        r = client.delete(f"/api/omni/tasks/{task.json()['portal_task_id']}", headers=bearer(who))
        assert r.status_code == 200 and r.json()["status"] == "cancelled"


def test_another_key_cannot_see_the_task(client: httpx.Client) -> None:
    task = _audio_task(client)
    path = f"/api/omni/tasks/{task['portal_task_id']}"
    r = client.get(path, headers=bearer("bob"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "task_not_found"
    assert client.delete(path, headers=bearer("bob")).status_code == 404
    assert client.post(f"{path}/cancel", headers=bearer("bob")).status_code == 404
    r = client.get(path)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get(path, headers=bearer("admin")).status_code == 200
    r = client.get(path, headers=bearer("alice"))
    assert r.status_code == 200 and r.json()["status"] == "awaiting_upload"
    assert client.get("/api/omni/tasks/pt_000000000000000000000000",
                      headers=bearer("alice")).status_code == 404
    r = client.delete(path, headers=bearer("alice"))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = httpx.put(task["uploads"][0]["upload_url"], content=tone(0.2),
                  headers={"Content-Type": "audio/wav"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "task_not_awaiting_upload"


def test_key_quota_answers_429_with_retry_after(client: httpx.Client) -> None:
    first = _audio_task(client, "carol")
    r = _create(client, "carol", {"model_group": "omni-tts", "task_type": "text_to_speech",
                                  "input": {"text": "one too many"}})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert int(r.headers["Retry-After"]) >= 1
    client.delete(f"/api/omni/tasks/{first['portal_task_id']}", headers=bearer("carol"))
    r = _create(client, "carol", {"model_group": "omni-tts", "task_type": "text_to_speech",
                                  "input": {"text": "now there is room"}})
    assert r.status_code == 200, r.text


# -- a second server: keys off, short upload slots, a groups file ----------------------------


def test_unfilled_slot_expires_and_groups_file(root: Path) -> None:
    groups = root / "groups.yaml"
    groups.write_text(
        "groups:\n"
        "  - {id: acme-voice, replaces: omni-tts, title: Acme Voice}\n"
        "  - {id: omni-stt, hidden: true}\n"
        "  - {id: acme-media, task_types: {audio_to_video: {models: [omni-avatar-lite]}}}\n"
    )
    with run_server(artifacts_dir=str(root / "artifacts2"), omni_upload_ttl_s=0.5,
                    omni_groups_file=str(groups)) as server, \
            httpx.Client(base_url=server.http, timeout=60) as c:
        listed = [g["model_group"] for g in c.get("/api/omni/models").json()["model_groups"]]
        assert "acme-voice" in listed and "acme-media" in listed
        assert "omni-tts" not in listed and "omni-stt" not in listed
        r = c.post("/api/omni/tasks/create", json={
            "model_group": "acme-media", "task_type": "audio_to_video",
            "files_to_upload": [{"field": "audio", "content_type": "audio/wav"}]})
        assert r.status_code == 200, r.text
        task = r.json()
        expires = datetime.fromisoformat(task["uploads"][0]["expires_at"]).timestamp()
        time.sleep(max(0.0, expires - time.time()) + 0.3)
        failed = c.get(f"/api/omni/tasks/{task['portal_task_id']}").json()
        assert failed["status"] == "failed" and failed["error"]["code"] == "upload_expired"
        r = httpx.put(task["uploads"][0]["upload_url"], content=tone(0.2),
                      headers={"Content-Type": "audio/wav"})
        assert r.status_code == 410
        r = c.post("/api/omni/tasks/create", json={"model_group": "omni-stt",
                                                   "task_type": "speech_to_text"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_model_group"
        # The quickstart example finds text_to_speech under its new name and runs it.
        done = subprocess.run(
            [sys.executable, str(EXAMPLE), "--base", server.http, "--out", str(root / "out")],
            capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "acme-voice ['text_to_speech']" in done.stdout
        (wav,) = (root / "out").glob("pt_*-0.wav")
        assert wav.read_bytes()[:4] == b"RIFF"


def test_groups_file_errors_name_the_entry(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = root / "bad-groups.yaml"
    bad.write_text("groups:\n  - {id: x, task_types: [text_to_song]}\n")
    assert cli_main(["serve", "--port", "1", "--omni-groups", str(bad)]) == 2
    assert "group 'x': unknown task type 'text_to_song'" in capsys.readouterr().err
    with pytest.raises(GroupsFileError, match="unknown task type 'text_to_song'"):
        parse_groups({"groups": [{"id": "x", "task_types": ["text_to_song"]}]})
    with pytest.raises(GroupsFileError, match="a new group needs 'task_types'"):
        parse_groups({"groups": [{"id": "fresh"}]})
    with pytest.raises(GroupsFileError, match="'replaces' must name a default group"):
        parse_groups({"groups": [{"id": "y", "replaces": "omni-nothing"}]})
    only = parse_groups({"include_defaults": False,
                         "groups": [{"id": "voice", "task_types": ["text_to_speech"]}]})
    assert [g.id for g in only] == ["voice"]


def test_upload_bytes_must_be_the_declared_format() -> None:
    samples = {
        "image/png": png_bytes(),
        "image/jpeg": b"\xff\xd8\xff\xe0" + bytes(16),
        "image/webp": b"RIFF\x00\x00\x00\x00WEBPVP8 ",
        "audio/wav": tone(0.1),
        "audio/mpeg": b"ID3\x04" + bytes(16),
        "audio/flac": b"fLaC" + bytes(16),
        "audio/ogg": b"OggS" + bytes(16),
        "audio/webm": b"\x1a\x45\xdf\xa3" + bytes(16),
        "audio/mp4": b"\x00\x00\x00\x20ftypM4A " + bytes(8),
    }
    for declared, data in samples.items():
        assert matches(declared, data), declared
        assert matches(f"{declared.upper()}; charset=binary", data)
        others = [d for d, other in samples.items() if d != declared and not matches(d, data)]
        assert len(others) == len(samples) - 1, declared
    assert not matches("image/gif", b"GIF89a")
    signer = UrlSigner("k")
    for expires, sig in ((None, "x"), ("12a", "x"), ("9" * 13, "x"), ("1", None)):
        with pytest.raises(SignatureError) as refused:
            signer.verify("upload", "pt_1", "audio", expires=expires, sig=sig)
        assert refused.value.status == 403


@needs_diffusion
def test_single_image_edit_falls_back_to_image_to_image(srv: RunningServer) -> None:
    # A group narrowed to an SD pipeline (no instruction-edit model) edits as image2image.
    groups = parse_groups({"include_defaults": False, "groups": [
        {"id": "sd-only", "task_types": {"single_image_edit": {"models": ["tiny-sd"]}}}]})
    catalog = Catalog(groups, srv.state.registry, {}, TASK_IMPLS)
    resolved = catalog.resolve("sd-only", "single_image_edit")
    assert (resolved.job_task, resolved.model) == ("image2image", "tiny-sd")
    (group,) = catalog.describe(include_hidden=True)
    assert group["task_types"][0]["runs_as"] == "image2image"
