"""``omnistream bench`` against omnistream itself on an ephemeral port.

Short runs with a small geometry (200 ms chunks, 128×128): the point is that a real
server's replies give complete, self-consistent reports, not how fast it is (that is
``bench/``'s business).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import RunningServer, run_server
from tests.test_bench_fakes import (
    assert_avatar_run_consistent,
    assert_png,
    assert_report_complete,
    run_bench,
)
from tests.test_bench_tts import assert_tts_consistent

SMALL = ["--duration", "1.0", "--chunk-samples", "3200", "--width", "128", "--height", "128"]
# The server runs in this process (a thread) and shares the GIL with the client: loading a
# model stalls the client's event loop. The client's own timing is not under test here
# (test_bench_avatar covers the refusal), so its bounds are relaxed.
RELAXED_AVATAR = ["--max-pacing-error-ms", "10000"]
RELAXED_TTS = ["--max-loop-lag-ms", "10000"]


@pytest.fixture(scope="module")
def omni() -> Iterator[RunningServer]:
    with run_server() as srv:
        yield srv


@pytest.mark.parametrize("protocol", ["flashtalk", "native"])
def test_short_avatar_run_against_omnistream(
    omni: RunningServer, tmp_path: Path, protocol: str
) -> None:
    args = ["avatar", "--url", omni.ws + "/", "--protocol", protocol, "--sessions", "2", *SMALL,
            *RELAXED_AVATAR]  # fmt: skip
    rc, report, md = run_bench(args, tmp_path)
    assert rc == 0 and report is not None and md is not None
    assert_report_complete(report, "avatar")
    run = report["runs"][0]
    assert_avatar_run_consistent(run)
    s = report["summary"]
    assert s["errors"]["total"] == 0, s["errors"]
    assert s["chunks_answered"] == s["chunks_planned"] == 10
    # 3200 samples at 25 fps: five 128×128 frames per chunk, every one delivered
    assert s["frames_received"] == s["frames_expected"] == 50
    assert s["frames_per_chunk"]["min"] == 5
    assert all(sess["closed_cleanly"] for sess in run["sessions"])
    if protocol == "native":
        assert all(c["server"] is not None for c in run["sessions"][0]["series"])
    assert_png(tmp_path / "latency_cdf.png")
    assert_png(tmp_path / "latency_timeline.png")


@pytest.mark.parametrize("endpoint", ["text2audio", "speech"])
def test_short_tts_run_against_omnistream(
    omni: RunningServer, tmp_path: Path, endpoint: str
) -> None:
    args = ["tts", "--url", omni.http, "--endpoint", endpoint, "--streams", "2",
            "--requests", "1", "--text", "Hello there. This is a short benchmark.",
            *RELAXED_TTS]  # fmt: skip
    rc, report, md = run_bench(args, tmp_path)
    assert rc == 0 and report is not None and md is not None
    assert_report_complete(report, "tts")
    assert_tts_consistent(report)
    s = report["summary"]
    assert s["errors"]["total"] == 0, s["errors"]
    assert s["requests_ok"] == 2
    assert s["audio_s"] > 1.0  # two sentences of speech each
    if endpoint == "speech":
        assert s["sample_rates"] == [24000]
    assert_png(tmp_path / "ttfa_cdf.png")
