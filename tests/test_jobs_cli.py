"""The CLI on each task, request validation, the model manifest and Runtime Profiles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from omnistream.codecs.mp4 import probe
from tests.jobs_helpers import tone
from tests.server import run_server


def omni(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omnistream.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
    )


def test_generate_each_task_in_process(tmp_path: Path) -> None:
    out = tmp_path / "out"
    speech = omni(
        "generate", "--task", "text2audio", "--prompt", "Seven green apples.", "-o", str(out),
        "--json",
    )
    assert speech.returncode == 0, speech.stderr
    result = json.loads(speech.stdout)
    wav = out / "text2audio-0.wav"
    assert wav.is_file() and wav.read_bytes()[:4] == b"RIFF"
    assert result["metadata"]["execution_mode"] == "cli" and result["metadata"]["model"] == "hibari"
    assert "synthesize" in speech.stderr and "job_finished" in speech.stderr  # the progress

    heard = omni(
        "generate",
        "--task",
        "audio2text",
        "--audio",
        str(wav),
        "-o",
        str(out),
        "--quiet",
        "--json",
        "--report",
        str(tmp_path / "report.json"),
    )
    assert heard.returncode == 0, heard.stderr
    text = json.loads(heard.stdout)["outputs"][0]["text"].lower()
    assert "apples" in text and "green" in text
    assert json.loads((tmp_path / "report.json").read_text())["task"] == "audio2text"

    (tmp_path / "clip.wav").write_bytes(tone(1.0))
    request = tmp_path / "video.yaml"
    request.write_text(
        "task: audio2video\ninputs:\n  audio: {path: clip.wav}\n"
        "config: {width: 96, height: 128, fps: 25}\n"
    )
    video = omni("generate", str(request), "-o", str(out), "--quiet")
    assert video.returncode == 0, video.stderr
    streams = {s.kind: s for s in probe(out / "audio2video-0.mp4")}
    assert set(streams) == {"video", "audio"}
    assert abs(streams["video"].duration_s - streams["audio"].duration_s) <= 0.04


def test_generate_against_a_server(tmp_path: Path) -> None:
    (tmp_path / "clip.wav").write_bytes(tone(0.6))
    with run_server(artifacts_dir=str(tmp_path / "artifacts")) as srv:
        done = omni(
            "generate",
            "--server",
            srv.http,
            "--task",
            "audio2video",
            "--audio",
            "clip.wav",
            "--config",
            "width=96",
            "--config",
            "height=128",
            "-o",
            "out",
            "--json",
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "out" / "audio2video-0.mp4").stat().st_size > 1000
        assert json.loads(done.stdout)["metadata"]["execution_mode"] == "async"
        bad = omni(
            "generate",
            "--server",
            srv.http,
            "--task",
            "audio2text",
            "--input",
            "audio=abc",
            cwd=tmp_path,
        )
        assert bad.returncode == 2 and "invalid_" in bad.stderr


def test_validate_reports_the_line(tmp_path: Path) -> None:
    (tmp_path / "clip.wav").write_bytes(tone(0.3))
    good = tmp_path / "good.yaml"
    good.write_text("task: audio2text\ninputs:\n  audio: {path: clip.wav}\n")
    ok = omni("validate", str(good))
    assert ok.returncode == 0 and "ok" in ok.stdout and "whisper-tiny.en" in ok.stdout
    typo = tmp_path / "typo.yaml"
    typo.write_text("task: audio2text\nbackend: tpu\ninputs: {}\n")
    r = omni("validate", str(typo))
    assert r.returncode == 1 and f"{typo}:2:" in r.stderr and "backend" in r.stderr
    missing = tmp_path / "missing.json"
    missing.write_text('{\n  "task": "audio2video",\n  "inputs": {\n    "prompt": "x"\n  }\n}\n')
    r = omni("validate", str(missing))
    assert r.returncode == 1 and f"{missing}:3:" in r.stderr and "audio" in r.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: audio2text\ninputs: [\n")
    r = omni("validate", str(broken))
    assert r.returncode == 1 and "YAML syntax error" in r.stderr


def test_models_and_manifest() -> None:
    listing = omni("models", "--tier", "core")
    assert listing.returncode == 0
    assert "whisper-tiny.en" in listing.stdout and "espeak-ng" not in listing.stdout
    manifest = json.loads(omni("models", "omni-avatar-lite", "--manifest").stdout)
    for key in ("model", "task", "inputs", "outputs", "streaming", "resident",
                "service_adapter", "backends"):
        assert key in manifest
    assert manifest["model"] == "omni-avatar-lite" and manifest["task"] == "audio2video"
    assert "audio" in manifest["inputs"]
    everything = json.loads(omni("models", "--manifest").stdout)["models"]
    assert {m["model"] for m in everything} >= {"whisper-tiny.en", "omni-avatar-lite", "hibari"}
    assert omni("models", "nope").returncode == 1
    assert omni("models", "espeak-ng", "--tier", "core").returncode == 1


PROFILE = """\
name: edge-box
version: 1.0.0
defaults: {max_concurrency: 8, preload: true}
models:
  - id: omni-avatar-lite
    task: audio2video
    backend: cpu
    service: realtime-avatar.ws.v1
    port: 8765
    concurrency: 2
  - id: whisper-tiny.en
    task: audio2text
    service: batch-generate.v1
"""


def test_profile_validate_is_line_precise(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(PROFILE)
    r = omni("profile", "validate", str(good))
    assert r.returncode == 0, r.stderr
    schema = tmp_path / "schema.yaml"
    schema.write_text(
        PROFILE.replace("concurrency: 2", "concurrency: 0").replace("port: 8765", "port: 70000")
    )
    r = omni("profile", "validate", str(schema))
    assert r.returncode == 1
    assert f"{schema}:10:" in r.stderr and "concurrency" in r.stderr
    assert f"{schema}:9:" in r.stderr and "port" in r.stderr
    refs = tmp_path / "refs.yaml"
    refs.write_text(
        PROFILE.replace("id: whisper-tiny.en", "id: whisper-huge").replace(
            "service: batch-generate.v1", "service: batch-generate.v1\n    port: 8765"
        )
    )
    r = omni("profile", "validate", str(refs))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 2, r.stderr
    assert any(f"{refs}:11:" in line and "warning" in line and "whisper-huge" in line
               for line in lines)
    assert any(f"{refs}:14:" in line and "error" in line and "8765" in line for line in lines)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nmodels:\n  - id: a\n   backend: cpu\n")
    r = omni("profile", "validate", str(broken))
    assert r.returncode == 1 and f"{broken}:4:" in r.stderr and "YAML syntax error" in r.stderr
