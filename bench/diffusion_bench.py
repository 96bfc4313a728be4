"""Diffusion on the shared scheduler: throughput from per-step batching, and live sessions.

Builds a small random-weight Stable Diffusion pipeline (the test one, or a real-size
SD 1.5 UNet config with ``--real-size`` on a GPU), saves it to a models directory, then:

1. **direct**: ``StableDiffusionPipeline.__call__`` in this process, one image after
   another (what a server that runs each request as one monolithic call does);
2. **served**: ``omnistream serve --models-dir`` in its own process, ``C`` concurrent
   ``/v1/generate`` text2image requests (C = 1, 4, 8): images/s, the batch size the
   requests report, and the ratio to (1) — the gain of per-step continuous batching;
3. **first progress**: an async job's POST → its first ``stage_progress`` event (SSE);
4. **live avatars**: p95 chunk latency of 4 FlashTalk sessions at real-time pace, alone
   and with 30-step image jobs running back to back beside them.

Usage: ``python bench/diffusion_bench.py [--steps 8] [--size 64] [--seconds 12]``.
Writes ``bench/results/diffusion[-<tag>].json`` and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from omnistream_server import omnistream_server

from omnistream.sessions.avatar import default_avatar_bytes

RESULTS = Path(__file__).parent / "results"
SR = 16000


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


def build(root: Path, real_size: bool) -> Path:
    """The test pipeline, or (``real_size``) SD 1.5's UNet/VAE configs at random weights."""
    if not real_size:
        from tests.diffusion_helpers import build_models

        return build_models(root, video=False)["tiny-sd"]
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.diffusion_helpers import _tokenizer

    torch.manual_seed(0)
    tokenizer = _tokenizer(root / "_tok")
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12,
                                        max_position_embeddings=77, vocab_size=len(tokenizer) + 2,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    tokenizer.model_max_length = 77
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.5 defaults
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, layers_per_block=2, sample_size=512,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    path = root / "sd15-random"
    pipe.save_pretrained(path)
    return path


def direct_runner(path: Path, steps: int, size: int, threads: int) -> Any:
    """Sequential ``__call__`` in this process (after one warm-up image), on as many torch
    threads as the server gives one diffusion call (``OMNISTREAM_DIFFUSION_CPU_THREADS``).
    Returns ``run(images) -> row``; the pipeline stays loaded between rounds."""
    import torch
    from diffusers import StableDiffusionPipeline

    if threads > 0:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True,
                                                   torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)

    def one(seed: int) -> None:
        pipe("a lighthouse in a storm", width=size, height=size, num_inference_steps=steps,
             guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(seed))

    one(0)

    def run(images: int) -> dict[str, Any]:
        started = time.perf_counter()
        for seed in range(images):
            one(seed + 1)
        elapsed = time.perf_counter() - started
        return {"images": images, "seconds": round(elapsed, 3),
                "images_per_s": round(images / elapsed, 3), "device": device,
                "torch_threads": torch.get_num_threads()}

    return run


def served(base: str, concurrency: int, images: int, steps: int, size: int) -> dict[str, Any]:
    """``images`` text2image requests, ``concurrency`` at a time."""
    body = {"task": "text2image", "model": "bench-sd", "inputs": {"prompt": "a lighthouse"},
            "config": {"width": size, "height": size, "num_inference_steps": steps,
                       "guidance_scale": 7.5}}
    reports: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(images))

    def worker() -> None:
        with httpx.Client(base_url=base, timeout=600) as client:
            while True:
                with lock:
                    seed = next(counter, None)
                if seed is None:
                    return
                r = client.post("/v1/generate",
                                json=body | {"config": {**body["config"], "seed": seed}})
                with lock:
                    if r.status_code == 200:
                        reports.append(r.json()["metadata"])
                    else:
                        errors.append(r.text[:200])

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    batch = [r["batch_size"] for r in reports]
    return {
        "concurrency": concurrency,
        "images": len(reports),
        "errors": errors[:3],
        "seconds": round(elapsed, 3),
        "images_per_s": round(len(reports) / elapsed, 3),
        "batch_size_mean": round(statistics.mean(batch), 2) if batch else None,
        "batch_size_max": max(batch) if batch else None,
        "latency_p50_s": round(pct([r["timings"]["total_ms"] / 1000 for r in reports], 50), 3),
    }


