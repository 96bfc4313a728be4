"""``WS /v1/text2audio/realtime`` against a real server with a real websockets client."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import websockets

from omnistream.transports.tts_http import find_stream, recent_streams
from tests.server import RunningServer

URL = "/v1/text2audio/realtime"


async def _next_event(ws: Any) -> tuple[dict[str, Any], int]:
    """Next JSON event, and how many binary frames came before it."""
    frames = 0
    while True:
        message = await asyncio.wait_for(ws.recv(), 30)
        if isinstance(message, bytes):
            frames += 1
            continue
        event: dict[str, Any] = json.loads(message)
        return event, frames


async def _create(ws: Any, **fields: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "session.create", **fields}))
    event, _ = await _next_event(ws)
    return event


async def _until(ws: Any, type_: str) -> tuple[dict[str, Any], int, list[dict[str, Any]]]:
    """Read until an event of ``type_``; returns it, the audio bytes and events before it."""
    audio = 0
    seen: list[dict[str, Any]] = []
    while True:
        message = await asyncio.wait_for(ws.recv(), 30)
        if isinstance(message, bytes):
            audio += len(message)
            continue
        event = json.loads(message)
        if event["type"] == type_:
            return event, audio, seen
        seen.append(event)


async def _wait_for(predicate: Any) -> None:
    deadline = time.monotonic() + 30.0
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


async def test_speech_starts_before_the_text_is_complete(server: RunningServer) -> None:
    async with websockets.connect(server.ws + URL) as ws:
        created = await _create(ws, model="hibari", voice="heart", sample_rate=16000)
        assert created == {
            "type": "session.created",
            "model": "hibari",
            "voice": "heart",
            "sample_rate": 16000,
            "chunk_ms": server.settings.tts_chunk_ms,
            "format": "pcm_s16le",
            "pace_lead_ms": None,
        }
        # An LLM writes the first words; nothing else has been sent yet.
        for word in "Sure, I can help with that. Here".split():
            await ws.send(json.dumps({"type": "text.delta", "text": word + " "}))
        started, _ = await _next_event(ws)
        assert started["type"] == "audio.started"
        first_frame = await asyncio.wait_for(ws.recv(), 30)
        assert isinstance(first_frame, bytes) and len(first_frame) == 16000 * 2 * 20 // 1000
        # Only now does the rest of the reply arrive.
        for word in "is the plan for today. We start at nine.".split():
            await ws.send(json.dumps({"type": "text.delta", "text": word + " "}))
        await ws.send(json.dumps({"type": "text.done"}))
        finish, audio, events = await _until(ws, "finish")
    kinds = [e["type"] for e in events]
    assert kinds.count("segment.done") == finish["segments"] >= 3
    metrics = [e for e in events if e["type"] == "metrics"]
    assert metrics and {"first_audio_ms", "rtf", "chunk_index"} <= set(metrics[-1])
    assert metrics[-1]["first_audio_ms"] > 0 and metrics[-1]["rtf"] > 0
    total_samples = audio // 2 + len(first_frame) // 2
    assert abs(total_samples / 16000 * 1000 - finish["audio_ms"]) < 1.0
    assert finish["state"] == "finished" and finish["underruns"] == 0


async def test_cancel_stops_audio_and_synthesis(server: RunningServer) -> None:
    async with websockets.connect(server.ws + URL) as ws:
        await _create(ws, sample_rate=24000)
        text = "This reply goes on and on, sentence after sentence. " * 40
        await ws.send(json.dumps({"type": "text.delta", "text": text}))
        await ws.send(json.dumps({"type": "text.done"}))
        for _ in range(5):
            message = await asyncio.wait_for(ws.recv(), 30)
        await ws.send(json.dumps({"type": "cancel"}))
        cancelled, _audio, _ = await _until(ws, "cancelled")
        assert cancelled["was_speaking"] is True
        stream = recent_streams(server.state)[-1]
        assert stream.state == "cancelled" and stream.cancel_reason == "cancel"
        assert stream.segments_done < stream.segments_queued
        # After `cancelled` no audio of that utterance follows: the next thing is the
        # answer to a new message.
        await ws.send(json.dumps({"type": "bogus"}))
        message = await asyncio.wait_for(ws.recv(), 30)
        assert isinstance(message, str) and json.loads(message)["code"] == "unknown_type"
        # The session speaks again on the next text.
        await ws.send(json.dumps({"type": "text.delta", "text": "Okay, stopping there."}))
        await ws.send(json.dumps({"type": "text.done"}))
        finish, audio, _ = await _until(ws, "finish")
        assert finish["state"] == "finished" and audio > 0
    del message


async def test_paced_session_holds_audio_back_until_it_is_due(server: RunningServer) -> None:
    async with websockets.connect(server.ws + URL) as ws:
        created = await _create(ws, sample_rate=16000, pace_lead_ms=100)
        assert created["pace_lead_ms"] == 100
        await ws.send(json.dumps({"type": "text.delta", "text": "A paced reply. " * 30}))
        await ws.send(json.dumps({"type": "text.done"}))
        frames = 0
        while frames < 5:
            if isinstance(await asyncio.wait_for(ws.recv(), 30), bytes):
                frames += 1
        await ws.send(json.dumps({"type": "cancel"}))
        cancelled, _, _ = await _until(ws, "cancelled")
        stream = recent_streams(server.state)[-1]
    # Far more audio was synthesised than was handed to the client.
    sent_ms = cancelled["chunk_index"] * server.settings.tts_chunk_ms
    assert sent_ms < cancelled["audio_ms"]
    assert stream.audio_s * 1000 == cancelled["audio_ms"]
    bad = None
    async with websockets.connect(server.ws + URL) as ws:
        bad = await _create(ws, pace_lead_ms=-5)
    assert bad["code"] == "invalid_pace"


async def test_disconnect_stops_synthesis(server: RunningServer) -> None:
    # max_queue=None: the client must not stall its own close handshake behind unread audio.
    async with websockets.connect(server.ws + URL, max_queue=None) as ws:
        await _create(ws, sample_rate=16000)
        await ws.send(json.dumps({"type": "text.delta", "text": "Keep talking please. " * 150}))
        await _next_event(ws)  # audio.started
        await asyncio.wait_for(ws.recv(), 30)
        stream = recent_streams(server.state)[-1]
    await _wait_for(lambda: stream.state != "active")
    assert stream.cancel_reason == "client disconnected"
    done_at_cancel = next(e for e in stream.events if e.type == "cancelled").data["segments_done"]
    await asyncio.sleep(0.3)
    assert stream.segments_done == done_at_cancel < stream.segments_queued
    await _wait_for(lambda: server.state.sessions.live("tts") == [])


async def test_bad_messages_get_errors_and_the_socket_survives(server: RunningServer) -> None:
    async with websockets.connect(server.ws + URL) as ws:
        await ws.send(json.dumps({"type": "text.delta", "text": "too early"}))
        assert (await _next_event(ws))[0]["code"] == "no_session"
        assert (await _create(ws, voice="nobody"))["code"] == "invalid_voice"
        assert (await _create(ws, model="no-such-model"))["code"] == "model_not_found"
        rate_error = await _create(ws, sample_rate=12345)
        assert rate_error["code"] == "unsupported_sample_rate" and "16000" in rate_error["message"]
        assert (await _create(ws, sample_rate=16000))["type"] == "session.created"
        await ws.send(b"\x00\x01\x02")
        assert (await _next_event(ws))[0]["code"] == "binary_not_supported"
        await ws.send("{not json")
        assert (await _next_event(ws))[0]["code"] == "invalid_json"
        await ws.send(json.dumps({"type": "text.delta", "text": 42}))
        assert (await _next_event(ws))[0]["code"] == "invalid_type"
        await ws.send(json.dumps({"type": "text.delta", "text": "x " * 5000}))
        assert (await _next_event(ws))[0]["code"] == "text_buffer_full"
        # A flood of deltas while not reading: the backlog is bounded, the rest refused.
        for _ in range(100):
            await ws.send(json.dumps({"type": "text.delta", "text": "Flooding the server. " * 5}))
        codes = []
        while True:
            event, _frames = await _next_event(ws)
            if event["type"] == "error":
                codes.append(event["code"])
                if len(codes) >= 3:
                    break
        assert set(codes) == {"text_buffer_full"}
        stream = recent_streams(server.state)[-1]
        assert stream.pending_chars <= server.settings.max_text_chars
        await ws.send(json.dumps({"type": "cancel"}))
        await _until(ws, "cancelled")
        # After all that, the same socket still speaks.
        await ws.send(json.dumps({"type": "text.delta", "text": "Still here."}))
        await ws.send(json.dumps({"type": "text.done"}))
        finish, audio, _ = await _until(ws, "finish")
        assert finish["state"] == "finished" and audio > 0
        assert find_stream(server.state, finish["stream_id"]) is not None


async def test_concurrent_sockets_each_get_complete_audio(server: RunningServer) -> None:
    async def speak(text: str) -> tuple[int, dict[str, Any]]:
        async with websockets.connect(server.ws + URL) as ws:
            await _create(ws, sample_rate=16000)
            for word in text.split():
                await ws.send(json.dumps({"type": "text.delta", "text": word + " "}))
            await ws.send(json.dumps({"type": "text.done"}))
            finish, audio, _ = await _until(ws, "finish")
            return audio, finish

    texts = [f"Caller {i} hears a complete answer, with every word in it." for i in range(5)]
    results = await asyncio.gather(*(speak(t) for t in texts))
    for audio, finish in results:
        assert finish["state"] == "finished"
        # audio_ms is rounded to 0.1 ms: within one sample at 16 kHz.
        assert abs(audio - finish["audio_ms"] * 16000 / 1000 * 2) <= 2
        assert audio > 16000 * 2
