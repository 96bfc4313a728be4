"""Offline generation on a real server: sync and async runs of each task, job streams,
cancellation, files, transcriptions, and every kind of bad input."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
import websockets.sync.client as ws_client

from omnistream.codecs.mp4 import probe
from tests.jobs_helpers import b64, sse_events, tone, wait_job
from tests.server import RunningServer, run_server

SENTENCE = "The quick brown fox jumps over the lazy dog."
SMALL = {"width": 96, "height": 128, "fps": 25}
MAX_UPLOAD = 2_000_000


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("jobs")
    out = {"artifacts": root / "artifacts", "inputs": root / "inputs", "outside": root / "outside"}
    for path in out.values():
        path.mkdir()
    return out


@pytest.fixture(scope="module")
def srv(dirs: dict[str, Path]) -> Iterator[RunningServer]:
    with run_server(
        artifacts_dir=str(dirs["artifacts"]),
        input_roots=[str(dirs["inputs"])],
        max_upload_bytes=MAX_UPLOAD,
        max_input_audio_s=60.0,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def client(srv: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.http, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def speech(client: httpx.Client) -> bytes:
    """A WAV of SENTENCE spoken by the default TTS voice, made by a sync text2audio run."""
    r = client.post("/v1/generate", json={"task": "text2audio", "inputs": {"prompt": SENTENCE}})
    assert r.status_code == 200, r.text
    body = r.json()
    (audio,) = body["outputs"]
    assert audio["kind"] == "audio" and audio["mime"] == "audio/wav"
    assert (
        body["metadata"]["task"] == "text2audio" and body["metadata"]["schema_version"] == "1.0.0"
    )
    wav = client.get(audio["url"])
    assert wav.status_code == 200 and wav.headers["content-type"] == "audio/wav"
    assert wav.content[:4] == b"RIFF" and 1.5 < audio["duration_s"] < 6
    return wav.content


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _artifact_files(dirs: dict[str, Path]) -> set[str]:
    return set(os.listdir(dirs["artifacts"]))


# -- the tasks, sync and async ---------------------------------------------------------------


def test_sync_transcription_of_tts_speech_contains_its_words(
    client: httpx.Client, speech: bytes
) -> None:
    r = client.post("/v1/generate", json={"task": "audio2text", "inputs": {"audio": b64(speech)}})
    assert r.status_code == 200, r.text
    body = r.json()
    (text,) = body["outputs"]
    assert text["kind"] == "text"
    heard = _words(text["text"])
    assert len(_words(SENTENCE) & heard) >= 7, text["text"]
    segments = text["data"]["segments"]
    assert segments and all(s["end"] > s["start"] for s in segments)
    report = body["metadata"]
    assert report["model"] == "whisper-tiny.en" and report["execution_mode"] == "sync"
    for key in ("run_id", "trace_id", "worker_id", "job_id", "device_placement", "cache_hits"):
        assert key in report
    assert report["timings"]["transcribe_ms"] > 0 and report["memory"]["peak_bytes"] > 0
    names = [e["event"] for e in report["stream_events"]]
    assert names[0] == "job_started" and "stage_progress" in names


def test_sync_audio2video_mp4_has_both_streams_with_matching_durations(
    client: httpx.Client, speech: bytes, tmp_path: Path
) -> None:
    r = client.post(
        "/v1/generate",
        json={"task": "audio2video", "inputs": {"audio": b64(speech)}, "config": SMALL},
    )
    assert r.status_code == 200, r.text
    (video,) = r.json()["outputs"]
    assert video["mime"] == "video/mp4" and (video["width"], video["height"]) == (96, 128)
    data = client.get(video["url"]).content
    path = tmp_path / "out.mp4"
    path.write_bytes(data)
    streams = {s.kind: s for s in probe(path)}
    assert streams["video"].codec == "h264" and streams["audio"].codec == "aac"
    assert streams["video"].frames == video["num_frames"]
    assert abs(streams["video"].duration_s - streams["audio"].duration_s) <= 0.04
    assert abs(streams["video"].duration_s - video["duration_s"]) <= 0.04


@pytest.mark.parametrize(
    ("task", "inputs", "config"),
    [
        ("text2audio", {"text": "Hello there."}, {"sample_rate": 16000}),
        ("audio2text", {"audio": "TONE"}, {}),
        ("audio2video", {"audio": "TONE"}, SMALL),
    ],
)
def test_async_run_of_each_task(
    client: httpx.Client, task: str, inputs: dict[str, Any], config: dict[str, Any]
) -> None:
    inputs = {k: (b64(tone(1.0)) if v == "TONE" else v) for k, v in inputs.items()}
    r = client.post(
        "/v1/generate", json={"task": task, "inputs": inputs, "config": config, "async_run": True}
    )
    assert r.status_code == 200, r.text
    record = r.json()
    assert record["state"] in ("queued", "running") and record["id"].startswith("job_")
    assert record["trace_id"] and record["enqueued_at_ms"] > 0
    final = wait_job(client, record["id"])
    assert final["state"] == "succeeded", final["error"]
    assert (
        final["started_at_ms"] >= final["enqueued_at_ms"]
        and final["finished_at_ms"] >= final["started_at_ms"]
    )
    outputs = final["result"]["outputs"]
    assert outputs and client.get(outputs[0]["url"]).status_code == 200
    assert final["result"]["metadata"]["execution_mode"] == "async"
    if task == "text2audio":
        assert outputs[0]["data"]["sample_rate"] == 16000


def test_multipart_upload_and_file_id_chaining(client: httpx.Client, speech: bytes) -> None:
    r = client.post(
        "/v1/generate",
        data={"task": "audio2video", "config": json.dumps(SMALL)},
        files={"audio": ("speech.wav", speech, "audio/wav")},
    )
    assert r.status_code == 200, r.text
    # An earlier artifact can feed the next run by its URL.
    first = client.post(
        "/v1/generate", json={"task": "text2audio", "inputs": {"prompt": "Good morning."}}
    )
    url = first.json()["outputs"][0]["url"]
    r = client.post("/v1/generate", json={"task": "audio2text", "inputs": {"audio": url}})
    assert r.status_code == 200, r.text
    assert "morning" in r.json()["outputs"][0]["text"].lower()


def test_data_url_and_allowed_local_path(client: httpx.Client, dirs: dict[str, Path]) -> None:
    data_url = "data:audio/wav;base64," + b64(tone(0.5))
    r = client.post(
        "/v1/generate", json={"task": "audio2video", "inputs": {"audio": data_url}, "config": SMALL}
    )
    assert r.status_code == 200, r.text
    local = dirs["inputs"] / "clip.wav"
    local.write_bytes(tone(0.5))
    r = client.post(
        "/v1/generate", json={"task": "audio2text", "inputs": {"audio": {"path": str(local)}}}
    )
    assert r.status_code == 200, r.text


# -- job streams, trace, cancel --------------------------------------------------------------


def _long_video_job(client: httpx.Client, seconds: float = 45.0) -> str:
    """An audio2video job long enough (many 1 s steps at full size) to cancel mid-run."""
    r = client.post(
        "/v1/generate",
        json={
            "task": "audio2video",
            "inputs": {"audio": b64(tone(seconds))},
            "config": {"width": 416, "height": 704, "fps": 25},
            "async_run": True,
        },
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def test_sse_replays_then_follows_and_ends(client: httpx.Client) -> None:
    r = client.post(
        "/v1/generate",
        json={
            "task": "audio2video",
            "inputs": {"audio": b64(tone(3.0))},
            "config": SMALL,
            "async_run": True,
        },
    )
    job_id = r.json()["id"]
    events = list(sse_events(client, f"/v1/jobs/{job_id}/events"))
    names = [n for n, _ in events]
    assert names[0] == "job_enqueued" and names[1] == "job_started" and names[-1] == "job_finished"
    assert [d["seq"] for _, d in events] == list(range(len(events)))
    assert names.count("stage_start") == names.count("stage_end") >= 3
    assert sum(1 for n in names if n == "stage_progress") >= 3
    # A late follower gets the same complete log, and the record carries it too.
    again = [n for n, _ in sse_events(client, f"/v1/jobs/{job_id}/events")]
    assert again == names
    assert [e["event"] for e in client.get(f"/v1/jobs/{job_id}").json()["events"]] == names
    # Resuming after an event id skips what the client already has.
    resumed = list(sse_events(client, f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "2"}))
    assert resumed[0][1]["seq"] == 3 and len(resumed) == len(events) - 3
    trace = client.get(f"/v1/jobs/{job_id}/trace").json()
    assert trace["trace_id"] == r.json()["trace_id"]
    spans = {s["name"]: s for s in trace["spans"]}
    root = spans["job.audio2video"]
    for stage in ("load", "prepare", "render", "mux"):
        assert spans[stage]["parent_id"] == root["span_id"] and spans[stage]["duration_ms"] >= 0
        assert spans[stage]["status"] == "ok"


def test_ws_stream_loses_no_event_while_client_cancels(
    srv: RunningServer, client: httpx.Client, dirs: dict[str, Path]
) -> None:
    job_id = _long_video_job(client)
    events: list[dict[str, Any]] = []
    acked = False
    with ws_client.connect(f"{srv.ws}/v1/jobs/{job_id}/stream", open_timeout=10) as ws:
        while True:
            try:
                message = json.loads(ws.recv(timeout=30))
            except websockets.exceptions.ConnectionClosedOK:
                break
            if message["type"] == "event":
                events.append(message)
                if len(events) == 1:  # the replayed job_enqueued: the job is rendering
                    ws.send(json.dumps({"action": "cancel"}))
            elif message["type"] == "cancel_ok":
                acked = True
            elif message["type"] == "end":
                assert message["job"]["state"] == "cancelled"
    assert acked
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert events[-1]["event"] == "job_cancelled"
    rendered = max((e["data"]["done"] for e in events if e["event"] == "stage_progress"), default=0)
    assert rendered < 45 * 25, "the job should stop at its next step, long before the end"
    record = client.get(f"/v1/jobs/{job_id}").json()
    assert record["state"] == "cancelled" and record["result"] is None
    assert not [f for f in _artifact_files(dirs) if f.endswith(".part")]
    # Cancelling a finished job is a conflict.
    r = client.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"


def test_delete_stops_a_running_job(client: httpx.Client, dirs: dict[str, Path]) -> None:
    before = _artifact_files(dirs)
    job_id = _long_video_job(client)
    for name, data in sse_events(client, f"/v1/jobs/{job_id}/events"):
        if name == "stage_progress" and data["stage"] == "render":
            break
    r = client.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 200
    assert r.json()["state"] == "cancelled"
    names = [n for n, _ in sse_events(client, f"/v1/jobs/{job_id}/events")]
    assert names[-1] == "job_cancelled"
    assert _artifact_files(dirs) == before, "a cancelled job leaves no file behind"


def test_unknown_job_and_file_are_404(srv: RunningServer, client: httpx.Client) -> None:
    for method, url in [
        ("GET", "/v1/jobs/job_nope"),
        ("DELETE", "/v1/jobs/job_nope"),
        ("GET", "/v1/jobs/job_nope/events"),
        ("GET", "/v1/jobs/job_nope/trace"),
        ("GET", "/v1/files/file_nope"),
        ("GET", "/v1/files/..%2F..%2Fetc%2Fpasswd"),
    ]:
        r = client.request(method, url)
        assert r.status_code == 404, (method, url, r.text)
        if url.startswith("/v1/jobs"):
            assert r.json()["error"]["code"] == "job_not_found"
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        ws_client.connect(f"{srv.ws}/v1/jobs/job_nope/stream", open_timeout=10)
    assert refused.value.response.status_code == 404


# -- OpenAI routes ----------------------------------------------------------------------------


def test_openai_transcriptions_formats(client: httpx.Client, speech: bytes) -> None:
    files = {"file": ("speech.wav", speech, "audio/wav")}
    r = client.post("/v1/audio/transcriptions", data={"model": "whisper-1"}, files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert {"text", "language", "duration", "segments"} <= set(body)
    assert "fox" in body["text"].lower() and body["language"] == "en"
    r = client.post(
        "/v1/audio/transcriptions",
        data={"model": "whisper-tiny.en", "response_format": "text"},
        files=files,
    )
    assert r.headers["content-type"].startswith("text/plain") and "fox" in r.text.lower()
    srt = client.post("/v1/audio/transcriptions", data={"response_format": "srt"}, files=files).text
    assert srt.startswith("1\n00:00:0") and " --> " in srt
    vtt = client.post("/v1/audio/transcriptions", data={"response_format": "vtt"}, files=files).text
    assert vtt.startswith("WEBVTT")
    verbose = client.post(
        "/v1/audio/transcriptions", data={"response_format": "verbose_json"}, files=files
    ).json()
    assert verbose["segments"][0]["start"] == 0.0 or verbose["segments"][0]["start"] >= 0
    bad = client.post("/v1/audio/transcriptions", data={"response_format": "xml"}, files=files)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_response_format"
    missing = client.post(
        "/v1/audio/transcriptions", data={"model": "whisper-1"}, files={"x": ("a", b"1")}
    )
    assert missing.status_code == 400
    corrupt = client.post(
        "/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF\x00\x00garbage", "audio/wav")}
    )
    assert corrupt.status_code == 400 and corrupt.json()["error"]["code"] == "invalid_audio"


def test_models_list_is_openai_shaped(client: httpx.Client) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    tasks = {(m["id"], m["task"]) for m in body["data"]}
    assert ("whisper-tiny.en", "audio2text") in tasks and (
        "omni-avatar-lite",
        "audio2video",
    ) in tasks
    for entry in body["data"]:
        assert {"id", "object", "owned_by", "task", "tier", "maturity", "summary"} <= set(entry)
        assert entry["object"] == "model"
    one = client.get("/v1/models/whisper-tiny.en").json()
    assert one["tasks"] == ["audio2text"]
    assert client.get("/v1/models/nope").status_code == 404


# -- bad input ----------------------------------------------------------------------------------

TRUNCATED_WAV = tone(1.0)[:44]  # header only: no samples


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"task": "dance", "inputs": {}}, 400, "invalid_request"),
        ({"task": "text2image", "inputs": {"prompt": "a cat"}}, 400, "task_not_available"),
        (
            {"task": "audio2text", "model": "gpt-99", "inputs": {"audio": "AAAA"}},
            400,
            "model_not_found",
        ),
        ({"task": "audio2text", "model": "omni-avatar-lite", "inputs": {}}, 400, "model_not_found"),
        ({"task": "audio2text", "inputs": {}}, 400, "missing_input"),
        ({"task": "audio2text", "inputs": {"audio": 123}}, 400, "invalid_input"),
        ({"task": "audio2text", "inputs": "audio"}, 400, "invalid_request"),
        ({"task": "audio2text", "inputs": {"audio": "%%%not base64%%%"}}, 400, "invalid_base64"),
        (
            {"task": "audio2text", "inputs": {"audio": b64(b"this is not audio at all" * 40)}},
            400,
            "invalid_audio",
        ),
        ({"task": "audio2text", "inputs": {"audio": b64(TRUNCATED_WAV)}}, 400, "invalid_audio"),
        (
            {"task": "audio2text", "inputs": {"audio": "https://example.com/a.wav"}},
            400,
            "remote_url_not_supported",
        ),
        (
            {"task": "audio2text", "inputs": {"audio": "AAAA", "language": "fr"}},
            400,
            "unsupported_language",
        ),
        (
            {
                "task": "audio2video",
                "inputs": {"audio": "TONE", "image": b64(b"\x89PNG\r\n\x1a\nbroken")},
            },
            400,
            "invalid_image",
        ),
        (
            {"task": "audio2video", "inputs": {"audio": "TONE"}, "config": {"width": 97}},
            400,
            "invalid_config",
        ),
        (
            {"task": "audio2video", "inputs": {"audio": "TONE"}, "config": {"fps": "fast"}},
            400,
            "invalid_config",
        ),
        (
            {"task": "audio2video", "inputs": {"audio": "TONE"}, "backend": "tpu"},
            400,
            "invalid_request",
        ),
        ({"task": "audio2text", "inputs": {"audio": "LONG"}}, 413, "audio_too_long"),
        ({"task": "text2audio", "inputs": {}}, 400, "missing_input"),
        ({"task": "text2audio", "inputs": {"prompt": 42}}, 400, "invalid_input"),
        ({"task": "text2audio", "inputs": {"prompt": "x" * 5000}}, 400, "input_too_long"),
        (
            {"task": "text2audio", "inputs": {"prompt": "hi"}, "config": {"voice": "nobody"}},
            400,
            "invalid_voice",
        ),
        (
            {"task": "audio2text", "inputs": {"audio": {"path": "/etc/passwd"}}},
            403,
            "path_not_allowed",
        ),
        (
            {"task": "audio2text", "inputs": {"audio": "file:///etc/hostname"}},
            403,
            "path_not_allowed",
        ),
        (
            {"task": "audio2text", "inputs": {"audio": {"file_id": "../../etc/passwd"}}},
            400,
            "file_not_found",
        ),
        (
            {"task": "audio2text", "inputs": {"audio": b64(b"\0" * (MAX_UPLOAD + 10))}},
            413,
            "input_too_large",
        ),
    ],
)
def test_bad_input_is_a_clear_error(
    client: httpx.Client, dirs: dict[str, Path], body: dict[str, Any], status: int, code: str
) -> None:
    before = _artifact_files(dirs)
    inputs = body.get("inputs")
    if isinstance(inputs, dict):
        media = {"TONE": lambda: b64(tone(0.3)), "LONG": lambda: b64(tone(61.0))}
        body = body | {
            "inputs": {
                k: (media[v]() if isinstance(v, str) and v in media else v)
                for k, v in inputs.items()
            }
        }
    for async_run in (False, True):
        r = client.post("/v1/generate", json=body | {"async_run": async_run})
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["code"] == code and error["message"]
    assert _artifact_files(dirs) == before


def test_bad_input_messages_list_what_exists(client: httpx.Client) -> None:
    r = client.post("/v1/generate", json={"task": "text2image", "inputs": {}})
    assert (
        "audio2video" in r.json()["error"]["message"]
        and "audio2text" in r.json()["error"]["message"]
    )
    r = client.post("/v1/generate", json={"task": "dance"})
    assert "text2audio" in r.json()["error"]["message"]
    r = client.post("/v1/generate", json={"task": "audio2text", "model": "gpt-99", "inputs": {}})
    assert "whisper-tiny.en" in r.json()["error"]["message"]


def test_path_traversal_and_symlink_out_of_root_are_refused(
    client: httpx.Client, dirs: dict[str, Path]
) -> None:
    secret = dirs["outside"] / "secret.wav"
    secret.write_bytes(tone(0.3))
    sneaky = str(dirs["inputs"]) + "/../outside/secret.wav"
    link = dirs["inputs"] / "link.wav"
    if not link.exists():
        link.symlink_to(secret)
    for path in (sneaky, str(link)):
        r = client.post(
            "/v1/generate", json={"task": "audio2text", "inputs": {"audio": {"path": path}}}
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "path_not_allowed"


def test_malformed_bodies_and_oversized_uploads(
    client: httpx.Client, dirs: dict[str, Path]
) -> None:
    before = _artifact_files(dirs)
    r = client.post(
        "/v1/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/v1/generate", json=[1, 2])
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    r = client.post(
        "/v1/generate",
        data={"task": "audio2text"},
        files={"audio": ("big.wav", b"\0" * (MAX_UPLOAD + 1), "audio/wav")},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "input_too_large"
    r = client.post(
        "/v1/generate", data={"task": "audio2text"}, files={"audio": ("e.wav", b"", "audio/wav")}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "empty_input"
    assert _artifact_files(dirs) == before
    # The server is fine afterwards.
    assert client.get("/healthz").status_code == 200


def test_sync_run_leaves_the_server_responsive(client: httpx.Client, srv: RunningServer) -> None:
    import threading
    import time

    done: dict[str, Any] = {}

    def run() -> None:
        with httpx.Client(base_url=srv.http, timeout=120) as other:
            body = {
                "task": "audio2video",
                "inputs": {"audio": b64(tone(8.0))},
                "config": {"width": 256, "height": 320},
            }
            done["response"] = other.post("/v1/generate", json=body)
            done["at"] = time.monotonic()

    worker = threading.Thread(target=run)
    worker.start()
    answered = []
    while worker.is_alive() and len(answered) < 5:
        r = client.get("/healthz", timeout=5)
        assert r.status_code == 200
        answered.append(time.monotonic())
        time.sleep(0.05)
    worker.join()
    assert done["response"].status_code == 200, done["response"].text
    assert answered and answered[0] < done["at"], "health checks answered during the sync run"


def test_queued_job_is_cancelled_at_once(client: httpx.Client) -> None:
    running = [_long_video_job(client) for _ in range(2)]  # max_running_jobs = 2
    queued = _long_video_job(client)
    record = client.get(f"/v1/jobs/{queued}").json()
    assert record["state"] == "queued"
    r = client.delete(f"/v1/jobs/{queued}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert r.json()["started_at_ms"] is None
    for job_id in running:
        assert client.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"


def test_text2audio_job_is_cancelled_and_jobs_are_counted(client: httpx.Client) -> None:
    text = " ".join(
        f"Sentence number {i} is here to keep the voice busy for a while." for i in range(60)
    )
    r = client.post(
        "/v1/generate", json={"task": "text2audio", "inputs": {"prompt": text}, "async_run": True}
    )
    assert r.status_code == 200, r.text
    cancelled = client.delete(f"/v1/jobs/{r.json()['id']}").json()
    assert cancelled["state"] == "cancelled" and cancelled["result"] is None
    metrics = client.get("/metrics").text
    assert 'omnistream_jobs_total{state="cancelled",task="text2audio"}' in metrics
    assert 'omnistream_jobs_total{state="succeeded",task="audio2video"}' in metrics
