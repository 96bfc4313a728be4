"""``WS /v1/realtime`` through the official ``openai`` SDK's realtime client.

A real server with the real models (Silero VAD, Whisper tiny.en, hibari), a fake
OpenAI-compatible chat upstream on loopback reached through the gateway's providers
file, and questions spoken by our own TTS at 24 kHz.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import wave
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import soxr
import websockets
from openai import AsyncOpenAI

from omnistream.codecs import g711
from tests.fake_llm import ANSWER, FakeLLM, run_fake_llm
from tests.server import RunningServer, run_server

MODEL = "fake/chat"
RATE = 24000
CHUNK = RATE * 2 // 10  # 100 ms of pcm16
SILENCE = bytes(RATE * 2)  # 1 s


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeLLM]:
    with run_fake_llm() as fake:
        yield fake


@pytest.fixture(scope="module")
def agent_server(fake_llm: FakeLLM, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[RunningServer]:
    os.environ.setdefault("FAKE_LLM_KEY", "sk-fake")
    providers = fake_llm.providers_file(tmp_path_factory.mktemp("providers"))
    # A generous lead: answers go out at synthesis speed for 2 s, then at real time.
    with run_server(providers_file=str(providers), realtime_output_lead_ms=2000,
                    realtime_llm_timeout_s=2.0, realtime_tool_timeout_s=1.0) as srv:
        yield srv


@pytest.fixture(scope="module")
def speech(agent_server: RunningServer) -> dict[str, bytes]:
    """Questions spoken by the server's own TTS: pcm16 mono 24 kHz."""
    out = {}
    with httpx.Client(timeout=120) as client:
        for key, text in {
            "capital": "What is the capital of France?",
            "story": "Please tell me a long story.",
            "stop": "Stop, please.",
            "yes": "Yes.",
        }.items():
            r = client.post(agent_server.http + "/v1/audio/speech", json={
                "model": "tts-1", "input": text, "voice": "alloy", "response_format": "pcm"})
            assert r.status_code == 200
            out[key] = r.content
    return out


def _client(srv: RunningServer) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=srv.http + "/v1", api_key="sk-test")


async def _speak(conn: Any, pcm: bytes, *, realtime: bool = False) -> None:
    """Append audio in 100 ms events (optionally at real time, as a microphone would)."""
    for i in range(0, len(pcm), CHUNK):
        await conn.send({"type": "input_audio_buffer.append",
                         "audio": base64.b64encode(pcm[i : i + CHUNK]).decode()})
        await asyncio.sleep(0.1 if realtime else 0.005)


async def _events(conn: Any, timeout: float = 30.0) -> AsyncIterator[dict[str, Any]]:
    """Raw server events as dicts (the SDK's parsed models carry the same fields)."""
    while True:
        raw = await asyncio.wait_for(conn.recv_bytes(), timeout)
        yield json.loads(raw)


async def _until(conn: Any, type_: str, seen: list[dict[str, Any]],
                 timeout: float = 30.0) -> dict[str, Any]:
    async for event in _events(conn, timeout):
        seen.append(event)
        if event["type"] == type_:
            return event
    raise AssertionError("unreachable")


def _wav(pcm: bytes, rate: int = RATE) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


async def _transcribe(srv: RunningServer, pcm: bytes) -> str:
    """What our Whisper hears in some pcm16 24 kHz audio (the OpenAI transcription route)."""
    result = await _client(srv).audio.transcriptions.create(
        model="whisper-1", file=("answer.wav", _wav(pcm), "audio/wav"))
    return result.text


VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
       "silence_duration_ms": 300}


