"""Runtime Profiles in OmniRT's format: validation, the manifest, and serving a composition.

Validation and the manifest run the CLI in-process (``omnistream.cli.main``); serving runs
the real ``omnistream serve --profile`` in a subprocess, so the profile's ``environment``
and its extra listeners are exercised exactly as an operator would start them.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from omnistream.cli import main
from tests.avatar_client import connect, flashtalk_init, recv_json
from tests.server import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MANIFEST_FIELDS = {
    "model", "task", "tier", "role", "maturity", "inputs", "optional_inputs", "outputs",
    "config", "default_config", "streaming", "resident", "service_adapter", "backends",
}


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# -- validate ---------------------------------------------------------------------------


def test_omnirt_example_validates_with_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(EXAMPLES / "omnirt-realtime-avatar-local.yaml")
    code, out, err = run_cli(capsys, "profile", "validate", path)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if ": warning: " in line]
    assert len(warnings) == 3 and "error" not in err
    indextts = next(w for w in warnings if "'indextts'" in w)
    assert indextts.startswith(f"{path}:15:9:") and "degrade_to 'cpu-stub'" in indextts
    assert any("'quicktalk'" in w and "degrade_to 'wav2lip'" in w for w in warnings)
    assert any("'soulx-flashtalk-14b'" in w and "no degrade_to" in w for w in warnings)

    code, _, err = run_cli(capsys, "profile", "validate", path, "--strict")
    assert code == 1 and err.count(": error: ") == 3

    code, out, _ = run_cli(capsys, "profile", "validate", path, "--json")
    report = json.loads(out)
    assert code == 0 and report["valid"] and report["name"] == "realtime-avatar-local"
    assert [m["state"] for m in report["models"]] == ["unavailable"] * 3
    assert {w["code"] for w in report["warnings"]} == {"model_unavailable"}


def test_project_example_validates_and_plans_its_fallback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_cli(
        capsys, "profile", "validate", str(EXAMPLES / "profile.yaml"), "--json"
    )
    report = json.loads(out)
    assert code == 0 and report["valid"] and not report["errors"], err
    plans = {m["id"]: m for m in report["models"]}
    assert plans["hibari"]["state"] == "serve" and plans["hibari"]["port"] == 9012
    assert plans["omni-avatar-lite"]["service"] == "realtime-avatar.ws.v1"
    wav2lip = plans["wav2lip-96"]
    assert wav2lip["state"] == "degraded" and wav2lip["served_by"] == "omni-avatar-lite"
    assert "would serve its routes instead" in wav2lip["reason"]


def test_unknown_fields_are_kept_as_warnings_and_bad_values_are_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(
        "name: lab\n"
        "owner: team-a\n"  # 2: unknown top-level field
        "models:\n"
        "  - id: omni-avatar-lite\n"
        "    task: audio2video\n"
        "    backend: ascend\n"  # 6: not here; degrade_to a backend that is
        "    degrade_to: cpu\n"
        "    gpu_pinning: [0]\n"  # 8: unknown model field
        "  - id: hibari\n"
        "    task: text2audio\n"
        "    backend: ascend\n"  # 11: not here, nothing to degrade to
        "    warmup: {text: hi, warp_speed: 9}\n"  # 12: unknown warmup step
    )
    code, _, err = run_cli(capsys, "profile", "validate", str(profile))
    assert code == 0, err
    lines = err.splitlines()
    assert any(f"{profile}:2:" in x and "unknown field 'owner'" in x for x in lines)
    assert any(f"{profile}:8:" in x and "'gpu_pinning'" in x for x in lines)
    assert any(f"{profile}:6:" in x and "runs it on cpu instead" in x for x in lines)
    assert any(f"{profile}:11:" in x and "ascend" in x and "not be served" in x for x in lines)
    assert any(f"{profile}:12:" in x and "warp_speed" in x for x in lines)
    # --strict: what this server cannot serve fails; unknown fields stay warnings
    code, _, err = run_cli(capsys, "profile", "validate", str(profile), "--strict")
    assert code == 1
    assert any(f"{profile}:2:" in x and ": warning: " in x for x in err.splitlines())
    assert any(f"{profile}:11:" in x and ": error: " in x for x in err.splitlines())

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: lab\nmodels:\n  - id: hibari\n    backend: tpu\n")
    code, _, err = run_cli(capsys, "profile", "validate", str(bad))
    assert code == 1 and f"{bad}:4:" in err and "backend" in err
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(
        "name: lab\nmodels:\n"
        "  - id: omni-avatar-lite\n    task: text2audio\n    degrade_to: omni-avatar-lite\n"
    )
    code, _, err = run_cli(capsys, "profile", "validate", str(wrong))
    lines = err.splitlines()
    assert code == 1
    assert any(f"{wrong}:4:" in x and "does not serve task 'text2audio'" in x for x in lines)
    assert any(f"{wrong}:5:" in x and "cannot degrade to itself" in x for x in lines)


def test_validation_sees_the_profiles_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "w2l.pth"
    weights.write_bytes(b"weights")
    body = "name: lab\nmodels:\n  - id: wav2lip-96\n    task: audio2video\n    backend: cpu\n"
    bare = tmp_path / "bare.yaml"
    bare.write_text(body)
    with_env = tmp_path / "env.yaml"
    with_env.write_text(body + f"environment:\n  OMNISTREAM_WAV2LIP_96_PATH: '{weights}'\n")
    code, out, _ = run_cli(capsys, "profile", "validate", str(bare), "--json")
    assert json.loads(out)["models"][0]["state"] == "unavailable"
    code, out, _ = run_cli(capsys, "profile", "validate", str(with_env), "--json", "--strict")
    report = json.loads(out)
    assert code == 0 and report["models"][0]["state"] == "serve", report
    assert "OMNISTREAM_WAV2LIP_96_PATH" not in os.environ  # validation exported nothing


# -- manifest ----------------------------------------------------------------------------


def test_manifest_uses_omnirt_field_names(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "models", "hibari", "--manifest")
    hibari = json.loads(out)
    assert code == 0 and MANIFEST_FIELDS <= set(hibari)
    assert hibari["model"] == "hibari" and hibari["task"] == "text2audio"
    assert hibari["service_adapter"] == "text2audio.service.v1"
    assert hibari["inputs"] == ["prompt"] and "voice" in hibari["optional_inputs"]
    assert hibari["default_config"]["sample_rate"] == 24000
    assert set(hibari["config"]) >= {"streaming_mode", "temperature", "speed"}
    assert hibari["backends"] == {
        "cuda": "unsupported", "ascend": "unsupported", "cpu-stub": "supported",
        "cpu": "supported",
    }
    assert hibari["streaming"] is True and hibari["resident"] is True
    assert hibari["summary"] and hibari["tasks"] == ["text2audio"]  # additions of ours

    code, out, _ = run_cli(capsys, "models", "omni-avatar-lite", "--manifest")
    avatar = json.loads(out)
    assert avatar["service_adapter"] == "realtime-avatar.ws.v1"
    assert avatar["default_config"]["chunk_samples"] == 17920

    code, out, _ = run_cli(capsys, "models", "--tier", "core", "--manifest")
    core = json.loads(out)["models"]
    assert code == 0 and core and all(m["tier"] == "core" for m in core)
    assert all(MANIFEST_FIELDS <= set(m) for m in core)
    assert {m["model"] for m in core} >= {"hibari", "omni-avatar-lite", "whisper-tiny.en"}
    assert {m["task"] for m in core} >= {"text2audio", "audio2video", "audio2text"}

    code, out, _ = run_cli(
        capsys, "models", "wav2lip-96", "--manifest", "--profile", str(EXAMPLES / "profile.yaml")
    )
    wav2lip = json.loads(out)
    assert wav2lip["profile"]["state"] == "degraded"
    assert wav2lip["profile"]["served_by"] == "omni-avatar-lite"


# -- serve --profile ------------------------------------------------------------------


@pytest.fixture(scope="module")
def composition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``omnistream serve --profile`` with an avatar port and a text2audio port."""
    main_port, tts_port, avatar_port, w2l_port = (free_port() for _ in range(4))
    folder = tmp_path_factory.mktemp("profile")
    broken = folder / "broken-wav2lip.pth"
    broken.write_bytes(b"not a checkpoint")  # passes the file check, fails to load
    path = folder / "composition.yaml"
    path.write_text(
        f"""\
name: test-composition
version: 1.0.0
defaults: {{max_concurrency: 4, preload: true}}
environment:
  OMNISTREAM_MAX_TEXT_CHARS: "60"
  OMNISTREAM_WAV2LIP_96_PATH: "{broken}"
models:
  - id: hibari
    task: text2audio
    backend: cpu
    service: text2audio.service.v1
    port: {tts_port}
    warmup: {{text: Warm up now., max_chunks: 1}}
    concurrency: 1
  - id: omni-avatar-lite
    task: audio2video
    service: realtime-avatar.ws.v1
    port: {avatar_port}
    warmup: {{preload_reference: true}}
    concurrency: 1
  - id: wav2lip-96
    task: audio2video
    backend: cpu
    service: realtime-avatar.ws.v1
    port: {w2l_port}
    degrade_to: omni-avatar-lite
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNISTREAM_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "omnistream.cli", "serve", "--port", str(main_port),
         "--profile", str(path), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    base = f"http://127.0.0.1:{main_port}"
    probes: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "profile never became ready"
            try:
                r = httpx.get(base + "/readyz", timeout=5)
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            probes.append({**r.json(), "http": r.status_code})
            if r.status_code == 200:
                break
            time.sleep(0.05)
        yield {
            "base": base,
            "tts": f"http://127.0.0.1:{tts_port}",
            "avatar": f"ws://127.0.0.1:{avatar_port}",
            "avatar_http": f"http://127.0.0.1:{avatar_port}",
            "main_ws": f"ws://127.0.0.1:{main_port}",
            "w2l": f"ws://127.0.0.1:{w2l_port}",
            "probes": probes,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_readyz_reports_ready_only_after_warmup(composition: dict[str, Any]) -> None:
    probes = composition["probes"]
    for probe in probes[:-1]:
        assert probe["http"] == 503 and probe["status"] == "warming"
        assert probe["profile"]["ready"] is False
    ready = probes[-1]
    assert ready["http"] == 200 and ready["status"] == "ready"
    assert ready["profile"]["ready"] is True
    models = {m["id"]: m for m in ready["profile"]["models"]}
    assert ready["profile"]["name"] == "test-composition"
    for model_id in ("hibari", "omni-avatar-lite"):
        assert models[model_id]["state"] == "ready"
        assert models[model_id]["warmup_ms"] is not None and models[model_id]["warmup_ms"] > 0
    assert models["hibari"]["warmup"]["chunks"] == 1
    assert models["omni-avatar-lite"]["warmup"]["preload_reference"]["face_detected"]
    # wav2lip-96 looked loadable (its checkpoint file exists) but failed to load
    degraded = models["wav2lip-96"]
    assert degraded["state"] == "degraded" and degraded["served_by"] == "omni-avatar-lite"
    assert "failed to load" in degraded["reason"]
    assert "degrade_to 'omni-avatar-lite'" in degraded["reason"]
    assert degraded["warmup_ms"] is not None
    assert "OMNISTREAM_MAX_TEXT_CHARS" in ready["profile"]["environment"]
    assert ready["models"]["wav2lip-96"]["degraded_to"] == "omni-avatar-lite"


def test_text2audio_port_serves_its_adapter_only(composition: dict[str, Any]) -> None:
    tts = composition["tts"]
    r = httpx.post(tts + "/v1/text2audio/stream", json={"text": "Hello there."}, timeout=30)
    assert r.status_code == 200 and r.headers["x-omnirt-adapter-schema"] == "text2audio.service.v1"
    assert len(r.content) > 4800
    assert httpx.get(tts + "/v1/text2audio/health").json()["status"] == "ok"
    # the profile's environment reached the settings: 60 characters at most
    r = httpx.post(tts + "/v1/text2audio/stream", json={"text": "word " * 20}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "input_too_long"
    r = httpx.post(tts + "/v1/generate", json={"task": "text2audio", "inputs": {"prompt": "x"}})
    assert r.status_code == 404 and "text2audio.service.v1" in r.json()["detail"]
    assert httpx.get(tts + "/readyz").status_code == 200


async def test_a_port_refuses_sockets_of_other_adapters(composition: dict[str, Any]) -> None:
    tts_ws = composition["tts"].replace("http://", "ws://")
    with pytest.raises(InvalidStatus) as refused:
        await connect(tts_ws + "/v1/avatar/realtime")
    assert refused.value.response.status_code == 404
    assert b"text2audio.service.v1" in refused.value.response.body


async def test_avatar_port_serves_flashtalk_with_concurrency_one(
    composition: dict[str, Any],
) -> None:
    avatar = composition["avatar"]
    async with await connect(avatar + "/") as first:
        ok = await flashtalk_init(first)
        assert ok["type"] == "init_ok" and ok["model"] == "omni-avatar-lite"
        async with await connect(avatar + "/v1/audio2video/flashtalk") as second:
            refused = await flashtalk_init(second)
            assert refused["type"] == "error" and refused["code"] == "capacity_exceeded"
            assert refused["message"].startswith("Init failed:")
    # the slot is free again once the first client leaves
    async with await connect(avatar + "/") as again:
        for _ in range(50):
            reply = await flashtalk_init(again)
            if reply["type"] == "init_ok":
                break
            await asyncio.sleep(0.05)
        assert reply["type"] == "init_ok"
    async with httpx.AsyncClient() as client:
        r = await client.get(composition["avatar_http"] + "/v1/text2audio/models")
    assert r.status_code == 404


async def test_a_model_that_cannot_load_is_served_by_its_fallback(
    composition: dict[str, Any],
) -> None:
    async def init_ok(url: str) -> dict[str, Any]:
        async with await connect(url) as ws:
            for _ in range(50):  # an earlier test's session may still be closing
                reply = await flashtalk_init(ws)
                if reply["type"] == "init_ok":
                    return reply
                await asyncio.sleep(0.05)
        return reply

    # named on the main port, and as the model of its own port (WS /)
    for url in (composition["main_ws"] + "/v1/audio2video/wav2lip-96", composition["w2l"] + "/"):
        reply = await init_ok(url)
        assert reply["type"] == "init_ok", reply
        assert reply["model"] == "omni-avatar-lite" and reply["degraded_from"] == "wav2lip-96"
    # a native session.create without a model gets the port's model too
    async with await connect(composition["w2l"] + "/v1/avatar/realtime") as ws:
        for _ in range(50):
            await ws.send(json.dumps({"type": "session.create"}))
            created = await recv_json(ws)
            if created["type"] == "session.created":
                break
            await asyncio.sleep(0.05)
        assert created["type"] == "session.created", created
        assert created["model"] == "omni-avatar-lite"
        assert created["degraded_from"] == "wav2lip-96"
        await ws.send(json.dumps({"type": "session.close"}))


def test_concurrency_bounds_streams_and_jobs_of_a_model(composition: dict[str, Any]) -> None:
    text = "Keep the voice busy for a while, then once more."  # under the 60 allowed
    with httpx.Client(base_url=composition["tts"], timeout=60) as client:
        for _ in range(100):  # an earlier test's stream may still be releasing its slot
            if client.get("/v1/text2audio/metrics").json()["models"]["hibari"][
                "live_streams"
            ] == 0:
                break
            time.sleep(0.02)
        with client.stream("POST", "/v1/text2audio/stream", json={"text": text}) as first:
            assert first.status_code == 200
            second = client.post("/v1/text2audio/stream", json={"text": "Hi."})
            assert second.status_code == 429
            assert second.json()["error"]["code"] == "capacity_exceeded"
            assert "Retry-After" in second.headers
            first.read()
    with httpx.Client(base_url=composition["base"], timeout=60) as client:
        ids = [
            client.post(
                "/v1/generate",
                json={"task": "text2audio", "model": "hibari", "inputs": {"prompt": text},
                      "async_run": True},
            ).json()["id"]
            for _ in range(2)
        ]
        records = []
        for job_id in ids:
            for _ in range(600):
                record = client.get(f"/v1/jobs/{job_id}").json()
                if record["state"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.05)
            assert record["state"] == "succeeded", record
            records.append(record)
    first_job, second_job = sorted(records, key=lambda r: r["started_at_ms"])
    assert second_job["started_at_ms"] >= first_job["finished_at_ms"]  # one at a time
