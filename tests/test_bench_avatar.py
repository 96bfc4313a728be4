"""``omnistream bench avatar`` against fake servers whose (mis)behaviour is exactly known.

Chunks are 3200 samples (200 ms) and runs last about a second, so each test takes one
to three seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.server import free_port
from tests.test_bench_fakes import (
    AvatarBehaviour,
    assert_avatar_run_consistent,
    assert_png,
    assert_report_complete,
    fake_avatar_server,
    fake_tts_server,
    run_bench,
)

SHORT = ["--duration", "1.0", "--chunk-samples", "3200"]


def test_healthy_flashtalk_server_gives_complete_consistent_report(tmp_path: Path) -> None:
    with fake_avatar_server(AvatarBehaviour(render_s=0.01)) as fake:
        args = ["avatar", "--url", fake.url, "--sessions", "3", "--warmup", "1", *SHORT]
        rc, report, md = run_bench(args, tmp_path)
        assert fake.connections == 4  # one unrecorded warm-up session, then the three
    assert rc == 0 and report is not None and md is not None
    assert_report_complete(report, "avatar")
    run = report["runs"][0]
    assert_avatar_run_consistent(run)
    s = report["summary"]
    assert s["sessions"] == 3 and s["sessions_initialised"] == 3
    assert s["chunks_planned"] == s["chunks_answered"] == 15  # 1 s of 200 ms chunks × 3
    # 3200 samples at 25 fps = 5 frames per chunk, all of them delivered
    assert s["frames_received"] == s["frames_expected"] == 75
    assert s["frames_per_chunk"]["min"] == s["frames_per_chunk"]["max"] == 5
    assert s["late_chunks"] == 0 and s["errors"]["total"] == 0 and s["held"]
    assert s["ttff_ms"]["count"] == 3 and s["latency_ms"]["p50"] < 200
    assert 20 < s["delivered_fps"]["mean"] < 30
    assert all(sess["closed_cleanly"] for sess in run["sessions"])
    # the server saw the geometry we asked for, and the synthesised audio
    assert fake.inits[0]["chunk_samples"] == 3200 and fake.inits[0]["ref_image"]
    assert "| A | 3 | 15/15 |" in md
    for name in ("latency_cdf.png", "latency_timeline.png"):
        assert_png(tmp_path / name)


def test_native_protocol_records_server_metrics(tmp_path: Path) -> None:
    with fake_avatar_server(AvatarBehaviour(protocol="native")) as fake:
        base = fake.url.replace("/v1/avatar/realtime", "/")
        args = ["avatar", "--url", base, "--protocol", "native", "--sessions", "2", *SHORT]
        rc, report, _ = run_bench(args, tmp_path)
    assert rc == 0 and report is not None
    assert_avatar_run_consistent(report["runs"][0])
    s = report["summary"]
    assert s["url"].endswith("/v1/avatar/realtime")  # path filled in for native
    assert s["chunks_answered"] == 10 and s["errors"]["total"] == 0
    series = report["runs"][0]["sessions"][0]["series"]
    assert series[0]["server"]["infer_ms"] == 1.0  # the metrics event before each VIDX
    assert fake.inits[0]["type"] == "session.create"


def test_slow_server_is_reported_late_and_not_held(tmp_path: Path) -> None:
    # 300 ms of work per 200 ms chunk: the backlog grows, every chunk after the first
    # arrives after the next one was due.
    with fake_avatar_server(AvatarBehaviour(render_s=0.3)) as fake:
        rc, report, md = run_bench(["avatar", "--url", fake.url, *SHORT], tmp_path)
    assert rc == 0 and report is not None and md is not None
    assert_avatar_run_consistent(report["runs"][0])
    s = report["summary"]
    assert s["chunks_answered"] == 5
    assert s["late_chunks"] >= 4
    assert not s["held"] and "with late chunks" in s["held_reason"]
    latencies = [c["latency_ms"] for c in report["runs"][0]["sessions"][0]["series"]]
    assert latencies[-1] > latencies[0] + 200  # the backlog shows up as growing latency
    assert s["delivered_fps"]["mean"] < 20  # 5 frames per 300 ms ≈ 16.7 fps
    assert "| no |" in md


def test_error_replies_are_counted_with_first_messages(tmp_path: Path) -> None:
    with fake_avatar_server(AvatarBehaviour(error_chunks={1, 3})) as fake:
        rc, report, md = run_bench(["avatar", "--url", fake.url, *SHORT], tmp_path)
    assert rc == 0 and report is not None and md is not None
    s = report["summary"]
    assert s["errors"]["by_kind"] == {"server_error": 2}
    assert "Generate failed: fake failure on chunk 1" in s["errors"]["first_messages"][0]
    assert s["chunks_answered"] == 3 and not s["held"]
    series = report["runs"][0]["sessions"][0]["series"]
    assert [c["error"] is not None for c in series] == [False, True, False, True, False]
    assert "server_error ×2" in md


def test_malformed_vidx_is_an_error_not_a_crash(tmp_path: Path) -> None:
    with fake_avatar_server(AvatarBehaviour(malformed_chunks={0, 2})) as fake:
        rc, report, _ = run_bench(["avatar", "--url", fake.url, *SHORT], tmp_path)
    assert rc == 0 and report is not None
    s = report["summary"]
    assert s["errors"]["by_kind"] == {"malformed_vidx": 2}
    assert "bad_length" in s["errors"]["first_messages"][0]
    assert s["chunks_answered"] == 3
    assert_avatar_run_consistent(report["runs"][0])


def test_json_interleaved_on_flashtalk_route_is_a_protocol_error(tmp_path: Path) -> None:
    with fake_avatar_server(AvatarBehaviour(interleave_text=True)) as fake:
        rc, report, _ = run_bench(["avatar", "--url", fake.url, *SHORT], tmp_path)
    assert rc == 0 and report is not None
    s = report["summary"]
    assert s["errors"]["by_kind"] == {"protocol": 5}
    assert "interleaved" in s["errors"]["first_messages"][0]
    assert s["chunks_answered"] == 5  # the VIDX still count


def test_wrong_frame_size_is_reported(tmp_path: Path) -> None:
    with fake_avatar_server(AvatarBehaviour(wrong_size=True)) as fake:
        rc, report, _ = run_bench(["avatar", "--url", fake.url, *SHORT], tmp_path)
    assert rc == 0 and report is not None
    assert report["summary"]["errors"]["by_kind"] == {"frame_size": 5}
    assert "(66, 98)" in report["summary"]["errors"]["first_messages"][0]


def test_dropped_connection_is_a_disconnect(tmp_path: Path) -> None:
    with fake_avatar_server(AvatarBehaviour(drop_after=2)) as fake:
        rc, report, _ = run_bench(["avatar", "--url", fake.url, *SHORT], tmp_path)
    assert rc == 0 and report is not None
    s = report["summary"]
    assert s["disconnects"] == 1
    assert s["errors"]["by_kind"]["disconnect"] == 1
    assert s["chunks_answered"] == 2 and not s["held"]


def test_unreachable_url_fails_fast_with_exit_1(tmp_path: Path) -> None:
    url = f"ws://127.0.0.1:{free_port()}/"
    started = time.monotonic()
    rc, report, md = run_bench(["avatar", "--url", url, "--sessions", "2", *SHORT], tmp_path)
    assert time.monotonic() - started < 10
    assert rc == 1 and report is not None and md is not None
    s = report["summary"]
    assert s["errors"]["by_kind"] == {"connect": 2}
    assert url in s["errors"]["first_messages"][0]
    assert s["chunks_answered"] == 0 and s["latency_ms"]["p50"] is None
    assert "connect ×2" in md


def test_wrong_protocol_and_silent_servers_do_not_hang(tmp_path: Path) -> None:
    with fake_avatar_server(AvatarBehaviour(init_reply="garbage")) as fake:
        rc, report, _ = run_bench(["avatar", "--url", fake.url, *SHORT], tmp_path / "g")
    assert rc == 1 and report is not None
    assert report["summary"]["errors"]["by_kind"] == {"protocol": 1}
    assert "expected 'init_ok'" in report["summary"]["errors"]["first_messages"][0]

    with fake_avatar_server(AvatarBehaviour(init_reply="missing_fields")) as fake:
        rc, report, _ = run_bench(["avatar", "--url", fake.url, *SHORT], tmp_path / "m")
    assert rc == 1 and report is not None
    assert "slice_len" in report["summary"]["errors"]["first_messages"][0]

    with fake_avatar_server(AvatarBehaviour(init_reply="error")) as fake:
        rc, report, _ = run_bench(["avatar", "--url", fake.url, *SHORT], tmp_path / "e")
    assert rc == 1 and report is not None
    assert "Init failed: no GPU today" in report["summary"]["errors"]["first_messages"][0]

    started = time.monotonic()
    with fake_avatar_server(AvatarBehaviour(init_reply="silent")) as fake:
        args = ["avatar", "--url", fake.url, "--init-timeout", "0.5", *SHORT]
        rc, report, _ = run_bench(args, tmp_path / "s")
    assert time.monotonic() - started < 10
    assert rc == 1 and report is not None
    assert report["summary"]["errors"]["by_kind"] == {"init_timeout": 1}


def test_http_server_without_websocket_is_a_connect_error(tmp_path: Path) -> None:
    with fake_tts_server() as base:
        url = base.replace("http://", "ws://") + "/"
        rc, report, _ = run_bench(["avatar", "--url", url, *SHORT], tmp_path)
    assert rc == 1 and report is not None
    assert report["summary"]["errors"]["by_kind"] == {"connect": 1}


def test_unanswered_chunks_time_out_and_close_is_bounded(tmp_path: Path) -> None:
    # render takes far longer than the response timeout; close is never answered
    behaviour = AvatarBehaviour(render_s=5.0, ignore_close=True)
    started = time.monotonic()
    with fake_avatar_server(behaviour) as fake:
        args = ["avatar", "--url", fake.url, "--response-timeout", "0.5", *SHORT]
        rc, report, _ = run_bench(args, tmp_path)
    assert time.monotonic() - started < 10
    assert rc == 1 and report is not None
    s = report["summary"]
    assert s["errors"]["by_kind"] == {"timeout": 1}
    assert "no reply to chunk 0" in s["errors"]["first_messages"][0]


def test_client_that_fell_behind_refuses_to_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A zero tolerance for the client's own send lateness: no real client meets it.
    with fake_avatar_server() as fake:
        args = ["avatar", "--url", fake.url, "--max-pacing-error-ms", "0", *SHORT]
        rc, report, _ = run_bench(args, tmp_path)
        assert rc == 3 and report is None
        assert "refusing to report" in capsys.readouterr().err
        rc, report, _ = run_bench([*args, "--force"], tmp_path)
    assert rc == 0 and report is not None
    assert report["summary"]["client"]["ok"] is False
    assert report["summary"]["held_reason"] == "client fell behind"


def test_ramp_finds_the_capacity_of_a_single_render_thread(tmp_path: Path) -> None:
    # One shared render "thread" spending 45 ms per 200 ms chunk: 4 sessions fit
    # (180 ms of work per 200 ms), 5 do not (225 ms): queues grow and chunks go late.
    behaviour = AvatarBehaviour(shared_render_s=0.045)
    with fake_avatar_server(behaviour) as fake:
        args = ["avatar", "--url", fake.url, "--ramp", "--ramp-max", "6", "--ramp-refine", "1",
                "--duration", "1.6", "--chunk-samples", "3200"]  # fmt: skip
        rc, report, md = run_bench(args, tmp_path)
    assert rc == 0 and report is not None and md is not None
    assert_report_complete(report, "avatar_ramp")
    s = report["summary"]
    steps = {step["sessions"]: step for step in s["steps"]}
    assert steps[1]["held"] and steps[2]["held"]
    assert not steps[6]["held"]
    # timing on a shared 2-core box is noisy: the verdict must lie around the real limit
    assert 2 <= s["max_sessions_held"] <= 5
    assert s["max_sessions_held"] == max(n for n, step in steps.items() if step["held"])
    for run in report["runs"]:
        assert_avatar_run_consistent(run)
    assert "largest N that held real time" in md
    for name in ("latency_cdf.png", "latency_timeline.png", "ramp_p95.png"):
        assert_png(tmp_path / name)


def test_compare_alternates_targets_and_prints_ratios(tmp_path: Path) -> None:
    with (
        fake_avatar_server(AvatarBehaviour(render_s=0.01)) as fast,
        fake_avatar_server(AvatarBehaviour(render_s=0.05)) as slow,
    ):
        args = ["avatar", "--url", fast.url, "--compare", slow.url, "--rounds", "2", *SHORT]
        rc, report, md = run_bench(args, tmp_path)
    assert rc == 0 and report is not None and md is not None
    assert [(r["round"], r["summary"]["label"]) for r in report["runs"]] == [
        (1, "A"), (1, "B"), (2, "A"), (2, "B"),
    ]  # fmt: skip
    targets = report["summary"]["targets"]
    assert targets["A"]["chunks_answered"] == targets["B"]["chunks_answered"] == 10
    assert targets["A"]["sessions"] == 1 and targets["A"]["rounds"] == 2
    assert "pooled over 2 alternating rounds" in md
    ratio = report["summary"]["ratios_b_over_a"]["latency p50"]
    assert ratio["b_over_a"] > 1.5  # 50 ms of render vs 10 ms
    assert "B / A" in md
    assert_png(tmp_path / "latency_timeline.png")


def test_scenario_file_sets_options_and_command_line_wins(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text("[options]\nsessions = 2\nduration = 0.6\nchunk-samples = 3200\n")
    with fake_avatar_server() as fake:
        args = ["avatar", "--url", fake.url, "--scenario", str(scenario), "--sessions", "1"]
        rc, report, _ = run_bench(args, tmp_path / "out")
    assert rc == 0 and report is not None
    s = report["summary"]
    assert s["sessions"] == 1 and s["chunks_planned"] == 3 and s["chunk_ms"] == 200.0


def test_progress_line_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from omnistream.cli import main

    with fake_avatar_server() as fake:
        rc = main(["bench", "avatar", "--url", fake.url, *SHORT, "--out", str(tmp_path)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "[bench avatar flashtalk N=1 [A]]" in captured.err
    assert "answered 5" in captured.err
    assert "| target |" in captured.out  # the Markdown table goes to stdout


def test_audio_file_and_reference_image_are_sent(tmp_path: Path) -> None:
    import base64
    import wave

    import numpy as np

    from tests.test_bench_fakes import tiny_jpeg

    audio = tmp_path / "speech.wav"
    with wave.open(str(audio), "wb") as w:  # 0.5 s of 8 kHz tone, resampled to 16 kHz
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        tone = 0.2 * np.sin(2 * np.pi * 300 * np.arange(4000) / 8000)
        w.writeframes((tone * 32767).astype("<i2").tobytes())
    image = tmp_path / "face.jpg"
    image.write_bytes(tiny_jpeg(80, 120))
    with fake_avatar_server() as fake:
        args = ["avatar", "--url", fake.url, "--audio", str(audio), "--ref-image", str(image)]
        rc, report, _ = run_bench([*args, *SHORT], tmp_path / "out")
    assert rc == 0 and report is not None
    assert base64.b64decode(fake.inits[0]["ref_image"]) == image.read_bytes()
    assert report["settings"]["audio"] == str(audio)
    assert report["summary"]["chunks_answered"] == 5  # 0.5 s of audio looped over 1 s