async def test_spoken_question_gets_a_spoken_answer(
    agent_server: RunningServer, speech: dict[str, bytes], fake_llm: FakeLLM
) -> None:
    async with _client(agent_server).realtime.connect(model=MODEL) as conn:
        created = await conn.recv()
        assert created.type == "session.created"
        assert created.session.type == "realtime"
        await conn.session.update(session={
            "type": "realtime",
            "instructions": "Answer in one sentence.",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                "transcription": {"model": "whisper-1"},
                                "turn_detection": VAD},
                      "output": {"format": {"type": "audio/pcm", "rate": 24000},
                                 "voice": "alloy"}},
        })
        updated = await conn.recv()
        assert updated.type == "session.updated"
        assert updated.session.audio.input.turn_detection.silence_duration_ms == 300

        await _speak(conn, SILENCE[: RATE] + speech["capital"] + SILENCE)
        seen: list[dict[str, Any]] = []
        done = await _until(conn, "response.done", seen)
        kinds = [e["type"] for e in seen]
        for expected in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed", "response.created",
                         "response.output_audio_transcript.done"):
            assert expected in kinds, f"{expected} missing from {kinds}"
        assert kinds.index("input_audio_buffer.speech_started") < kinds.index(
            "input_audio_buffer.speech_stopped") < kinds.index("response.created")
        # The user's turn, transcribed (it may arrive before or after the response ends).
        while not any(e["type"].endswith("input_audio_transcription.completed") for e in seen):
            seen.append(await anext(_events(conn)))
        user = next(e for e in seen
                    if e["type"] == "conversation.item.input_audio_transcription.completed")
        assert "capital" in user["transcript"].lower()
        assert "france" in user["transcript"].lower()
        # The LLM was asked with those words and the instructions.
        messages = fake_llm.requests[-1]["messages"]
        assert messages[0] == {"role": "system", "content": "Answer in one sentence."}
        assert "capital" in messages[-1]["content"].lower()

        assert done["response"]["status"] == "completed"
        transcript = next(e for e in seen
                          if e["type"] == "response.output_audio_transcript.done")
        assert transcript["transcript"] == ANSWER
        deltas = [e for e in seen if e["type"] == "response.output_audio.delta"]
        assert deltas and all(d["response_id"] == done["response"]["id"] for d in deltas)
        assert all(d["item_id"] == transcript["item_id"] for d in deltas)
        pcm = b"".join(base64.b64decode(d["delta"]) for d in deltas)
        assert len(pcm) / 2 / RATE > 1.0
        heard = (await _transcribe(agent_server, pcm)).lower()
        assert "paris" in heard
        latency = done["response"]["usage"]["latency_ms"]
        for stage in ("voice_to_voice_ms", "vad_hangover_ms", "llm_ttft_ms",
                      "tts_first_audio_ms"):
            assert latency[stage] >= 0
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(agent_server.http + "/metrics")).text
    assert 'omnistream_voice_agent_latency_seconds_count{stage="voice_to_voice"}' in metrics


async def test_barge_in_cancels_and_truncates(
    agent_server: RunningServer, speech: dict[str, bytes]
) -> None:
    async with _client(agent_server).realtime.connect(model=MODEL) as conn:
        await conn.recv()
        await conn.session.update(session={"type": "realtime", "audio": {
            "input": {"turn_detection": VAD}}})
        await _speak(conn, speech["story"] + SILENCE)
        seen: list[dict[str, Any]] = []
        audio_ms = 0.0
        async for event in _events(conn):
            seen.append(event)
            if event["type"] == "response.output_audio.delta":
                audio_ms += len(base64.b64decode(event["delta"])) / 2 / RATE * 1000
                if audio_ms > 2500:
                    break
        # The person speaks over the answer, as a microphone sends it.
        speaker = asyncio.create_task(_speak(conn, speech["stop"] + SILENCE, realtime=True))
        started = await _until(conn, "input_audio_buffer.speech_started", seen)
        after: list[dict[str, Any]] = []
        done = await _until(conn, "response.done", after)
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"]["reason"] == "turn_detected"
        assert done["response"]["usage"]["latency_ms"]["barge_in_ms"] >= 0  # figures: bench/
        truncated = [e for e in after if e["type"] == "conversation.item.truncated"]
        assert truncated and 0 < truncated[0]["audio_end_ms"] < audio_ms + sum(
            len(base64.b64decode(e["delta"])) / 48 for e in after
            if e["type"] == "response.output_audio.delta")
        cut = next(e for e in after if e["type"] == "response.output_audio_transcript.done")
        assert 0 < len(cut["transcript"]) < 200  # the story is ~500 characters
        cancelled_id = done["response"]["id"]
        # Listening again: the interruption becomes the next turn and gets its own answer,
        # and the cancelled answer sends no more audio.
        nxt = await _until(conn, "response.done", after)
        await speaker
        assert nxt["response"]["id"] != cancelled_id
        late = after[after.index(done) + 1 :]
        assert not any(e["type"] == "response.output_audio.delta"
                       and e["response_id"] == cancelled_id for e in late)
        assert started["audio_start_ms"] > 0


