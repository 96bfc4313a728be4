"""WebRTC avatar benchmark: speak latency, A/V skew, encode CPU, sessions per core.

Three scenarios (short runs; write JSON next to this file with ``--out``):

``latency``
    A real server (uvicorn, loopback) and a real aiortc viewer. The viewer sends
    ``speak`` on the data channel and times, on its own clock, the first audio packet
    carrying speech and the first decoded video frame whose mouth region has opened
    (pixels differ from the idle mouth by more than a threshold); 1.2 s into the
    sentence it sends ``interrupt`` and times the last speech packet and the last
    open-mouth frame that still arrive. Also reports what the
    server measured: time to first audio packet sent, A/V skew of sent frames, encode time.

``browser``
    The demo page in headless Chromium while the avatar speaks: the A/V offset the
    browser itself plays out (video minus audio ``estimatedPlayoutTimestamp``).

``capacity``
    Sessions without a network: each session's audio and video tracks are pulled at
    their own pace by the same aiortc encoders an ``RTCRtpSender`` uses (VP8 or H.264 and
    Opus, in the default executor), so the CPU is what the server spends per viewer:
    render, RGB→I420, video and audio encode. The process is pinned to one core and the
    session count rises until a session no longer delivers 25 fps with its frames
    rendered in time.

Run::

    python bench/webrtc_bench.py latency --runs 5
    python bench/webrtc_bench.py browser
    python bench/webrtc_bench.py capacity --codec vp8 --max-sessions 12
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEXTS = [
    "Hello there, how are you doing today?",
    "The quick brown fox jumps over the lazy dog.",
    "Realtime avatars need sound and picture in sync.",
    "Please interrupt me whenever you like.",
    "This is the last sentence of the benchmark.",
]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def dark_share(pixels: np.ndarray) -> float:
    """Share of near-black pixels (the open mouth's cavity) in an RGB region."""
    return float((pixels.mean(axis=-1) < 60).mean())


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "n": len(values),
        "median": round(statistics.median(values), 1),
        "p90": round(pct(values, 0.9), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
    }


# -- latency -----------------------------------------------------------------------------


async def _latency_runs(url: str, runs: int, width: int, height: int, codec: str) -> dict[str, Any]:
    from tests.webrtc_helpers import RtcClient, mouth_box

    client = RtcClient(url, keep_frames=400)
    response = await client.offer(width=width, height=height, fps=25, codec=codec)
    assert response.status_code == 200, response.text
    face = response.json()["avatar"]["face_box"]
    x, y, w, h = mouth_box(face, width, height)
    await client.wait_open()
    await client.wait_video(50)
    # Warm-up utterance: loads the voice model (not part of the figures).
    client.send({"type": "speak", "text": "Warming up."})
    await client.wait_event("speech.ended", within=60)
    await asyncio.sleep(1.0)
    to_audio: list[float] = []
    to_mouth: list[float] = []
    onset_skew: list[float] = []
    server_ttfa: list[float] = []
    server_ttfv: list[float] = []
    sound_stop: list[float] = []
    lips_stop: list[float] = []
    for i in range(runs):
        await asyncio.sleep(0.8)
        recent = client.frames[-10:]
        idle = np.stack([f[y : y + h, x : x + w].astype(np.float32) for _, f in recent])
        reference = idle.mean(axis=0)
        idle_noise = float(np.abs(idle - reference).mean(axis=(1, 2, 3)).max())
        idle_dark = max(dark_share(f) for f in idle)
        sent = time.monotonic()
        client.send({"type": "speak", "text": TEXTS[i % len(TEXTS)]})
        started = await client.wait_event("speech.started", within=30, after=sent)
        await asyncio.sleep(1.2)  # mid-sentence
        stop = time.monotonic()
        client.send({"type": "interrupt"})
        ended = await client.wait_event("speech.ended", within=30, after=sent)
        await asyncio.sleep(0.8)
        audio_at = next((t for t, rms in client.audio_frames if t > sent and rms > 0.01), None)
        last_loud = [t for t, rms in client.audio_frames if t > stop and rms > 0.01]
        threshold = max(4.0, 4 * idle_noise)
        moving, open_at = [], []
        for t, frame in client.frames:
            if t <= sent:
                continue
            mouth = frame[y : y + h, x : x + w].astype(np.float32)
            if float(np.abs(mouth - reference).mean()) > threshold:
                moving.append(t)
            # An open mouth shows its dark cavity; a closed one does not (head sway
            # moves pixels but adds no dark ones), so this tells when the lips shut.
            if dark_share(mouth) > idle_dark + 0.01:
                open_at.append(t)
        mouth_at = moving[0] if moving else None
        sound_stop.append(((last_loud[-1] - stop) * 1000) if last_loud else 0.0)
        after_stop = [t for t in open_at if t > stop]
        lips_stop.append(((after_stop[-1] - stop) * 1000) if after_stop else 0.0)
        if audio_at is not None:
            to_audio.append((audio_at - sent) * 1000)
        if mouth_at is not None:
            to_mouth.append((mouth_at - sent) * 1000)
        if audio_at is not None and mouth_at is not None:
            onset_skew.append((mouth_at - audio_at) * 1000)
        server_ttfa.append(float(started.get("ttfa_ms") or 0.0))
        metrics = [e for e in client.events if e["type"] == "metrics" and e["at"] > ended["at"]]
        if not metrics:
            metrics = [await client.wait_event("metrics", after=ended["at"])]
        if metrics[-1]["metrics"]["ttfv_ms"] is not None:
            server_ttfv.append(float(metrics[-1]["metrics"]["ttfv_ms"]))
    last = [e for e in client.events if e["type"] == "metrics"][-1]["metrics"]
    await client.close()
    return {
        "speak_to_first_audio_packet_ms": summary(to_audio),
        "speak_to_first_open_mouth_frame_ms": summary(to_mouth),
        "mouth_onset_minus_audio_onset_ms": summary(onset_skew),
        "interrupt_to_last_speech_audio_packet_ms": summary(sound_stop),
        "interrupt_to_last_open_mouth_frame_ms": summary(lips_stop),
        "note": "interrupt figures: arrival at the viewer of the last speech packet / last "
        "frame with an open mouth (dark cavity), after the interrupt was sent",
        "server_speak_to_first_audio_sent_ms": summary(server_ttfa),
        "server_speak_to_first_open_mouth_sent_ms": summary(server_ttfv),
        "last_server_metrics": last,
    }


def _histogram(text: str, name: str) -> dict[str, float]:
    """Sum and count of a Prometheus histogram (all label sets) from exposition text."""
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(name + "_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_count"):
            count += float(line.rsplit(" ", 1)[1])
    return {"mean_ms": round(total / count * 1000, 2) if count else 0.0, "count": count}


def latency(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from tests.server import run_server
    from tests.webrtc_helpers import loopback_ice

    with loopback_ice(), run_server() as srv:
        result = asyncio.run(
            _latency_runs(srv.http, args.runs, args.width, args.height, args.codec)
        )
        text = httpx.get(srv.http + "/metrics").text
    result["server_av_skew"] = _histogram(text, "omnistream_webrtc_av_skew_seconds")
    result["server_video_encode"] = _histogram(
        "\n".join(ln for ln in text.splitlines() if 'kind="video"' in ln),
        "omnistream_webrtc_encode_seconds",
    )
    result["server_audio_encode"] = _histogram(
        "\n".join(ln for ln in text.splitlines() if 'kind="audio"' in ln),
        "omnistream_webrtc_encode_seconds",
    )
    return result


# -- browser A/V skew ----------------------------------------------------------------------


def browser(args: argparse.Namespace) -> dict[str, Any]:
    """A/V offset as Chromium plays it: video minus audio ``estimatedPlayoutTimestamp``.

    Both are the sender-clock (NTP) time of what is on screen / in the speaker at the
    moment of the same ``getStats`` call, after Chromium's own lip-sync, so their
    difference is the skew a viewer sees (positive: the picture is ahead).
    """
    from tests.server import run_server
    from tests.webrtc_helpers import Chrome, loopback_ice

    text = " ".join(TEXTS * 2)
    with loopback_ice(), run_server() as srv:
        chrome = Chrome()
        try:
            chrome.get(f"{srv.http}/demo?width={args.width}&height={args.height}")
            chrome.wait_for("return window.omni && window.omni.ready === true")
            chrome.run_async("return await window.omni.connect(arguments[0]);",
                             {"codec": args.codec})
            chrome.wait_for("return window.omni.state === 'connected'", 20)
            time.sleep(3.0)
            chrome.run("window.omni.speak(arguments[0]);", "Warming up the voice.")
            time.sleep(4.0)
            chrome.run("window.omni.speak(arguments[0]);", text)
            chrome.wait_for(
                "return window.omni.events.filter((e) => e.type === 'speech.started')"
                ".length >= 2", 30)
            time.sleep(1.0)
            skews, fps = [], []
            for _ in range(args.samples):
                stats = chrome.run_async("return await window.omni.stats();")
                video, audio = stats["video"], stats["audio"]
                if video.get("estimatedPlayoutTimestamp") and audio.get(
                    "estimatedPlayoutTimestamp"
                ):
                    skews.append(
                        float(video["estimatedPlayoutTimestamp"])
                        - float(audio["estimatedPlayoutTimestamp"])
                    )
                if video.get("framesPerSecond"):
                    fps.append(float(video["framesPerSecond"]))
                time.sleep(0.25)
            metrics = chrome.run("return window.omni.serverMetrics;")
        finally:
            chrome.quit()
    return {
        "browser_video_minus_audio_playout_ms": summary(skews),
        "browser_video_minus_audio_playout_ms_second_half": summary(skews[len(skews) // 2 :]),
        "browser_samples_ms": [round(v) for v in skews],
        "browser_decoded_fps": summary(fps),
        "server_metrics_at_end": metrics,
    }


# -- capacity ----------------------------------------------------------------------------


async def _pull(track: Any, encoder: Any, cpu: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def encode(frame: Any) -> None:
        started = time.thread_time()
        encoder.encode(frame, False)
        cpu.append(time.thread_time() - started)

    while not stop.is_set():
        frame = await track.recv()
        await loop.run_in_executor(None, encode, frame)


async def _capacity(args: argparse.Namespace) -> dict[str, Any]:
    from aiortc.codecs import get_encoder
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    from omnistream.sessions.avatar import ChunkGeometry
    from omnistream.sessions.webrtc import WebRTCAvatarSession, WebRTCSessionConfig
    from omnistream.settings import Settings
    from omnistream.transports.app import build_state

    settings = Settings(avatar_replicas=1)
    state = build_state(settings)
    model = settings.avatar_model
    geometry = ChunkGeometry.from_config(
        {"width": args.width, "height": args.height, "fps": 25}, settings
    )
    opened = await state.avatars.open(model, geometry, None, admit=False)
    prepared, runner = opened.reference.prepared, opened.runner
    opened.close()
    mime = {"vp8": "video/VP8", "h264": "video/H264"}[args.codec]
    video_codec = RTCRtpCodecParameters(mimeType=mime, clockRate=90000, payloadType=96)
    audio_codec = RTCRtpCodecParameters(
        mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111
    )
    rows = []
    for count in args.counts:
        sessions = []
        stop = asyncio.Event()
        video_cpu: list[float] = []
        audio_cpu: list[float] = []
        tasks = []
        for _ in range(count):
            config = WebRTCSessionConfig(model=model, width=args.width, height=args.height)
            session = WebRTCAvatarSession(config, runner, prepared, model_windows=(0.2, 0.032))
            session.start()
            sessions.append(session)
            tasks.append(asyncio.ensure_future(
                _pull(session.video_track, get_encoder(video_codec), video_cpu, stop)
            ))
            tasks.append(asyncio.ensure_future(
                _pull(session.audio_track, get_encoder(audio_codec), audio_cpu, stop)
            ))
        await asyncio.sleep(1.0)  # settle
        for s in sessions:
            s.stats.frames_delivered = s.stats.frames_repeated = 0
            s.stats.frames_skipped = s.stats.frames_dropped_render = 0
        video_cpu.clear()
        audio_cpu.clear()
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(args.seconds)
        cpu1, wall1 = time.process_time(), time.monotonic()
        wall = wall1 - wall0
        delivered = [s.stats.frames_delivered / wall for s in sessions]
        late = [
            (s.stats.frames_repeated + s.stats.frames_skipped) / max(1, s.stats.frames_delivered)
            for s in sessions
        ]
        stop.set()
        for s in sessions:
            await s.aclose("bench")
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        row = {
            "sessions": count,
            "process_cpu_per_session_pct": round((cpu1 - cpu0) / wall / count * 100, 1),
            "process_cpu_pct": round((cpu1 - cpu0) / wall * 100, 1),
            "delivered_fps_min": round(min(delivered), 1),
            "delivered_fps_mean": round(sum(delivered) / len(delivered), 1),
            "late_frame_share_max": round(max(late), 3),
            "video_encode_cpu_ms_per_frame": round(1000 * statistics.mean(video_cpu), 2)
            if video_cpu else None,
            "audio_encode_cpu_ms_per_frame": round(1000 * statistics.mean(audio_cpu), 3)
            if audio_cpu else None,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if row["delivered_fps_min"] < 24.0 or row["late_frame_share_max"] > 0.05:
            break
    await asyncio.to_thread(state.engine.close)
    ok = [r for r in rows if r["delivered_fps_min"] >= 24.0 and r["late_frame_share_max"] <= 0.05]
    best = max(ok, key=lambda r: r["sessions"]) if ok else None
    return {
        "rows": rows,
        "sessions_at_25fps_on_one_core_measured": best["sessions"] if best else 0,
        # What one whole core would carry at the CPU one session cost in the largest
        # run that kept 25 fps (the measured ramp stops early on a busy shared machine).
        "sessions_per_core_from_cpu": round(100.0 / best["process_cpu_per_session_pct"], 1)
        if best else None,
    }


def capacity(args: argparse.Namespace) -> dict[str, Any]:
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    return asyncio.run(_capacity(args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="scenario", required=True)
    p = sub.add_parser("latency")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--width", type=int, default=416)
    p.add_argument("--height", type=int, default=704)
    p.add_argument("--codec", default="vp8")
    p = sub.add_parser("browser")
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--width", type=int, default=416)
    p.add_argument("--height", type=int, default=704)
    p.add_argument("--codec", default="vp8")
    p = sub.add_parser("capacity")
    p.add_argument("--codec", default="vp8")
    p.add_argument("--width", type=int, default=416)
    p.add_argument("--height", type=int, default=704)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8, 10, 12])
    p.add_argument("--core", type=int, default=0, help="pin to this CPU (one core)")
    for q in sub.choices.values():
        q.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()
    started = time.time()
    scenarios = {"latency": latency, "browser": browser, "capacity": capacity}
    result = scenarios[args.scenario](args)
    result["scenario"] = args.scenario
    result["args"] = {k: v for k, v in vars(args).items() if k not in ("out",)}
    result["machine"] = {
        "cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "loadavg_before": os.getloadavg(),
        "python": sys.version.split()[0],
    }
    result["wall_s"] = round(time.time() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
