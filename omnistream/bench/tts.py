"""Concurrent streaming TTS requests, with playback simulated at real time.

Each of ``streams`` workers sends requests back to back (``POST /v1/text2audio/stream``
or the OpenAI ``POST /v1/audio/speech`` with ``response_format: pcm``) and reads the body
as it streams. Per request:

- **TTFA**: request sent → first audio byte received.
- **RTF**: time to receive the whole body / duration of the audio in it (below 1 means
  faster than real time).
- **underruns**: a player that starts at the first byte (plus ``prebuffer_ms``) and plays
  at real time runs dry whenever the next bytes arrive after it needed them; each such
  gap is one underrun and its length adds to the stall time. A stream can be faster
  than real time on average and still underrun if it is bursty.

Errors (refused connection, HTTP status, a body that is not audio, a cut connection,
timeouts) are counted per kind with their first messages; a request never hangs past
``total_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx

from omnistream.bench.errors import ErrorLog
from omnistream.bench.progress import Counters, Progress
from omnistream.bench.stats import client_slipped, describe

Endpoint = Literal["text2audio", "speech"]

TEXT2AUDIO_PATH = "/v1/text2audio/stream"
SPEECH_PATH = "/v1/audio/speech"
SPEECH_PCM_RATE = 24000
"""OpenAI ``response_format: pcm`` is 24 kHz s16le mono by definition."""
LOOP_LAG_INTERVAL_S = 0.05

DEFAULT_TEXTS: tuple[str, ...] = (
    "Hello, and welcome. Today we are going to look at how streaming speech works, "
    "and why the first sound matters more than the last one.",
    "The quick brown fox jumps over the lazy dog. Then it sits down, looks around, "
    "and wonders what all the fuss was about.",
    "Latency is the time between asking and hearing. Jitter is how much that time moves "
    "around. Both decide whether a conversation feels natural.",
    "Please remember to bring your umbrella tomorrow; the forecast says rain in the "
    "morning and strong wind in the afternoon.",
)


@dataclass
class TtsScenario:
    """Everything that defines a TTS run (recorded in the report).

    Attributes:
        url: base ``http://host:port`` of the server (a path, if given, is kept).
        endpoint: ``text2audio`` (PROTOCOLS §4 streaming route) or ``speech`` (OpenAI).
        streams: concurrent request streams.
        requests: requests each stream sends, one after the other.
        texts: texts cycled through by the streams.
        model, voice: sent when set (the OpenAI route needs both on most servers).
        sample_rate: rate asked of ``text2audio`` (None: the server's).
        connect_timeout_s, read_timeout_s: per HTTP operation.
        total_timeout_s: ceiling on one whole request.
        prebuffer_ms: audio a simulated player buffers before it starts.
        stagger_s: delay between the starts of successive streams (0: all at once, the
            harshest case for time to first audio).
        max_loop_lag_ms: event-loop lag beyond which a lag sample counts as slipped; more
            than 5 % slipped samples mean TTFA figures are not trusted.
    """

    url: str
    endpoint: Endpoint = "text2audio"
    streams: int = 1
    requests: int = 2
    texts: list[str] = field(default_factory=lambda: list(DEFAULT_TEXTS))
    model: str | None = None
    voice: str | None = None
    sample_rate: int | None = None
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    total_timeout_s: float = 120.0
    prebuffer_ms: float = 0.0
    stagger_s: float = 0.0
    max_loop_lag_ms: float = 50.0

    def settings(self) -> dict[str, Any]:
        """The scenario as JSON-safe settings."""
        return asdict(self)

    def target_url(self) -> str:
        """The endpoint's URL (the path is added when ``url`` has none)."""
        base = self.url.rstrip("/")
        if base.endswith((TEXT2AUDIO_PATH, SPEECH_PATH)) or re.search(r"/v1/text2audio/", base):
            return base
        return base + (TEXT2AUDIO_PATH if self.endpoint == "text2audio" else SPEECH_PATH)

    def body(self, text: str) -> dict[str, Any]:
        """The JSON request body for ``text``."""
        if self.endpoint == "speech":
            body: dict[str, Any] = {
                "model": self.model or "tts-1",
                "input": text,
                "voice": self.voice or "alloy",
                "response_format": "pcm",
            }
            return body
        body = {"text": text, "audio_format": "pcm_s16le", "stream": True}
        if self.model:
            body["model"] = self.model
        if self.voice:
            body["voice"] = self.voice
        if self.sample_rate:
            body["sample_rate"] = self.sample_rate
        return body


@dataclass
class RequestRecord:
    """One request's figures. Times are seconds since the run started."""

    stream: int
    index: int
    text_chars: int
    start_s: float
    status: int | None = None
    sample_rate: int | None = None
    ttfa_ms: float | None = None
    total_ms: float | None = None
    bytes: int = 0
    audio_s: float | None = None
    rtf: float | None = None
    body_chunks: int = 0
    underruns: int = 0
    stall_ms: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Audio came back complete and without error."""
        return self.error is None and self.audio_s is not None


def simulate_playback(
    arrivals: list[tuple[float, int]], sample_rate: int, prebuffer_s: float = 0.0
) -> tuple[int, float]:
    """Underruns and total stall of a real-time player fed by ``arrivals``.

    Args:
        arrivals: ``(time_s, bytes)`` of each body chunk, in order.
        sample_rate: s16le mono rate of the body.
        prebuffer_s: audio the player waits for after the first byte before it starts.

    Returns:
        ``(underruns, stall_s)``. The player starts at the first arrival plus the
        prebuffer; when it reaches the end of the audio it has before the next chunk
        arrives, it stalls until that chunk is there and then resumes.
    """
    if not arrivals:
        return 0, 0.0
    bytes_per_s = 2.0 * sample_rate
    start = arrivals[0][0] + prebuffer_s
    stall = 0.0
    underruns = 0
    have = 0.0  # seconds of audio received before the current chunk
    for when, size in arrivals:
        if have > 0:
            needed_at = start + stall + have
            if when > needed_at + 1e-6:
                underruns += 1
                stall += when - needed_at
        have += size / bytes_per_s
    return underruns, stall


@dataclass
class TtsRun:
    """All requests of one run against one server."""

    url: str
    label: str
    requests: list[RequestRecord]
    loop_lag_ms: list[float]
    wall_s: float
    scenario: TtsScenario
    errors: ErrorLog

    def client_ok(self) -> tuple[bool, str]:
        """Whether the client's event loop stayed responsive enough to time TTFA.

        It did not when more than 5 % of the loop-lag samples (one every 50 ms, at least
        two) exceed ``max_loop_lag_ms`` (see :func:`client_slipped`).
        """
        bound = self.scenario.max_loop_lag_ms
        behind, over, total = client_slipped(self.loop_lag_ms, bound)
        if behind:
            stats = describe(self.loop_lag_ms)
            return False, (
                f"the benchmark client fell behind: its event loop lagged more than "
                f"{bound:g} ms in {over} of {total} samples (p99 {stats['p99']:.1f} ms, max "
                f"{stats['max']:.1f} ms); the machine running the client is overloaded, so "
                f"TTFA would measure the client"
            )
        return True, "ok"

    def summary(self) -> dict[str, Any]:
        """Figures over every request."""
        ok = [r for r in self.requests if r.ok]
        audio_s = sum(r.audio_s or 0.0 for r in ok)
        client_ok, client_reason = self.client_ok()
        underruns = sum(r.underruns for r in ok)
        held = client_ok and not self.errors.total and underruns == 0 and bool(ok)
        if not client_ok:
            reason = "client fell behind"
        elif self.errors.total:
            reason = f"{self.errors.total} error(s)"
        elif underruns:
            reason = f"{underruns} underrun(s) in real-time playback"
        elif not ok:
            reason = "no request succeeded"
        else:
            reason = "every stream played back without underruns"
        return {
            "url": self.url,
            "label": self.label,
            "endpoint": self.scenario.endpoint,
            "streams": self.scenario.streams,
            "requests": len(self.requests),
            "requests_ok": len(ok),
            "ttfa_ms": describe(r.ttfa_ms for r in ok if r.ttfa_ms is not None),
            "total_ms": describe(r.total_ms for r in ok if r.total_ms is not None),
            "rtf": describe((r.rtf for r in ok if r.rtf is not None), digits=4),
            "underruns": underruns,
            "requests_with_underruns": sum(r.underruns > 0 for r in ok),
            "stall_ms": describe(r.stall_ms for r in ok),
            "bytes": sum(r.bytes for r in self.requests),
            "audio_s": round(audio_s, 3),
            "audio_s_per_wall_s": round(audio_s / self.wall_s, 3) if self.wall_s > 0 else None,
            "sample_rates": sorted({r.sample_rate for r in ok if r.sample_rate}),
            "errors": self.errors.to_dict(),
            "held": held,
            "held_reason": reason,
            "client": {
                "ok": client_ok,
                "reason": client_reason,
                "loop_lag_ms": describe(self.loop_lag_ms),
                "max_loop_lag_ms": self.scenario.max_loop_lag_ms,
            },
            "wall_s": round(self.wall_s, 3),
        }

    def to_dict(self) -> dict[str, Any]:
        """Summary plus every request."""
        return {
            "summary": self.summary(),
            "requests": [
                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(r).items()}
                for r in self.requests
            ],
        }


_RATE_IN_CONTENT_TYPE = re.compile(r"rate=(\d+)")


def _sample_rate(sc: TtsScenario, response: httpx.Response) -> int | None:
    if sc.endpoint == "speech":
        return SPEECH_PCM_RATE
    header = response.headers.get("x-audio-sample-rate")
    if header and header.strip().isdigit():
        return int(header)
    match = _RATE_IN_CONTENT_TYPE.search(response.headers.get("content-type", ""))
    if match:
        return int(match.group(1))
    return sc.sample_rate


def _error_body(body: bytes) -> str:
    text = body[:300].decode("utf-8", "replace").strip()
    return text or "(empty body)"


async def _one_request(
    client: httpx.AsyncClient,
    sc: TtsScenario,
    record: RequestRecord,
    text: str,
    errors: ErrorLog,
    counters: Counters,
) -> None:
    url = sc.target_url()
    arrivals: list[tuple[float, int]] = []
    started = time.monotonic()

    def fail(kind: str, message: str) -> None:
        record.error = f"{kind}: {message}"
        errors.add(kind, message)
        counters.errors += 1

    try:
        async with asyncio.timeout(sc.total_timeout_s):
            async with client.stream("POST", url, json=sc.body(text)) as response:
                record.status = response.status_code
                if response.status_code != 200:
                    body = b""
                    async for part in response.aiter_bytes():
                        body += part
                        if len(body) > 2000:
                            break
                    fail("http_status", f"HTTP {response.status_code}: {_error_body(body)}")
                    return
                content_type = response.headers.get("content-type", "")
                if content_type.startswith(("application/json", "text/")):
                    body = await response.aread()
                    fail(
                        "protocol",
                        f"200 with {content_type!r} instead of audio: {_error_body(body)}",
                    )
                    return
                rate = _sample_rate(sc, response)
                if rate is None:
                    fail("protocol", "no sample rate (no x-audio-sample-rate header)")
                    return
                record.sample_rate = rate
                async for part in response.aiter_bytes():
                    if not part:
                        continue
                    now = time.monotonic()
                    if record.ttfa_ms is None:
                        record.ttfa_ms = round((now - started) * 1000, 3)
                        counters.last_latency_ms = record.ttfa_ms
                    arrivals.append((now, len(part)))
                    record.bytes += len(part)
                    record.body_chunks += 1
    except TimeoutError:
        fail("timeout", f"request exceeded {sc.total_timeout_s:g} s ({record.bytes} bytes read)")
        return
    except httpx.ConnectError as exc:
        fail("connect", f"{url}: {exc}")
        return
    except httpx.TimeoutException as exc:
        fail("timeout", f"{type(exc).__name__} after {record.bytes} bytes: {exc}")
        return
    except httpx.RemoteProtocolError as exc:
        fail("disconnect", f"connection cut after {record.bytes} bytes: {exc}")
        return
    except httpx.HTTPError as exc:
        fail("http", f"{type(exc).__name__}: {exc}")
        return
    finished = time.monotonic()
    record.total_ms = round((finished - started) * 1000, 3)
    if record.bytes == 0:
        fail("empty_audio", "200 with an empty body")
        return
    if record.bytes % 2:
        fail("protocol", f"body of {record.bytes} bytes is not whole int16 samples")
        return
    assert record.sample_rate is not None
    record.audio_s = round(record.bytes / 2 / record.sample_rate, 4)
    record.rtf = round((finished - started) / record.audio_s, 5) if record.audio_s else None
    underruns, stall = simulate_playback(arrivals, record.sample_rate, sc.prebuffer_ms / 1000)
    record.underruns = underruns
    record.stall_ms = round(stall * 1000, 3)


async def _watch_loop_lag(samples: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        expected = loop.time() + LOOP_LAG_INTERVAL_S
        await asyncio.sleep(LOOP_LAG_INTERVAL_S)
        samples.append(round(max(0.0, loop.time() - expected) * 1000, 3))


async def run_tts(scenario: TtsScenario, label: str = "A", progress: bool = False) -> TtsRun:
    """Run ``streams`` concurrent request streams; never raises for server misbehaviour."""
    counters = Counters(planned=scenario.streams * scenario.requests)
    errors = ErrorLog(keep=10)
    records: list[RequestRecord] = []
    lag: list[float] = []
    timeout = httpx.Timeout(
        connect=scenario.connect_timeout_s,
        read=scenario.read_timeout_s,
        write=scenario.read_timeout_s,
        pool=scenario.total_timeout_s,
    )
    limits = httpx.Limits(max_connections=scenario.streams + 4, max_keepalive_connections=None)
    texts = scenario.texts or list(DEFAULT_TEXTS)
    run_t0 = time.monotonic()

    async def stream(index: int) -> None:
        await asyncio.sleep(index * scenario.stagger_s)
        for r in range(scenario.requests):
            text = texts[(index + r) % len(texts)]
            record = RequestRecord(
                stream=index,
                index=r,
                text_chars=len(text),
                start_s=round(time.monotonic() - run_t0, 4),
            )
            records.append(record)
            counters.active += 1
            counters.sent += 1
            try:
                await _one_request(client, scenario, record, text, errors, counters)
            finally:
                counters.active -= 1
                counters.received += 1
                counters.late += record.underruns > 0

    display = Progress(
        f"tts {scenario.endpoint} streams={scenario.streams} [{label}]",
        counters,
        total_s=0,
        enabled=progress,
        unit=lambda c: (
            f"active {c.active} done {c.received}/{c.planned} underrun-reqs {c.late} "
            f"err {c.errors} last TTFA "
            + ("-" if c.last_latency_ms is None else f"{c.last_latency_ms:.0f}ms")
        ),
    )
    # The client is built before the lag watch starts: creating it loads TLS certificates,
    # a one-off stall of the loop that says nothing about the run.
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        lag_task = asyncio.create_task(_watch_loop_lag(lag))
        try:
            async with display.running():
                await asyncio.gather(*(stream(i) for i in range(scenario.streams)))
        finally:
            lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag_task
    records.sort(key=lambda r: (r.stream, r.index))
    return TtsRun(
        url=scenario.target_url(),
        label=label,
        requests=records,
        loop_lag_ms=lag,
        wall_s=time.monotonic() - run_t0,
        scenario=scenario,
        errors=errors,
    )
