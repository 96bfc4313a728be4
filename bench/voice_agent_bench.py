"""Voice agent latency: voice-to-voice, its stages, and barge-in reaction, vs. concurrency.

Starts ``omnistream serve`` (its own process) with a fake OpenAI-compatible chat upstream
on loopback (``tests/fake_llm.py``: a fixed answer, no model time), so every figure is
the server's own: VAD hangover, Whisper, the gateway, TTS, pacing. Each conversation is
one ``WS /v1/realtime`` client that streams microphone-like audio at real time (100 ms
appends of pcm16 24 kHz, questions spoken by the server's own TTS) and, per round:

1. asks a short question and waits for the answer's audio: **voice-to-voice** is from
   the moment the last speech sample of the question was sent to the first audio delta
   received (client clock), next to the server's own breakdown from ``response.done``
   ``usage.latency_ms`` (VAD hangover, transcription, LLM TTFT, TTS first audio);
2. asks for a long story and, one second into its audio, speaks over it: **barge-in**
   is from the first appended chunk holding the interruption's speech to the
   ``response.done`` with status ``cancelled`` (client clock), next to the server's
   ``barge_in_ms`` (onset audio received → response cancelled).

Run from the repository root::

    python bench/voice_agent_bench.py --conversations 1 2 4 8 16 --rounds 2

Writes ``bench/results/voice_agent.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from omnistream_server import omnistream_server  # noqa: E402

from tests.fake_llm import run_fake_llm  # noqa: E402

RATE = 24000
CHUNK_S = 0.1
CHUNK = int(RATE * CHUNK_S) * 2
STAGES = ("vad_hangover_ms", "transcription_ms", "llm_ttft_ms", "tts_first_audio_ms",
          "voice_to_voice_ms")


def speech_end(pcm: bytes) -> int:
    """Byte offset just after the last sample louder than -40 dBFS (the end of speech)."""
    samples = np.abs(np.frombuffer(pcm, dtype="<i2").astype(np.int32))
    loud = np.nonzero(samples > 328)[0]
    return int(loud[-1] + 1) * 2 if loud.size else 0


def speech_start(pcm: bytes) -> int:
    samples = np.abs(np.frombuffer(pcm, dtype="<i2").astype(np.int32))
    loud = np.nonzero(samples > 328)[0]
    return int(loud[0]) * 2 if loud.size else 0


class Conversation:
    """One client: a socket, a paced microphone, and the events it receives."""

    def __init__(self, url: str, silence_ms: int, noise_dbfs: float | None = None) -> None:
        self.url = url
        self.silence_ms = silence_ms
        self.noise = None
        self._noise_at = 0
        if noise_dbfs is not None:
            rng = np.random.default_rng()
            self.noise = (rng.standard_normal(RATE * 10) * 32767 * 10 ** (noise_dbfs / 20)
                          ).astype(np.int32)
        self.events: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()
        self.mic: asyncio.Queue[bytes] = asyncio.Queue()
        self.sent: list[tuple[int, int, float]] = []

    async def run(self, speech: dict[str, bytes], rounds: int) -> list[dict[str, Any]]:
        async with websockets.connect(self.url, max_size=None) as ws:
            self.ws = ws
            reader = asyncio.create_task(self._read())
            mic = asyncio.create_task(self._microphone())
            try:
                await self._expect("session.created")
                await ws.send(json.dumps({"type": "session.update", "session": {
                    "type": "realtime",
                    "audio": {"input": {"turn_detection": {
                        "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                        "silence_duration_ms": self.silence_ms}}}}}))
                await self._expect("session.updated")
                out = []
                for _ in range(rounds):
                    out.append(await self._question(speech["capital"]))
                    out.append(await self._barge_in(speech["story"], speech["stop"]))
                return out
            finally:
                mic.cancel()
                reader.cancel()

    async def _read(self) -> None:
        async for message in self.ws:
            event = json.loads(message)
            if event["type"] == "response.output_audio.delta":
                event["delta"] = len(event["delta"]) * 3 // 4  # bytes, not the audio
            await self.events.put((time.monotonic(), event))

    async def _microphone(self) -> None:
        """Real-time paced appends: speech when queued, silence otherwise."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        pending = b""
        offset = 0
        while True:
            if not pending and not self.mic.empty():
                pending, offset = self.mic.get_nowait(), 0
            chunk, pending = pending[:CHUNK], pending[CHUNK:]
            speaking = bool(chunk)
            chunk += bytes(CHUNK - len(chunk))
            if self.noise is not None:  # a microphone's noise floor under everything
                mixed = np.frombuffer(chunk, dtype="<i2").astype(np.int32) + self.noise[
                    self._noise_at : self._noise_at + CHUNK // 2]
                self._noise_at = (self._noise_at + CHUNK // 2) % (self.noise.size - CHUNK)
                chunk = np.clip(mixed, -32768, 32767).astype("<i2").tobytes()
            await self.ws.send(json.dumps({"type": "input_audio_buffer.append",
                                           "audio": base64.b64encode(chunk).decode()}))
            if speaking:
                self.sent.append((offset, offset + CHUNK, time.monotonic()))
                offset += CHUNK
            next_at += CHUNK_S
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    def _say(self, pcm: bytes) -> None:
        self.sent: list[tuple[int, int, float]] = []
        self.mic.put_nowait(pcm)

    def _sent_at(self, offset: int) -> float:
        """When the chunk holding byte ``offset`` of the current speech was sent."""
        return next(t for start, end, t in self.sent if start <= offset < end)

    async def _expect(self, type_: str, timeout: float = 60.0) -> tuple[float, dict[str, Any]]:
        while True:
            at, event = await asyncio.wait_for(self.events.get(), timeout)
            if event["type"] == type_:
                return at, event

    async def _question(self, pcm: bytes) -> dict[str, Any]:
        self._say(pcm)
        first_audio = None
        while True:
            at, event = await asyncio.wait_for(self.events.get(), 60)
            if event["type"] == "response.output_audio.delta" and first_audio is None:
                first_audio = at
            if event["type"] == "response.done":
                break
        v2v = (first_audio - self._sent_at(speech_end(pcm) - 1)) * 1000 if first_audio else None
        return {"kind": "question", "client_v2v_ms": v2v,
                "server": event["response"]["usage"]["latency_ms"],
                "status": event["response"]["status"]}

    async def _barge_in(self, story: bytes, stop: bytes) -> dict[str, Any]:
        self._say(story)
        audio = 0
        while audio < RATE * 2:  # one second of the answer
            at, event = await asyncio.wait_for(self.events.get(), 60)
            if event["type"] == "response.output_audio.delta":
                audio += event["delta"]
        self._say(stop)
        while True:
            at, event = await asyncio.wait_for(self.events.get(), 60)
            if event["type"] == "response.done":
                break
        cancelled = event["response"]["status"] == "cancelled"
        onset = self._sent_at(speech_start(stop))
        reaction = (at - onset) * 1000 if cancelled else None
        # the interruption is a turn of its own: let its answer finish
        await self._expect("response.done")
        return {"kind": "barge_in", "cancelled": cancelled, "client_reaction_ms": reaction,
                "server": event["response"]["usage"]["latency_ms"]}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(float(np.percentile(values, q)), 1)


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    questions = [r for r in results if r["kind"] == "question" and r["client_v2v_ms"]]
    barges = [r for r in results if r["kind"] == "barge_in"]
    out: dict[str, Any] = {
        "turns": len(questions),
        "client_voice_to_voice_ms": {"p50": pct([r["client_v2v_ms"] for r in questions], 50),
                                     "p95": pct([r["client_v2v_ms"] for r in questions], 95)},
        "server_stages_ms": {},
        "barge_ins": len(barges),
        "barge_in_cancelled": sum(1 for r in barges if r["cancelled"]),
        "client_barge_in_ms": {
            "p50": pct([r["client_reaction_ms"] for r in barges if r["client_reaction_ms"]], 50),
            "p95": pct([r["client_reaction_ms"] for r in barges if r["client_reaction_ms"]], 95)},
        "server_barge_in_ms": {
            "p50": pct([r["server"].get("barge_in_ms") for r in barges
                        if r["server"].get("barge_in_ms") is not None], 50),
            "p95": pct([r["server"].get("barge_in_ms") for r in barges
                        if r["server"].get("barge_in_ms") is not None], 95)},
    }
    for stage in STAGES:
        values = [r["server"][stage] for r in questions if stage in r["server"]]
        out["server_stages_ms"][stage] = {"p50": pct(values, 50), "p95": pct(values, 95)}
    return out


async def run_level(url: str, speech: dict[str, bytes], n: int, rounds: int,
                    silence_ms: int, noise_dbfs: float | None = None) -> dict[str, Any]:
    conversations = [Conversation(url, silence_ms, noise_dbfs) for _ in range(n)]
    started = time.monotonic()
    outcomes = await asyncio.gather(*(c.run(speech, rounds) for c in conversations),
                                    return_exceptions=True)
    results: list[dict[str, Any]] = []
    errors = []
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            errors.append(f"{type(outcome).__name__}: {outcome}")
        else:
            results.extend(outcome)
    return {"conversations": n, "seconds": round(time.monotonic() - started, 1),
            "errors": errors, **summarise(results), "raw": results}


def loop_lag(address: str) -> dict[str, float]:
    """The server's event-loop lag histogram (cumulative buckets, count, sum) from /metrics."""
    text = httpx.get(f"http://{address}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("omnistream_event_loop_lag_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            out[le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("omnistream_event_loop_lag_seconds_count"):
            out["count"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("omnistream_event_loop_lag_seconds_sum"):
            out["sum"] = float(line.rsplit(" ", 1)[1])
    return out


def lag_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Mean and the bucket holding the p95 of the loop lag during one level."""
    count = after.get("count", 0) - before.get("count", 0)
    if count <= 0:
        return {}
    mean = (after.get("sum", 0) - before.get("sum", 0)) / count * 1000
    p95 = None
    for le in sorted((k for k in after if k not in ("count", "sum")),
                     key=lambda k: float("inf") if k == "+Inf" else float(k)):
        if (after[le] - before.get(le, 0)) / count >= 0.95:
            p95 = le
            break
    return {"samples": int(count), "mean_ms": round(mean, 1), "p95_at_most_s": p95}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--silence-ms", type=int, default=200,
                        help="server_vad silence_duration_ms (the VAD hangover)")
    parser.add_argument("--noise-dbfs", type=float, default=-50.0,
                        help="white noise under the microphone audio (a real mic's floor; "
                        "above the VAD's -60 dBFS silence gate, so Silero runs on every "
                        "window); 'off' is --noise-dbfs 0")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "voice_agent.json"))
    args = parser.parse_args()
    noise = args.noise_dbfs if args.noise_dbfs < 0 else None
    with run_fake_llm() as fake, tempfile.TemporaryDirectory() as tmp:
        providers = fake.providers_file(Path(tmp))
        env = {"OMNISTREAM_PROVIDERS_FILE": str(providers), "FAKE_LLM_KEY": "sk-fake",
               "OMNISTREAM_MAX_SESSIONS": "64"}
        with omnistream_server(**env) as (address, _proc):
            speech = {}
            with httpx.Client(timeout=120) as http:
                for key, text in {"capital": "What is the capital of France?",
                                  "story": "Please tell me a long story.",
                                  "stop": "Stop, please."}.items():
                    r = http.post(f"http://{address}/v1/audio/speech", json={
                        "model": "tts-1", "input": text, "response_format": "pcm"})
                    r.raise_for_status()
                    speech[key] = r.content
            url = f"ws://{address}/v1/realtime?model=fake/chat"
            asyncio.run(run_level(url, speech, 1, 1, args.silence_ms))  # warm the models
            levels = []
            for n in args.conversations:
                lag_before = loop_lag(address)
                level = asyncio.run(run_level(url, speech, n, args.rounds, args.silence_ms,
                                              noise))
                level["server_loop_lag_ms"] = lag_delta(lag_before, loop_lag(address))
                levels.append(level)
                v2v = level["client_voice_to_voice_ms"]
                barge = level["client_barge_in_ms"]
                print(f"{n:>3} conversations: voice-to-voice p50 {v2v['p50']} p95 {v2v['p95']} ms"
                      f" | barge-in p50 {barge['p50']} p95 {barge['p95']} ms"
                      f" | cancelled {level['barge_in_cancelled']}/{level['barge_ins']}"
                      f" | errors {len(level['errors'])}", flush=True)
                print("     server stages p50/p95:", json.dumps(level["server_stages_ms"]),
                      "loop lag:", json.dumps(level["server_loop_lag_ms"]), flush=True)
    held = [lv["conversations"] for lv in levels
            if lv["client_voice_to_voice_ms"]["p95"] is not None
            and lv["client_voice_to_voice_ms"]["p95"] < 800 and not lv["errors"]]
    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.platform()}",
        "silence_duration_ms": args.silence_ms,
        "mic_noise_dbfs": noise,
        "rounds": args.rounds,
        "llm": "fake OpenAI-compatible upstream on loopback (fixed answer, no model time)",
        "max_conversations_p95_under_800ms": max(held) if held else 0,
        "levels": levels,
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("conversations held with voice-to-voice p95 < 800 ms:",
          report["max_conversations_p95_under_800ms"])


if __name__ == "__main__":
    main()
