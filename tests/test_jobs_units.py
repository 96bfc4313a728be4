"""Pieces of offline generation that need no server: VAD cutting, MP4 muxing, retention,
and the STT model's availability report when its packages are missing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from omnistream.codecs.mp4 import Mp4Writer, frames_for_samples, probe
from omnistream.jobs.artifacts import ArtifactStore
from omnistream.jobs.schemas import GenerateRequest
from omnistream.jobs.store import JobStore
from omnistream.models.stt.whisper import speech_regions


def test_speech_regions_merge_pad_and_pack() -> None:
    window = 512
    probs = [0.0] * 10 + [0.9] * 20 + [0.0] * 3 + [0.9] * 10 + [0.0] * 200 + [0.9] * 5
    total = len(probs) * window
    pieces = speech_regions(
        probs, total, threshold=0.5, min_silence_s=0.2, pad_s=0.1, max_piece_s=2.0
    )
    # The short pause merges; the long silence splits; pieces never exceed the limit.
    assert len(pieces) == 2
    assert all(0 < e - s <= 2 * 16000 for s, e in pieces)
    assert pieces[0][0] == 10 * window - 1600 and pieces[1][1] == total
    long = speech_regions(
        [1.0] * 200, 200 * window, threshold=0.5, min_silence_s=0.2, pad_s=0.0, max_piece_s=1.0
    )
    assert [e - s for s, e in long][:-1] == [16000] * (len(long) - 1)
    assert (
        speech_regions(
            [0.1] * 50, 50 * window, threshold=0.5, min_silence_s=0.2, pad_s=0.1, max_piece_s=1.0
        )
        == []
    )


@pytest.mark.parametrize(
    ("seconds", "fps", "rate"), [(1.3, 25, 16000), (2.0, 30, 16000), (0.5, 25, 48000)]
)
def test_mp4_streams_end_together(tmp_path: Path, seconds: float, fps: int, rate: int) -> None:
    samples = int(seconds * rate)
    frames = frames_for_samples(samples, rate, fps)
    writer = Mp4Writer(tmp_path / "a.mp4", width=64, height=48, fps=fps, sample_rate=rate)
    audio = (0.2 * np.sin(np.arange(samples) / 7)).astype(np.float32)
    writer.write_audio(audio[: round(frames * rate / fps)])
    writer.write_frames(np.full((48, 64, 3), i % 255, np.uint8) for i in range(frames))
    writer.close()
    streams = {s.kind: s for s in probe(tmp_path / "a.mp4")}
    assert streams["video"].frames == frames
    assert abs(streams["video"].duration_s - frames / fps) < 1e-6
    assert abs(streams["audio"].duration_s - streams["video"].duration_s) <= 0.5 / fps


def test_mp4_refuses_odd_sizes_and_wrong_frames(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        Mp4Writer(tmp_path / "b.mp4", width=63, height=48, fps=25)
    writer = Mp4Writer(tmp_path / "b.mp4", width=64, height=48, fps=25)
    with pytest.raises(ValueError, match="expected 64x48"):
        writer.write_frames([np.zeros((10, 10, 3), np.uint8)])
    writer.abort()


def test_artifact_retention_by_count_and_age(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, max_files=3, ttl_s=3600)
    ids = []
    for index in range(5):
        reservation = store.reserve(".txt")
        reservation.part_path.write_text(str(index))
        os.utime(reservation.part_path, (time.time() + index, time.time() + index))
        store.commit(reservation)
        ids.append(reservation.id)
    assert [store.find(i) is not None for i in ids] == [False, False, True, True, True]
    old = tmp_path / ids[-1]
    path = store.find(ids[-1])
    assert path is not None and old.name in path.name
    os.utime(path, (time.time() - 7200, time.time() - 7200))
    assert store.find(ids[-1]) is None
    store.sweep()
    assert not path.exists()
    assert store.find("../../etc/passwd") is None


async def test_job_store_keeps_active_jobs_and_bounds_finished_ones() -> None:
    store = JobStore(max_jobs=2, ttl_s=3600, max_running=1, max_queued=3)
    request = GenerateRequest(task="audio2text")
    jobs = [store.add(request, "m", mode="async") for _ in range(3)]
    with pytest.raises(Exception, match="already waiting"):
        store.add(request, "m", mode="async")
    for job in jobs:
        job.finish("succeeded")
        job.emit("job_finished")
    store.add(request, "m", mode="async")
    kept = store.all()
    assert len(kept) == 3 and jobs[0] not in kept  # 2 finished + 1 active
    events = [e.event async for e in jobs[2].follow()]
    assert events == ["job_enqueued", "job_finished"]
    await asyncio.sleep(0)


def test_stt_reported_unavailable_without_its_packages() -> None:
    code = (
        "import sys; sys.modules['faster_whisper'] = None\n"
        "from omnistream.models.catalog import build_registry\n"
        "from omnistream.settings import Settings\n"
        "spec = build_registry(Settings()).get('whisper-tiny.en')\n"
        "print(spec.unavailable_reason())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "faster_whisper" in out.stdout and "pip install faster-whisper" in out.stdout