async def test_function_call_round_trip(agent_server: RunningServer) -> None:
    tool = {"type": "function", "name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    async with _client(agent_server).realtime.connect(model=MODEL) as conn:
        await conn.recv()
        await conn.session.update(session={
            "type": "realtime", "output_modalities": ["text"], "tools": [tool],
            "audio": {"input": {"turn_detection": None}}})
        await conn.recv()
        await conn.conversation.item.create(item={
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "What is the weather in Paris?"}]})
        await conn.response.create()
        seen: list[dict[str, Any]] = []
        done = await _until(conn, "response.done", seen)
        args = next(e for e in seen if e["type"] == "response.function_call_arguments.done")
        assert args["name"] == "get_weather"
        assert json.loads(args["arguments"]) == {"city": "Paris"}
        assert done["response"]["output"][0]["type"] == "function_call"
        await conn.conversation.item.create(item={
            "type": "function_call_output", "call_id": args["call_id"],
            "output": json.dumps({"forecast": "sunny"})})
        await conn.response.create()
        seen = []
        done = await _until(conn, "response.done", seen)
        text = next(e for e in seen if e["type"] == "response.output_text.done")
        assert text["text"] == "It is sunny today."
        assert done["response"]["status"] == "completed"
        # A call whose output never comes: reported, then answered as failed.
        await conn.conversation.item.create(item={
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "And the weather tomorrow?"}]})
        await conn.response.create()
        await _until(conn, "response.done", seen)
        error = await _until(conn, "error", seen, timeout=10)
        assert error["error"]["code"] == "tool_output_timeout"
        await conn.response.create()
        seen = []
        await _until(conn, "response.done", seen)
        text = next((e for e in seen if e["type"] == "response.output_text.done"), None)
        assert text is not None, [e["type"] for e in seen] + [json.dumps(seen[-1])[:600]]
        assert text["text"] == "It is unknown today."


async def test_an_audio_item_is_transcribed_for_the_llm(
    agent_server: RunningServer, speech: dict[str, bytes], fake_llm: FakeLLM
) -> None:
    async with _client(agent_server).realtime.connect(model=MODEL) as conn:
        await conn.recv()
        await conn.session.update(session={
            "type": "realtime", "output_modalities": ["text"],
            "audio": {"input": {"turn_detection": None,
                                "transcription": {"model": "whisper-1"}}}})
        await conn.conversation.item.create(item={
            "type": "message", "role": "user",
            "content": [{"type": "input_audio",
                         "audio": base64.b64encode(speech["capital"]).decode()}]})
        seen: list[dict[str, Any]] = []
        heard = await _until(conn, "conversation.item.input_audio_transcription.completed",
                             seen)
        assert "capital" in heard["transcript"].lower()
        await conn.response.create()
        done = await _until(conn, "response.done", seen)
        assert done["response"]["status"] == "completed"
        assert "capital" in fake_llm.requests[-1]["messages"][-1]["content"].lower()
        # A one-word turn: Whisper's fitted window must not make it repeat itself.
        await conn.conversation.item.create(item={
            "type": "message", "role": "user",
            "content": [{"type": "input_audio",
                         "audio": base64.b64encode(speech["yes"]).decode()}]})
        heard = await _until(conn, "conversation.item.input_audio_transcription.completed",
                             seen)
        assert heard["transcript"].strip(" .!").lower() == "yes"


