"""OmniRT's text2audio service adapter, complete: health, metrics and the generic request."""

from __future__ import annotations

import io
import time
import wave

import httpx

from tests.server import RunningServer

GENERIC = {
    "model": "hibari",
    "text": "Hello from the adapter.",
    "voice": "heart",
    "audio_format": "pcm_s16le",
    "stream": True,
    "config": {"streaming_mode": "sentence"},
}


def test_health_and_metrics_per_model(server: RunningServer) -> None:
    with httpx.Client(base_url=server.http, timeout=60) as client:
        health = client.get("/v1/text2audio/health").json()
        assert health["status"] == "ok" and health["adapter"] == "text2audio.service.v1"
        assert {m["id"] for m in health["models"]} >= {"hibari", "espeak-ng"}
        r = client.post("/v1/text2audio/stream", json=GENERIC)
        assert r.status_code == 200 and len(r.content) > 4800
        for _ in range(100):  # the stream is released just after its last byte is sent
            metrics = client.get("/v1/text2audio/metrics").json()
            hibari = metrics["models"]["hibari"]
            if hibari["live_streams"] == 0:
                break
            time.sleep(0.02)
        assert hibari["loaded"] is True and hibari["live_streams"] == 0
        assert hibari["recent_streams"] >= 1 and hibari["audio_s"] > 0
        assert hibari["ttfa_ms"]["p50"] > 0 and hibari["ttfa_ms"]["last"] > 0
        assert hibari["rtf"]["mean"] > 0 and hibari["rtf"]["p95"] >= hibari["rtf"]["p50"]
        assert metrics["models"]["espeak-ng"]["recent_streams"] == 0
        health = client.get("/v1/text2audio/health").json()
        assert next(m for m in health["models"] if m["id"] == "hibari")["loaded"] is True


def test_speaker_profile_cloning_format_and_whole_body(server: RunningServer) -> None:
    with httpx.Client(base_url=server.http, timeout=60) as client:
        # speaker_profile names a voice
        r = client.post(
            "/v1/text2audio/stream",
            json={"model": "espeak-ng", "text": "Bonjour.", "speaker_profile": "fr"},
        )
        assert r.status_code == 200 and r.headers["x-omnistream-voice"] == "fr"
        r = client.post("/v1/text2audio/stream", json={"text": "Hi.", "speaker_profile": "nobody"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_voice"
        # voices here cannot clone: a clear 400 that names the voices there are
        r = client.post(
            "/v1/text2audio/stream",
            json={
                "text": "Hi.",
                "prompt_audio": "/models/voices/reference.wav",
                "reference_text": "reference voice text",
            },
        )
        error = r.json()["error"]
        assert r.status_code == 400 and error["code"] == "voice_cloning_unsupported"
        assert "heart" in error["message"]
        # stream: false returns the whole body at once, as a complete WAV when asked
        r = client.post(
            "/v1/text2audio/hibari",
            json={"text": "One whole file.", "audio_format": "wav", "stream": False,
                  "sample_rate": 16000},
        )
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        assert int(r.headers["content-length"]) == len(r.content)
        with wave.open(io.BytesIO(r.content)) as wav:
            assert wav.getframerate() == 16000 and wav.getnframes() > 8000
        r = client.post("/v1/text2audio/stream", json={"text": "Hi.", "audio_format": "ogg"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_format"


def test_streaming_mode_and_temperature_are_accepted_and_reported(server: RunningServer) -> None:
    with httpx.Client(base_url=server.http, timeout=60) as client:
        r = client.post(
            "/v1/text2audio/stream",
            json={"text": "Token windows please.",
                  "config": {"streaming_mode": "token_window", "temperature": 0.7}},
        )
        assert r.status_code == 200 and r.headers["x-omnistream-streaming-mode"] == "sentence"
        assert r.headers["x-omnistream-config-ignored"] == "streaming_mode,temperature"
        r = client.post(
            "/v1/text2audio/stream",
            json={"text": "Sentences.", "config": {"streaming_mode": "sentence"}},
        )
        assert r.status_code == 200 and "x-omnistream-config-ignored" not in r.headers
        r = client.post(
            "/v1/text2audio/stream", json={"text": "Hi.", "config": {"streaming_mode": "word"}}
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_streaming_mode"
