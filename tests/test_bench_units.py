"""The harness's building blocks: input audio, images, ramps, statistics."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omnistream.bench.audio import ChunkSource, load_audio, synth_speech
from omnistream.bench.avatar import ramp_sequence
from omnistream.bench.images import default_ref_image, jpeg_size, synth_face_png
from omnistream.bench.stats import describe
from omnistream.codecs.pcm import s16le_to_float32


def test_synth_speech_has_syllables_and_pauses() -> None:
    rate = 16000
    audio = synth_speech(10.0, rate)
    assert audio.dtype == np.float32 and audio.size == 10 * rate
    assert 0.3 < float(np.max(np.abs(audio))) <= 0.5
    # loudness per 20 ms frame: speech alternates loud syllables and near-silent gaps
    frames = audio[: audio.size // 320 * 320].reshape(-1, 320)
    rms = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))
    loud = rms > 0.1 * rms.max()
    assert 0.4 < loud.mean() < 0.9
    # pauses: at least a few runs of ≥ 200 ms silence in 10 s
    silent_runs, run = 0, 0
    for is_loud in loud:
        run = 0 if is_loud else run + 1
        silent_runs += run == 10
    assert silent_runs >= 3
    # syllable rate: above the phrase rate (< 1 Hz), the loudness envelope's spectrum
    # peaks at 2-8 Hz, the rate of syllables in speech
    env = rms - rms.mean()
    spectrum = np.abs(np.fft.rfft(env))
    freqs = np.fft.rfftfreq(env.size, d=0.02)
    above = freqs > 1.0
    assert 2 < freqs[above][np.argmax(spectrum[above])] < 8
    # a voice: most energy below 4 kHz, pitch around 100-150 Hz
    power = np.abs(np.fft.rfft(audio)) ** 2
    f = np.fft.rfftfreq(audio.size, 1 / rate)
    assert power[f < 4000].sum() / power.sum() > 0.95
    # deterministic
    assert np.array_equal(audio, synth_speech(10.0, rate))


def test_load_audio_decodes_and_resamples_any_container(tmp_path: Path) -> None:
    rate = 44100
    t = np.arange(rate) / rate  # 1 s
    tone = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    stereo = np.stack([tone, tone], axis=1)
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(stereo.tobytes())
    audio = load_audio(path, 16000)
    assert abs(audio.size - 16000) <= 32
    assert float(np.max(np.abs(audio))) == pytest.approx(0.3, abs=0.03)
    with pytest.raises(Exception):  # noqa: B017 - any decoder error is fine, not a hang
        load_audio(tmp_path / "missing.wav")


def test_chunk_source_loops_with_exact_sizes() -> None:
    audio = np.linspace(-0.5, 0.5, 1000, dtype=np.float32)
    source = ChunkSource(audio, 300, offset=900)
    chunks = [source.chunk(k) for k in range(5)]
    assert all(len(c) == 600 for c in chunks)
    first = s16le_to_float32(chunks[0])
    assert first[0] == pytest.approx(audio[900], abs=1e-4)
    assert first[100] == pytest.approx(audio[0], abs=1e-4)  # wrapped around
    with pytest.raises(ValueError):
        ChunkSource(audio, 0)


def test_images() -> None:
    png = synth_face_png(200, 300)
    with Image.open(io.BytesIO(png)) as img:
        assert img.size == (200, 300)
    ref = default_ref_image()
    with Image.open(io.BytesIO(ref)) as img:
        img.load()
    out = io.BytesIO()
    Image.new("RGB", (416, 704)).save(out, "JPEG")
    assert jpeg_size(out.getvalue()) == (416, 704)
    out = io.BytesIO()
    Image.new("RGB", (64, 48)).save(out, "JPEG", progressive=True)
    assert jpeg_size(out.getvalue()) == (64, 48)
    assert jpeg_size(png) is None
    assert jpeg_size(b"\xff\xd8\xff") is None


def test_ramp_sequence() -> None:
    assert ramp_sequence(1, 64, 2.0, 0) == [1, 2, 4, 8, 16, 32, 64]
    assert ramp_sequence(1, 50, 2.0, 0) == [1, 2, 4, 8, 16, 32, 50]
    assert ramp_sequence(2, 10, 2.0, 3) == [2, 5, 8, 10]
    assert ramp_sequence(1, 5, 1.2, 0) == [1, 2, 3, 4, 5]


def test_describe_orders_and_handles_empty() -> None:
    stats = describe([5.0, 1.0, 3.0, 100.0])
    assert stats["min"] <= stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"] == 100
    empty = describe([])
    assert empty["count"] == 0 and empty["p95"] is None


def test_project_scenarios_use_known_options() -> None:
    import argparse

    from omnistream.bench.cli import AVATAR_DEFAULTS, TTS_DEFAULTS, resolve_options

    files = sorted((Path(__file__).parent.parent / "bench" / "scenarios").glob("*.toml"))
    assert files
    for path in files:
        defaults = TTS_DEFAULTS if path.name.startswith("tts") else AVATAR_DEFAULTS
        opts = resolve_options(argparse.Namespace(scenario=str(path)), defaults)
        assert set(opts) == set(defaults), path.name


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from omnistream.cli import main

    assert main(["bench", "avatar", "--quiet"]) == 2
    assert "--url is required" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[options]\nsesions = 3\n")
    assert main(["bench", "tts", "--url", "http://x", "--scenario", str(bad)]) == 2
    assert "unknown option(s) ['sesions']" in capsys.readouterr().err
    assert main(["bench", "avatar", "--url", "ws://x/", "--audio", str(tmp_path / "no.wav")]) == 2