async def test_protocol_errors_keep_the_socket(agent_server: RunningServer) -> None:
    async with _client(agent_server).realtime.connect(model=MODEL) as conn:
        await conn.recv()
        seen: list[dict[str, Any]] = []
        await conn.send({"type": "no.such.event", "event_id": "evt_1"})
        error = await _until(conn, "error", seen)
        assert error["error"]["event_id"] == "evt_1"
        assert error["error"]["code"] == "invalid_event"
        await conn.send({"type": "input_audio_buffer.append", "audio": "%%%",
                         "event_id": "evt_2"})
        error = await _until(conn, "error", seen)
        assert (error["error"]["code"], error["error"]["event_id"]) == ("invalid_audio", "evt_2")
        await conn.send({"type": "session.update", "event_id": "evt_3", "session": {
            "type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm",
                                                               "rate": 16000}}}}})
        error = await _until(conn, "error", seen)
        assert error["error"]["event_id"] == "evt_3"
        assert error["error"]["param"] == "session.audio.input.format.rate"
        # An OpenAI model name in an update: the rest applies, the model gets an error.
        await conn.send({"type": "session.update", "event_id": "evt_m", "session": {
            "type": "realtime", "model": "gpt-realtime", "instructions": "Be terse."}})
        updated = await _until(conn, "session.updated", seen)
        assert (updated["session"]["model"], updated["session"]["instructions"]) == (
            MODEL, "Be terse.")
        error = await _until(conn, "error", seen)
        assert (error["error"]["code"], error["error"]["event_id"]) == ("invalid_model", "evt_m")
        await conn.send({"type": "input_audio_buffer.commit", "event_id": "evt_4"})
        error = await _until(conn, "error", seen)
        assert error["error"]["code"] == "input_audio_buffer_commit_empty"
        # One item cannot hold unbounded text (a session's memory stays bounded).
        await conn.send({"type": "conversation.item.create", "event_id": "evt_big", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "x" * (300 * 1024)}]}})
        error = await _until(conn, "error", seen)
        assert (error["error"]["code"], error["error"]["event_id"]) == ("invalid_value",
                                                                        "evt_big")
        # A provider that hangs mid-answer: the response fails, the session goes on.
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "audio": {"input": {"turn_detection": None}}})
        await conn.conversation.item.create(item={
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "hang on"}]})
        await conn.response.create()
        await _until(conn, "response.created", seen)
        await conn.send({"type": "response.create", "event_id": "evt_5"})
        error = await _until(conn, "error", seen)
        assert error["error"]["code"] == "conversation_already_has_active_response"
        assert error["error"]["event_id"] == "evt_5"
        done = await _until(conn, "response.done", seen)
        assert done["response"]["status"] == "failed"
        assert any(e["type"] == "error" and e["error"]["code"] == "llm_timeout" for e in seen)
        # A provider that fails: the same, with the gateway's code.
        await conn.conversation.item.create(item={
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Now fail, please."}]})
        await conn.response.create()
        seen = []
        done = await _until(conn, "response.done", seen)
        assert done["response"]["status"] == "failed"
        failure = next(e for e in seen if e["type"] == "error")
        assert "language model failed" in failure["error"]["message"]
        await conn.conversation.item.create(item={
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "And now?"}]})
        await conn.response.create()
        done = await _until(conn, "response.done", seen)
        assert done["response"]["status"] == "completed"


async def test_beta_protocol_names_and_g711_output(agent_server: RunningServer) -> None:
    async with _client(agent_server).realtime.connect(
        model=MODEL, extra_headers={"OpenAI-Beta": "realtime=v1"}
    ) as conn:
        first = json.loads(await conn.recv_bytes())
        assert first["type"] == "session.created"
        assert first["session"]["input_audio_format"] == "pcm16"
        await conn.send({"type": "session.update", "session": {
            "modalities": ["text", "audio"], "output_audio_format": "g711_alaw",
            "turn_detection": None, "voice": "alloy"}})
        updated = json.loads(await conn.recv_bytes())
        assert updated["session"]["output_audio_format"] == "g711_alaw"
        await conn.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Capital of France?"}]}})
        await conn.send({"type": "response.create"})
        seen: list[dict[str, Any]] = []
        done = await _until(conn, "response.done", seen)
        kinds = {e["type"] for e in seen}
        assert {"conversation.item.created", "response.audio.delta",
                "response.audio_transcript.done"} <= kinds
        assert not {"response.output_audio.delta", "conversation.item.added"} & kinds
        assert done["response"]["modalities"] == ["text", "audio"]
        alaw = b"".join(base64.b64decode(e["delta"]) for e in seen
                        if e["type"] == "response.audio.delta")
        pcm8k = np.frombuffer(g711.decode(alaw, "alaw"), dtype="<i2")
        assert 1.0 < pcm8k.size / 8000 < 6.0  # one byte per 8 kHz sample
        assert np.abs(pcm8k).max() > 1000