def first_progress(base: str, steps: int, size: int, rounds: int = 5) -> dict[str, Any]:
    """POST of an async job → its first ``stage_progress`` event, on an idle server."""
    times = []
    with httpx.Client(base_url=base, timeout=600) as client:
        for seed in range(rounds):
            started = time.perf_counter()
            job = client.post("/v1/generate", json={
                "task": "text2image", "model": "bench-sd", "inputs": {"prompt": "x"},
                "config": {"width": size, "height": size, "num_inference_steps": steps,
                           "seed": seed}, "async_run": True}).json()
            with client.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
                for line in events.iter_lines():
                    if line == "event: stage_progress":
                        times.append((time.perf_counter() - started) * 1000)
                        break
            for _ in range(600):
                if client.get(f"/v1/jobs/{job['id']}").json()["state"] in (
                        "succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.05)
    return {"rounds": rounds, "p50_ms": round(pct(times, 50), 1),
            "max_ms": round(max(times), 1)}


def _speech(samples: int, offset: int) -> bytes:
    t = (np.arange(samples) + offset) / SR
    phase = 2 * np.pi * 140 * t
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    syll = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    return (np.clip(0.15 * voice * syll, -1, 1) * 32767).astype("<i2").tobytes()


async def _session(url: str, seconds: float, latencies: list[float], late: list[int]) -> None:
    image = base64.b64encode(default_avatar_bytes()).decode()
    async with websockets.connect(url, max_size=None, open_timeout=30) as ws:
        await ws.send(json.dumps({"type": "init", "ref_image": image, "width": 416,
                                  "height": 704, "fps": 25, "slice_len": 14, "frame_num": 15}))
        init = json.loads(await ws.recv())
        samples = int(init["chunk_samples"])
        period = samples / SR
        started = time.monotonic()
        index = 0
        while time.monotonic() - started < seconds:
            due = started + index * period
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            sent = time.monotonic()
            await ws.send(b"AUDI" + _speech(samples, index * samples))
            reply = await ws.recv()
            assert isinstance(reply, bytes)
            done = time.monotonic()
            latencies.append((done - sent) * 1000)
            if done > due + period:
                late.append(index)
            index += 1


def avatars(host: str, base: str, seconds: float, with_job: bool, job_steps: int,
            size: int) -> dict[str, Any]:
    """4 live FlashTalk sessions, optionally beside back-to-back image jobs."""
    latencies: list[float] = []
    late: list[int] = []
    stop = threading.Event()
    jobs_done = [0]

    def jobs() -> None:
        with httpx.Client(base_url=base, timeout=600) as client:
            while not stop.is_set():
                r = client.post("/v1/generate", json={
                    "task": "text2image", "model": "bench-sd", "inputs": {"prompt": "x"},
                    "config": {"width": size, "height": size,
                               "num_inference_steps": job_steps, "seed": 1}})
                if r.status_code == 200:
                    jobs_done[0] += 1

    runner = threading.Thread(target=jobs, daemon=True)
    if with_job:
        runner.start()
        time.sleep(1.0)

    async def main() -> None:
        await asyncio.gather(*(_session(f"ws://{host}/", seconds, latencies, late)
                               for _ in range(4)))

    asyncio.run(main())
    stop.set()
    if with_job:
        runner.join(timeout=600)
    return {"sessions": 4, "with_job": with_job, "chunks": len(latencies),
            "p50_ms": round(pct(latencies, 50), 1), "p95_ms": round(pct(latencies, 95), 1),
            "late_chunks": len(late), "jobs_finished": jobs_done[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=16, help="images per served run")
    parser.add_argument("--seconds", type=float, default=12.0, help="avatar run length")
    parser.add_argument("--real-size", action="store_true", help="SD 1.5-size UNet (GPU)")
    parser.add_argument("--skip-avatars", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the direct run and the server (CPU)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds (direct, served x3, avatars alone/beside)")
    args = parser.parse_args()

    out: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
        "settings": vars(args),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        path = build(root, args.real_size)
        path.rename(root / "bench-sd")
        path = root / "bench-sd"
        run_direct = direct_runner(path, args.steps, args.size, args.threads)
        env = {"OMNISTREAM_MODELS_DIR": str(root), "OMNISTREAM_MAX_RUNNING_JOBS": "8",
               "OMNISTREAM_ARTIFACTS_DIR": str(Path(tmp) / "artifacts"),
               "OMNISTREAM_DIFFUSION_CPU_THREADS": str(args.threads)}
        rounds: list[dict[str, Any]] = []
        with omnistream_server(**env) as (address, _proc):
            base = f"http://{address}"
            served(base, 1, 1, args.steps, args.size)  # load the model
            for index in range(args.rounds):
                # Interleaved, so load from elsewhere on a shared machine hits every
                # configuration alike; the summary takes the median over rounds.
                row: dict[str, Any] = {"round": index}
                row["direct"] = run_direct(max(4, args.images // 2))
                print(f"direct: {row['direct']}", flush=True)
                row["served"] = []
                for concurrency in (1, 4, 8):
                    images = args.images if concurrency > 1 else max(4, args.images // 2)
                    result = served(base, concurrency, images, args.steps, args.size)
                    result["ratio_to_direct"] = round(
                        result["images_per_s"] / row["direct"]["images_per_s"], 3)
                    row["served"].append(result)
                    print(f"served: {result}", flush=True)
                if not args.skip_avatars:
                    row["avatars"] = [
                        avatars(address, base, args.seconds, False, 30, args.size),
                        avatars(address, base, args.seconds, True, 30, args.size),
                    ]
                    for result in row["avatars"]:
                        print(f"avatars: {result}", flush=True)
                rounds.append(row)
            out["first_progress"] = first_progress(base, args.steps, args.size)
            print(f"first progress: {out['first_progress']}", flush=True)
        out["rounds"] = rounds
        out["summary"] = summarise(rounds)
    out["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    name = f"diffusion{'-' + args.tag if args.tag else ''}.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {RESULTS / name}")
    print(markdown(out))
    return 0


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the interleaved rounds."""
    def med(values: Any) -> float:
        return round(float(statistics.median(values)), 3)

    out: dict[str, Any] = {
        "direct_images_per_s": med(r["direct"]["images_per_s"] for r in rounds),
        "served": [],
    }
    for position, concurrency in enumerate((1, 4, 8)):
        rows = [r["served"][position] for r in rounds]
        out["served"].append({
            "concurrency": concurrency,
            "images_per_s": med(x["images_per_s"] for x in rows),
            "ratio_to_direct": med(x["ratio_to_direct"] for x in rows),
            "batch_size_mean": med(x["batch_size_mean"] or 0 for x in rows),
        })
    if all("avatars" in r for r in rounds):
        for key, position in (("avatars_alone", 0), ("avatars_beside_job", 1)):
            rows = [r["avatars"][position] for r in rounds]
            out[key] = {
                "p95_ms": med(x["p95_ms"] for x in rows),
                "p50_ms": med(x["p50_ms"] for x in rows),
                "late_chunks": sum(x["late_chunks"] for x in rows),
                "chunks": sum(x["chunks"] for x in rows),
            }
    return out


def markdown(out: dict[str, Any]) -> str:
    """The summary as a Markdown table."""
    s = out["summary"]
    lines = ["| run | images/s | vs direct | mean batch |", "|---|---|---|---|",
             f"| direct (sequential __call__) | {s['direct_images_per_s']} | 1.0 | 1 |"]
    for row in s["served"]:
        lines.append(f"| served, concurrency {row['concurrency']} | {row['images_per_s']} | "
                     f"{row['ratio_to_direct']} | {row['batch_size_mean']} |")
    lines.append(f"\nfirst progress event: p50 {out['first_progress']['p50_ms']} ms")
    for key in ("avatars_alone", "avatars_beside_job"):
        if key in s:
            row = s[key]
            lines.append(f"{key}: p95 {row['p95_ms']} ms, p50 {row['p50_ms']} ms, "
                         f"late {row['late_chunks']}/{row['chunks']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
