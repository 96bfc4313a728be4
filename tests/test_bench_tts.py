"""``omnistream bench tts`` against fake TTS servers, and its playback simulation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from omnistream.bench.tts import simulate_playback
from tests.server import free_port
from tests.test_bench_fakes import (
    TtsBehaviour,
    assert_ordered,
    assert_png,
    assert_report_complete,
    fake_tts_server,
    run_bench,
)


def assert_tts_consistent(report: dict[str, Any]) -> None:
    """Summary and per-request records agree; percentiles are ordered."""
    for run in report["runs"]:
        s, reqs = run["summary"], run["requests"]
        ok = [r for r in reqs if r["error"] is None]
        assert s["requests"] == len(reqs) and s["requests_ok"] == len(ok)
        assert s["bytes"] == sum(r["bytes"] for r in reqs)
        assert s["underruns"] == sum(r["underruns"] for r in ok)
        for r in ok:
            assert r["audio_s"] == pytest.approx(r["bytes"] / 2 / r["sample_rate"], abs=1e-3)
            assert r["ttfa_ms"] <= r["total_ms"]
            assert r["rtf"] == pytest.approx(r["total_ms"] / 1000 / r["audio_s"], rel=0.01)
        for key in ("ttfa_ms", "total_ms", "rtf", "stall_ms"):
            assert_ordered(s[key])


def test_healthy_stream_has_no_underruns(tmp_path: Path) -> None:
    b = TtsBehaviour(sample_rate=22050, chunk_ms=40, rtf=0.2, audio_ms=400)
    with fake_tts_server(b) as url:
        args = ["tts", "--url", url, "--streams", "3", "--requests", "2", "--text", "Hello."]
        rc, report, md = run_bench([*args, "--warmup", "1"], tmp_path)
    assert len(b.requests) == 7  # one unrecorded warm-up request, then the six
    assert rc == 0 and report is not None and md is not None
    assert_report_complete(report, "tts")
    assert_tts_consistent(report)
    s = report["summary"]
    assert s["requests"] == s["requests_ok"] == 6
    assert s["sample_rates"] == [22050]  # read from x-audio-sample-rate
    assert s["audio_s"] == pytest.approx(6 * 0.4, abs=0.01)
    assert s["underruns"] == 0 and s["errors"]["total"] == 0 and s["held"]
    assert s["rtf"]["max"] < 1.0
    assert b.requests[0]["path"] == "/v1/text2audio/stream"
    assert b.requests[0]["body"] == {"text": "Hello.", "audio_format": "pcm_s16le", "stream": True}
    assert "| A | 3 | 6/6 |" in md
    assert_png(tmp_path / "ttfa_cdf.png")
    assert_png(tmp_path / "tts_timeline.png")


def test_slower_than_real_time_stream_underruns(tmp_path: Path) -> None:
    # each 40 ms of audio takes 60 ms to arrive: a real-time player runs dry every chunk
    b = TtsBehaviour(chunk_ms=40, rtf=1.5, audio_ms=400)
    with fake_tts_server(b) as url:
        rc, report, md = run_bench(["tts", "--url", url, "--requests", "1"], tmp_path)
    assert rc == 0 and report is not None and md is not None
    assert_tts_consistent(report)
    s = report["summary"]
    assert s["underruns"] >= 5 and s["requests_with_underruns"] == 1
    assert s["stall_ms"]["max"] > 100  # 9 gaps of ~20 ms
    assert s["rtf"]["p50"] > 1.2
    assert not s["held"] and "underrun" in s["held_reason"]


def test_prebuffer_absorbs_a_slow_start(tmp_path: Path) -> None:
    b = TtsBehaviour(chunk_ms=40, rtf=1.2, audio_ms=400)
    with fake_tts_server(b) as url:
        args = ["tts", "--url", url, "--requests", "1", "--prebuffer-ms", "300"]
        rc, report, _ = run_bench(args, tmp_path)
    assert rc == 0 and report is not None
    assert report["summary"]["underruns"] == 0


def test_openai_speech_endpoint_is_24khz_pcm(tmp_path: Path) -> None:
    b = TtsBehaviour(send_header=False)
    with fake_tts_server(b) as url:
        args = ["tts", "--url", url, "--endpoint", "speech", "--voice", "heart"]
        rc, report, _ = run_bench(args, tmp_path)
    assert rc == 0 and report is not None
    assert report["summary"]["sample_rates"] == [24000]
    body = b.requests[0]["body"]
    assert b.requests[0]["path"] == "/v1/audio/speech"
    assert body["response_format"] == "pcm" and body["voice"] == "heart" and body["input"]


def test_http_errors_are_counted_with_messages(tmp_path: Path) -> None:
    with fake_tts_server(TtsBehaviour(status=503)) as url:
        rc, report, md = run_bench(["tts", "--url", url, "--streams", "2"], tmp_path)
    assert rc == 1 and report is not None and md is not None
    s = report["summary"]
    assert s["errors"]["by_kind"] == {"http_status": 4}
    assert "HTTP 503" in s["errors"]["first_messages"][0]
    assert "fake overload" in s["errors"]["first_messages"][0]
    assert s["requests_ok"] == 0 and s["ttfa_ms"]["p50"] is None


def test_non_audio_and_cut_bodies_are_errors(tmp_path: Path) -> None:
    with fake_tts_server(TtsBehaviour(json_body=True)) as url:
        rc, report, _ = run_bench(["tts", "--url", url, "--requests", "1"], tmp_path / "j")
    assert rc == 1 and report is not None
    assert report["summary"]["errors"]["by_kind"] == {"protocol": 1}

    with fake_tts_server(TtsBehaviour(cut_after=3)) as url:
        rc, report, _ = run_bench(["tts", "--url", url, "--requests", "1"], tmp_path / "c")
    assert rc == 1 and report is not None
    assert report["summary"]["errors"]["by_kind"] == {"disconnect": 1}


def test_unreachable_and_stalled_servers_do_not_hang(tmp_path: Path) -> None:
    started = time.monotonic()
    url = f"http://127.0.0.1:{free_port()}"
    rc, report, _ = run_bench(["tts", "--url", url, "--requests", "1"], tmp_path / "u")
    assert rc == 1 and report is not None
    assert report["summary"]["errors"]["by_kind"] == {"connect": 1}

    with fake_tts_server(TtsBehaviour(first_delay_s=5)) as url:
        args = ["tts", "--url", url, "--requests", "1", "--read-timeout", "0.5"]
        rc, report, _ = run_bench(args, tmp_path / "s")
    assert rc == 1 and report is not None
    assert report["summary"]["errors"]["by_kind"] == {"timeout": 1}
    assert time.monotonic() - started < 15


def test_compare_prints_ratios(tmp_path: Path) -> None:
    with (
        fake_tts_server(TtsBehaviour(first_delay_s=0.02)) as fast,
        fake_tts_server(TtsBehaviour(first_delay_s=0.12)) as slow,
    ):
        args = ["tts", "--url", fast, "--compare", slow, "--requests", "2"]
        rc, report, md = run_bench(args, tmp_path)
    assert rc == 0 and report is not None and md is not None
    ratio = report["summary"]["ratios_b_over_a"]["TTFA p50"]["b_over_a"]
    assert ratio > 2
    assert "B / A" in md


def test_playback_simulation_golden() -> None:
    rate = 1000  # 2000 bytes per second of audio
    # 0.1 s of audio every 0.1 s: exactly real time, never dry
    steady = [(i * 0.1, 200) for i in range(10)]
    assert simulate_playback(steady, rate) == (0, 0.0)
    # the third chunk comes 0.3 s after it was needed: one underrun, 0.3 s of stall
    holed = [(0.0, 200), (0.1, 200), (0.5, 200), (0.6, 200)]
    underruns, stall = simulate_playback(holed, rate)
    assert underruns == 1 and stall == pytest.approx(0.3)
    # the same hole with 0.3 s of prebuffer: no underrun
    assert simulate_playback(holed, rate, prebuffer_s=0.3) == (0, 0.0)
    # everything at once: never dry
    assert simulate_playback([(0.0, 2000), (0.01, 2000)], rate) == (0, 0.0)
    assert simulate_playback([], rate) == (0, 0.0)