KEY = "sk-realtime-test"


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """No providers file at all, and API keys on."""
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(KEY + "\n")
    with run_server(api_key_file=str(keys)) as srv:
        yield srv


async def test_transcription_session_needs_no_provider(
    bare_server: RunningServer, speech: dict[str, bytes]
) -> None:
    srv = bare_server
    client = AsyncOpenAI(base_url=srv.http + "/v1", api_key=KEY)
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        created = json.loads(await conn.recv_bytes())
        assert created["session"]["type"] == "transcription"
        await conn.send({"type": "session.update", "session": {
            "type": "transcription",
            "audio": {"input": {"format": {"type": "audio/pcmu"},
                                "transcription": {"model": "whisper-1", "language": "en"},
                                "turn_detection": VAD}}}})
        # Telephone audio: G.711 μ-law at 8 kHz.
        pcm = np.frombuffer(speech["capital"] + SILENCE, dtype="<i2").astype(np.float32)
        narrow = soxr.resample(pcm / 32768.0, RATE, 8000)
        ulaw = g711.encode((np.clip(narrow, -1, 1) * 32767).astype("<i2").tobytes(), "ulaw")
        for i in range(0, len(ulaw), 800):
            await conn.send({"type": "input_audio_buffer.append",
                             "audio": base64.b64encode(ulaw[i : i + 800]).decode()})
        seen: list[dict[str, Any]] = []
        done = await _until(
            conn, "conversation.item.input_audio_transcription.completed", seen)
        assert "capital" in done["transcript"].lower()
        assert not any(e["type"].startswith("response.") for e in seen)
        await conn.send({"type": "response.create", "event_id": "evt_r"})
        error = await _until(conn, "error", seen)
        assert error["error"]["event_id"] == "evt_r"
    # A conversation needs a model the providers file serves: refused at the handshake.
    with pytest.raises(Exception) as refused:
        async with client.realtime.connect(model="nobody/nothing") as conn:
            await conn.recv()
    assert "404" in str(refused.value)


def test_g711_round_trip() -> None:
    tone = (np.sin(np.arange(8000) * 2 * np.pi * 440 / 8000) * 12000).astype("<i2")
    for law in ("ulaw", "alaw"):
        back = np.frombuffer(g711.decode(g711.encode(tone.tobytes(), law), law), dtype="<i2")
        assert np.max(np.abs(back.astype(int) - tone)) < 12000 * 0.04


async def test_keys_guard_the_handshake_and_client_secrets_open_it(
    bare_server: RunningServer,
) -> None:
    srv = bare_server
    bare = AsyncOpenAI(base_url=srv.http + "/v1", api_key="sk-wrong")
    with pytest.raises(Exception) as refused:
        async with bare.realtime.connect(extra_query={"intent": "transcription"}) as conn:
            await conn.recv()
    assert "401" in str(refused.value)
    keyed = AsyncOpenAI(base_url=srv.http + "/v1", api_key=KEY)
    async with keyed.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        assert (await conn.recv()).type == "session.created"
    # A browser: a client secret minted with the key, sent as a subprotocol.
    secret = (await keyed.realtime.client_secrets.create()).value
    url = srv.ws + "/v1/realtime?intent=transcription"
    async with websockets.connect(url, subprotocols=[  # type: ignore[list-item]
        "realtime", f"openai-insecure-api-key.{secret}"]) as ws:
        assert ws.subprotocol == "realtime"
        assert json.loads(await ws.recv())["type"] == "session.created"
