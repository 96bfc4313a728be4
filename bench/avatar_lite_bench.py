"""Old renderer against new, in one run: render and encode cost per frame, sessions held.

    python bench/avatar_lite_bench.py [--skip-ramp] [--rounds 5]

1. **direct** (this process, one thread, rounds interleaved old/new so a busy shared
   machine hurts both alike): render 28-frame chunks of synthesised speech at 416×704
   with ``omni-avatar-lite-v1`` (the old renderer) and ``omni-avatar-lite`` (the new),
   and encode each frame the way the server does: old = the whole frame with simplejpeg;
   new = the changed band only, spliced into the reference's cached rows. CPU time per
   frame (``thread_time``), medians over rounds; the new renderer's frames are also
   encoded whole, to split the gain between rendering and encoding.
2. **ramp**: ``omnistream serve`` twice, old (``OMNISTREAM_AVATAR_MODEL=
   omni-avatar-lite-v1``, ``OMNISTREAM_JPEG_SPLICE=false``) then new (defaults), each
   measured with ``omnistream bench avatar --scenario
   bench/scenarios/avatar-flashtalk-ramp.toml --p95-bound-ms 300``; reports land in
   ``bench/results/avatar-lite-v2/ramp-{old,new}/``.

Writes ``bench/results/avatar_lite_v2.json`` (with the load average seen before and
after each part: the machine may be shared).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from avatar_strip import speech
from omnistream_server import omnistream_server

from omnistream.codecs.image import decode_image
from omnistream.codecs.jpeg import encode_jpeg
from omnistream.codecs.jpeg_splice import SpliceCache
from omnistream.models import avatar_lite, avatar_lite_v1
from omnistream.models.avatar_base import ChunkRequest, PrepareRequest
from omnistream.sessions.avatar import default_avatar_bytes

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"
W, H, FPS, CHUNK_FRAMES, QUALITY = 416, 704, 25, 28, 80
SCENARIO = "bench/scenarios/avatar-flashtalk-ramp.toml"


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def direct(rounds: int) -> dict[str, Any]:
    data = default_avatar_bytes()
    image = decode_image(data, 10**8, 10**8)
    digest = hashlib.sha256(data).hexdigest()
    audio = speech(CHUNK_FRAMES * 4 / FPS)
    models: dict[str, Any] = {
        "old": avatar_lite_v1.AvatarLite(),
        "new": avatar_lite.AvatarLite(),
    }
    prepared = {k: m.prepare(PrepareRequest(image, W, H, digest)) for k, m in models.items()}
    splices = SpliceCache()
    figures: dict[str, list[float]] = {
        k: [] for k in ("old_render", "old_encode", "new_render", "new_encode", "new_encode_whole")
    }
    sizes: dict[str, list[int]] = {"old": [], "new": []}
    for _ in range(rounds):
        for name in ("old", "new"):
            model, avatar = models[name], prepared[name]
            state = None
            render_s = encode_s = whole_s = 0.0
            frames = 0
            for chunk in range(4):
                start = chunk * CHUNK_FRAMES * 16000 // FPS
                request = ChunkRequest(
                    avatar=avatar,
                    audio=audio,
                    audio_offset=start,
                    start_sample=start,
                    first_frame_index=chunk * CHUNK_FRAMES,
                    frame_count=CHUNK_FRAMES,
                    fps=FPS,
                    state=state,
                    session_id="bench",
                    partial_ok=name == "new",
                )
                t0 = time.thread_time()
                result = model.render([request])[0]
                render_s += time.thread_time() - t0
                assert not isinstance(result, BaseException)
                state = result.state
                frames += CHUNK_FRAMES
                if name == "old":
                    t0 = time.thread_time()
                    for frame in result.frames:
                        sizes["old"].append(len(encode_jpeg(frame, QUALITY)))
                    encode_s += time.thread_time() - t0
                else:
                    t0 = time.thread_time()
                    for part in result.partial:
                        static = splices.get(part.static.key, part.static.image, QUALITY)
                        sizes["new"].append(
                            len(static.splice(part.rows, part.y0, part.x0, part.x1))
                        )
                    encode_s += time.thread_time() - t0
                    whole = [p.full() for p in result.partial]
                    t0 = time.thread_time()
                    for frame in whole:
                        encode_jpeg(frame, QUALITY)
                    whole_s += time.thread_time() - t0
            figures[f"{name}_render"].append(render_s * 1000 / frames)
            figures[f"{name}_encode"].append(encode_s * 1000 / frames)
            if name == "new":
                figures["new_encode_whole"].append(whole_s * 1000 / frames)
    out: dict[str, Any] = {k: round(statistics.median(v), 3) for k, v in figures.items()}
    out["old_total"] = round(out["old_render"] + out["old_encode"], 3)
    out["new_total"] = round(out["new_render"] + out["new_encode"], 3)
    out["speedup_total"] = round(out["old_total"] / out["new_total"], 2)
    out["jpeg_kb_mean"] = {k: round(float(np.mean(v)) / 1024, 1) for k, v in sizes.items()}
    new_avatar = prepared["new"]
    out["moving_rows"] = [new_avatar.y0, new_avatar.y1, H]
    out["rounds"] = rounds
    return out


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def loop_lag(address: str) -> dict[str, Any]:
    """The server's event-loop lag over its life, from its Prometheus histogram."""
    text = httpx.get(f"http://{address}/metrics", timeout=10).text
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith("omnistream_event_loop_lag_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    if not buckets or buckets[-1][1] == 0:
        return {}
    total = buckets[-1][1]
    p99 = next(le for le, count in buckets if count >= 0.99 * total)
    late = {
        f"over_{int(le * 1000)}ms": round(1 - count / total, 4)
        for le, count in buckets
        if le in (0.01, 0.05, 0.1)
    }
    return {"ticks": int(total), "p99_at_most_s": p99, **late}


def ramp(label: str, env: dict[str, str]) -> dict[str, Any]:
    out_dir = OUT / "avatar-lite-v2" / f"ramp-{label}"
    out_dir.mkdir(parents=True, exist_ok=True)
    before = load()
    with omnistream_server(**env) as (address, server):
        cmd = [
            sys.executable,
            "-m",
            "omnistream.cli",
            "bench",
            "avatar",
            "--scenario",
            SCENARIO,
            "--p95-bound-ms",
            "300",
            "--url",
            f"ws://{address}/",
            "--out",
            str(out_dir),
            "--no-plots",
            "--force",
        ]
        started = time.monotonic()
        server_cpu, client_cpu = process_cpu_s(server.pid), children_cpu_s()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.monotonic() - started
        server_cpu = process_cpu_s(server.pid) - server_cpu
        client_cpu = children_cpu_s() - client_cpu
        lag = loop_lag(address)
    report = json.loads((out_dir / "report.json").read_text())
    summary = report["summary"]
    held = [s for s in summary["steps"] if s["held"]]
    best = max(held, key=lambda s: s["sessions"]) if held else None
    # Every frame the server delivered during the ramp (28 a chunk at this geometry), for
    # CPU per frame: the server's whole process (render, JPEG, WebSocket, event loop)
    # and the benchmark client's, which shares the machine.
    frames = sum(s["chunks_answered"] for s in summary["steps"]) * CHUNK_FRAMES
    return {
        "env": env,
        "frames_delivered": frames,
        "server_cpu_ms_per_frame": round(server_cpu * 1000 / frames, 3) if frames else None,
        "client_cpu_ms_per_frame": round(client_cpu * 1000 / frames, 3) if frames else None,
        "server_event_loop_lag": lag,
        "exit": proc.returncode,
        "max_sessions_held": summary["max_sessions_held"],
        "stop_reason": summary.get("stop_reason"),
        "p95_ms_at_max": best["latency_ms"]["p95"] if best else None,
        "load_before": before,
        "load_after": load(),
        "wall_s": round(wall, 1),
        "report": str(out_dir.relative_to(ROOT)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-ramp", action="store_true")
    ap.add_argument(
        "--ramp-rounds",
        type=int,
        default=1,
        help="old/new ramp pairs, alternated (a shared machine's load then hits both)",
    )
    ap.add_argument("--out", default=str(OUT / "avatar_lite_v2.json"))
    args = ap.parse_args()
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_start": load()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    result["direct"] = direct(args.rounds)
    result["direct"]["load_after"] = load()
    print(json.dumps(result["direct"], indent=1), flush=True)
    if not args.skip_ramp:
        old_env = {
            "OMNISTREAM_AVATAR_MODEL": "omni-avatar-lite-v1",
            "OMNISTREAM_JPEG_SPLICE": "false",
        }
        pairs = []
        for r in range(args.ramp_rounds):
            suffix = "" if args.ramp_rounds == 1 else f"-{r + 1}"
            pair: dict[str, Any] = {"old": ramp("old" + suffix, old_env)}
            print(json.dumps(pair["old"], indent=1), flush=True)
            pair["new"] = ramp("new" + suffix, {})
            print(json.dumps(pair["new"], indent=1), flush=True)
            old, new = pair["old"]["max_sessions_held"], pair["new"]["max_sessions_held"]
            pair["ratio"] = round(new / old, 2) if old else None
            pairs.append(pair)
        result["ramps"] = pairs
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
