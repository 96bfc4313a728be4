"""Wav2Lip throughput: model-only frames/s per batch size, and one render path figure.

Random weights (BatchNorm folded, as the loader leaves a real checkpoint): the speed of
a convolutional network does not depend on the values of its weights.

Three figures per variant and batch size:

* ``full``: the whole generator per frame (face encoder + audio encoder + decoder),
  what a video-loop avatar would cost;
* ``cached``: what omnistream runs per frame for a still reference — audio encoder and
  decoder, the avatar's face features gathered from the cache (``Wav2LipModel.infer``;
  on CUDA this is the bf16 CUDA-graph path);
* ``render``: ``Wav2LipModel.render`` on 416×704 FlashTalk frames — mel features,
  the generator and paste-back (no JPEG).

Usage::

    python bench/wav2lip_bench.py --variants 96 256 384 --out bench/results/wav2lip_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnistream.models.avatar_base import ChunkRequest, PrepareRequest
from omnistream.models.wav2lip.model import Wav2LipModel
from omnistream.models.wav2lip.network import LAYOUTS, build

DEFAULT_BATCHES = {"96": [1, 4, 16, 32], "256": [1, 4], "384": [1, 2]}


def _timeit(fn: Any, frames: int, min_s: float, min_reps: int, sync: Any) -> dict[str, float]:
    fn()  # warm-up (allocations, oneDNN / cuDNN selection, graph capture)
    sync()
    reps, started, cpu_started = 0, time.perf_counter(), time.process_time()
    while reps < min_reps or time.perf_counter() - started < min_s:
        fn()
        reps += 1
    sync()
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    # Frames per CPU-second is the figure that survives other work sharing the cores;
    # frames per wall second is what a session sees.
    return {"reps": reps, "seconds": round(elapsed, 3),
            "ms_per_batch": round(1000 * elapsed / reps, 2),
            "frames_per_s": round(frames * reps / elapsed, 2),
            "frames_per_cpu_s": round(frames * reps / max(cpu, 1e-9), 2)}


def gflops_per_frame(variant: str) -> dict[str, float]:
    """Per-frame GFLOP (2 × multiply-adds) of the full generator and of the cached path."""
    from torch.utils.flop_counter import FlopCounterMode

    size = LAYOUTS[variant].size
    net = build(variant, "meta")
    mel = torch.zeros(1, 1, 80, 16, device="meta")
    face = torch.zeros(1, 6, size, size, device="meta")
    with FlopCounterMode(display=False) as full:
        net(mel, face)
    feats = net.encode_face(face)
    with FlopCounterMode(display=False) as cached:
        net.decode(net.encode_audio(mel), feats)
    return {"full": round(full.get_total_flops() / 1e9, 2),
            "cached_face": round(cached.get_total_flops() / 1e9, 2)}


def bench_variant(variant: str, batches: list[int], device: str, min_s: float,
                  min_reps: int) -> dict[str, Any]:
    size = LAYOUTS[variant].size
    net = build(variant)
    net.fold_batchnorm()
    model = Wav2LipModel(net, device, max_batch=max(batches))
    if model.is_cuda:
        model.warmup()  # capture every padded size now, as load_model does in the server
    sync = torch.cuda.synchronize if model.is_cuda else (lambda: None)
    import cv2

    from omnistream.sessions.avatar import default_avatar_bytes

    bgr = cv2.imdecode(np.frombuffer(default_avatar_bytes(), np.uint8), cv2.IMREAD_COLOR)
    avatar = model.prepare(PrepareRequest(np.ascontiguousarray(bgr[:, :, ::-1]), 416, 704,
                                          "bench"))
    dev = model._device_avatar(avatar)
    rows = []
    for batch in batches:
        mel_np = np.random.default_rng(0).uniform(-4, 4, (batch, 1, 80, 16)).astype(np.float32)
        mel = torch.from_numpy(mel_np).to(model.device, model.dtype)
        face = torch.rand(batch, 6, size, size, device=model.device, dtype=model.dtype)
        face = face.contiguous(memory_format=torch.channels_last)

        def full(mel: torch.Tensor = mel, face: torch.Tensor = face) -> None:
            with torch.inference_mode():
                model.net(mel, face)

        def cached(mel_np: np.ndarray = mel_np, batch: int = batch) -> None:
            model.infer(mel_np, [dev] * batch)

        row = {"batch": batch,
               "full": _timeit(full, batch, min_s, min_reps, sync),
               "cached": _timeit(cached, batch, min_s, min_reps, sync)}
        rows.append(row)
        print(f"wav2lip-{variant} batch {batch:4d}: full {row['full']['frames_per_s']:8.2f} f/s"
              f" ({row['full']['frames_per_cpu_s']:8.2f} per CPU-s)  cached-face "
              f"{row['cached']['frames_per_s']:8.2f} f/s "
              f"({row['cached']['frames_per_cpu_s']:8.2f} per CPU-s)", flush=True)
    # The render path at the largest batch: one chunk of that many frames.
    frames = max(batches)
    audio = (0.1 * np.random.default_rng(1).standard_normal(frames * 640 + 4000)).astype(
        np.float32
    )
    chunk = ChunkRequest(avatar=avatar, audio=audio, audio_offset=4000, start_sample=0,
                         first_frame_index=0, frame_count=frames, fps=25)
    render = _timeit(lambda: model.render([chunk]), frames, min_s, min_reps, sync)
    print(f"wav2lip-{variant} render {frames} frames at 416x704: "
          f"{render['frames_per_s']:.2f} f/s ({render['frames_per_cpu_s']:.2f} per CPU-s)",
          flush=True)
    info = model.info()
    model.close()
    return {"variant": f"wav2lip-{variant}", "gflop_per_frame": gflops_per_frame(variant),
            "device": device, "dtype": str(model.dtype),
            "cuda_graphs": model.use_graphs, "model": info, "batches": rows,
            "render_416x704": {"batch": frames, **render}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["96", "256", "384"])
    parser.add_argument("--batches", nargs="+", type=int, help="override batch sizes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--min-reps", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "results": [],
    }
    for variant in args.variants:
        batches = args.batches or DEFAULT_BATCHES[variant]
        load_before = os.getloadavg()[0]
        row = bench_variant(variant, batches, args.device, args.min_seconds, args.min_reps)
        # The load average shows how much other work shared the cores during the run.
        row["loadavg_1m"] = {"before": round(load_before, 2),
                             "after": round(os.getloadavg()[0], 2)}
        results["results"].append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
