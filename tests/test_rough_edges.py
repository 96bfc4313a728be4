"""Rough edges a new user hit (issue 11 §6), each tried the way that user tried it."""

from __future__ import annotations

import io
import json
import shutil
import socket
import struct
import subprocess
import sys
import wave
from pathlib import Path

import httpx
import pytest

from omnistream.cli import main
from tests.server import RunningServer, run_server

REPO = Path(__file__).resolve().parent.parent


def omni(
    *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omnistream.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


# -- the command line ----------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``omnistream ARGS`` in this process, for what argparse settles before anything runs."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_serve_refuses_a_port_that_is_not_one(
    capsys: pytest.CaptureFixture[str], port: str
) -> None:
    code, _, err = run_cli(capsys, "serve", f"--port={port}")
    assert code == 2
    assert "--port" in err and "Traceback" not in err


def test_serve_reports_a_busy_port_before_loading_anything() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = omni("serve", "--port", str(port), timeout=60)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "--port" in result.stderr and "Traceback" not in result.stderr


def test_help_is_for_users(capsys: pytest.CaptureFixture[str]) -> None:
    code, top, _ = run_cli(capsys, "--help")
    assert code == 0
    assert "streaming media engine" in top
    assert "SUBCOMMAND_MODULES" not in top and "register(subparsers)" not in top
    _, generate, _ = run_cli(capsys, "generate", "--help")
    # Tasks that need models this install lacks are marked as such, not offered bare.
    assert "run on the embedded models" in " ".join(generate.split())
    assert "only where image or video models are installed" in " ".join(generate.split())


def test_generate_against_an_unreachable_server_says_so_in_one_line(tmp_path: Path) -> None:
    result = omni(
        "generate", "--server", "http://127.0.0.1:1", "--task", "text2audio", "--prompt", "Hi.",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "http://127.0.0.1:1" in lines[0]
    assert "server_unreachable" in lines[0]


def test_generate_prints_a_short_summary(server: RunningServer, tmp_path: Path) -> None:
    result = omni(
        "generate", "--server", server.http, "--task", "text2audio", "--prompt",
        "Short and sweet.", "--quiet", "-o", "out", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) <= 4, result.stdout
    assert "text2audio on hibari" in lines[0]
    assert str(Path("out") / "text2audio-0.wav") in result.stdout
    assert (tmp_path / "out" / "text2audio-0.wav").is_file()


def test_outputs_are_ignored_by_git() -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "outputs/text2audio-0.wav"], cwd=REPO, check=False
    )
    assert ignored.returncode == 0


# -- the HTTP surface ------------------------------------------------------------------------


def test_non_streamed_wav_has_real_sizes_and_streamed_keeps_the_marker(
    server: RunningServer,
) -> None:
    body = {"model": "tts-1", "input": "A short sentence.", "voice": "alloy"}
    with httpx.Client(base_url=server.http, timeout=60) as client:
        whole = client.post("/v1/audio/speech", json={**body, "response_format": "wav"})
        streamed = client.post(
            "/v1/audio/speech", json={**body, "response_format": "wav", "stream": True}
        )
    assert whole.status_code == 200 and streamed.status_code == 200
    with wave.open(io.BytesIO(whole.content)) as wav:
        seconds = wav.getnframes() / wav.getframerate()
        assert wav.getframerate() == 24000
    assert seconds == pytest.approx((len(whole.content) - 44) / 2 / 24000)
    assert 0.3 < seconds < 10
    assert struct.unpack("<I", streamed.content[40:44])[0] == 0xFFFFFFFF


def test_unknown_task_names_the_tasks_that_run_here(server: RunningServer) -> None:
    reply = httpx.post(server.http + "/v1/generate", json={"task": "nope"}, timeout=30)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "invalid_request"
    assert "Value error" not in error["message"]
    assert "'nope'" in error["message"] and "text2audio" in error["message"]
    assert "text2image" not in error["message"]  # not runnable here: not offered
    backend = httpx.post(
        server.http + "/v1/generate",
        json={"task": "text2audio", "backend": "tpu", "inputs": {"prompt": "Hi."}},
        timeout=30,
    ).json()["error"]["message"]
    assert "Value error" not in backend and "'tpu'" in backend


def test_over_long_text_is_400_input_too_long_everywhere(server: RunningServer) -> None:
    text = "x" * (server.settings.max_text_chars + 1)
    with httpx.Client(base_url=server.http, timeout=30) as client:
        replies = [
            client.post("/v1/generate", json={"task": "text2audio", "inputs": {"prompt": text}}),
            client.post("/v1/audio/speech", json={"model": "tts-1", "input": text}),
            client.post("/v1/text2audio/stream", json={"text": text}),
        ]
    assert [r.status_code for r in replies] == [400, 400, 400]
    assert {r.json()["error"]["code"] for r in replies} == {"input_too_long"}


def test_transcript_segment_ids_count_up_without_gaps(server: RunningServer) -> None:
    prompt = "The weather was cold and grey all week. Then apples and pears came from the market."
    with httpx.Client(base_url=server.http, timeout=120) as client:
        speech = client.post(
            "/v1/generate", json={"task": "text2audio", "inputs": {"prompt": prompt}}
        )
        assert speech.status_code == 200, speech.text
        file_id = speech.json()["outputs"][0]["id"]
        heard = client.post(
            "/v1/generate", json={"task": "audio2text", "inputs": {"audio": {"file_id": file_id}}}
        )
        assert heard.status_code == 200, heard.text
        transcript = client.get(heard.json()["outputs"][0]["url"]).json()
    ids = [segment["id"] for segment in transcript["segments"]]
    assert len(ids) >= 2
    assert ids == list(range(len(ids)))


def test_voice_aliases_let_existing_clients_name_their_voice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    request = {"text": "Hello.", "voice": "local-default", "sample_rate": 16000}
    monkeypatch.setenv("OMNISTREAM_VOICE_ALIASES", json.dumps({"local-default": "heart"}))
    with run_server() as aliased:
        refused = httpx.post(
            aliased.http + "/v1/text2audio/stream",
            json={**request, "voice": "remote-default"},  # no alias: still refused
            timeout=60,
        )
        spoken = httpx.post(aliased.http + "/v1/text2audio/stream", json=request, timeout=60)
        speech = httpx.post(
            aliased.http + "/v1/audio/speech",
            json={"input": "Hi.", "voice": "LOCAL-DEFAULT", "response_format": "pcm"},
            timeout=60,
        )
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_voice"
    assert spoken.status_code == 200 and len(spoken.content) > 1000
    assert spoken.headers["x-omnistream-voice"] == "heart"
    assert speech.status_code == 200 and speech.headers["x-omnistream-voice"] == "heart"


def test_voice_alias_flag_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "serve", "--voice-alias", "no-equals-sign")
    assert code == 2 and "NAME=VOICE" in err
