"""What a Runtime Profile's preload and warmup buy: time to ready vs the first request.

Starts ``omnistream serve`` twice per round as its own process: once plain, once with
``--profile examples/profile.yaml`` (its model ports moved to free ports). For each it
records when ``/healthz`` and ``/readyz`` first answer 200, then the first client's cost:
time to the first audio byte of a text2audio stream, and time from a FlashTalk ``init``
to ``init_ok`` (a new reference image is prepared then, unless warmup did it). With the
profile, both first requests are timed on the profile's extra listeners.

    python bench/profile_startup.py --rounds 2

Writes ``bench/results/profile_startup.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from omnistream_server import free_port

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "examples" / "profile.yaml"
RESULTS = ROOT / "bench" / "results" / "profile_startup.json"
TEXT = "Hello there, this is the first request."


def _wait(url: str, deadline: float, proc: subprocess.Popen[bytes]) -> float:
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic()
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} never answered 200")
        time.sleep(0.02)


def _first_audio_ms(base: str) -> float:
    started = time.monotonic()
    with httpx.stream("POST", base + "/v1/text2audio/stream", json={"text": TEXT},
                      timeout=120) as r:
        r.raise_for_status()
        for chunk in r.iter_bytes():
            if chunk:
                return (time.monotonic() - started) * 1000.0
    raise RuntimeError("no audio")


async def _init_ms(ws_url: str) -> float:
    from omnistream.sessions.avatar import default_avatar_bytes

    image = base64.b64encode(default_avatar_bytes()).decode()
    async with websockets.connect(ws_url, max_size=None) as ws:
        started = time.monotonic()
        await ws.send(json.dumps({"type": "init", "ref_image": image}))
        reply = json.loads(await ws.recv())
        assert reply["type"] == "init_ok", reply
        return (time.monotonic() - started) * 1000.0


def run_once(with_profile: bool) -> dict[str, Any]:
    port, tts_port, avatar_port = free_port(), free_port(), free_port()
    args = [sys.executable, "-m", "omnistream.cli", "serve", "--port", str(port)]
    tmp = None
    if with_profile:
        text = PROFILE.read_text().replace("port: 9012", f"port: {tts_port}")
        text = text.replace("port: 8765", f"port: {avatar_port}")
        tmp = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
        tmp.write(text)
        tmp.close()
        args += ["--profile", tmp.name]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNISTREAM_")}
    env["OMNISTREAM_LOG_LEVEL"] = "warning"
    started = time.monotonic()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = started + 180
        healthy = _wait(base + "/healthz", deadline, proc)
        ready = _wait(base + "/readyz", deadline, proc)
        tts_base = f"http://127.0.0.1:{tts_port}" if with_profile else base
        avatar_ws = f"ws://127.0.0.1:{avatar_port}/" if with_profile else f"ws://127.0.0.1:{port}/"
        first_audio = _first_audio_ms(tts_base)
        init = asyncio.run(_init_ms(avatar_ws))
        report = httpx.get(base + "/readyz").json().get("profile")
        return {
            "profile": with_profile,
            "healthz_s": round(healthy - started, 3),
            "readyz_s": round(ready - started, 3),
            "first_audio_ms": round(first_audio, 1),
            "first_init_ms": round(init, 1),
            "models": {
                m["id"]: {"state": m["state"], "load_ms": m["load_ms"], "warmup_ms": m["warmup_ms"]}
                for m in (report or {}).get("models", [])
            },
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if tmp is not None:
            os.unlink(tmp.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runs = []
    for _ in range(args.rounds):
        for with_profile in (False, True):
            run = run_once(with_profile)
            runs.append(run)
            print(json.dumps(run), flush=True)

    def median(key: str, flag: bool) -> float:
        return statistics.median(r[key] for r in runs if r["profile"] == flag)

    summary = {
        key: {"plain": median(key, False), "profile": median(key, True)}
        for key in ("healthz_s", "readyz_s", "first_audio_ms", "first_init_ms")
    }
    out = {
        "command": f"python bench/profile_startup.py --rounds {args.rounds}",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "note": "shared machine: compare the two columns of one run, not absolute times",
        "summary_median": summary,
        "runs": runs,
    }
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
