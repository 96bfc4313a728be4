"""PNG plots of a benchmark report (matplotlib, headless Agg backend).

Plots read the same per-session series that go into the JSON report, so a plot can be
redrawn from an old report. matplotlib is an optional extra (``pip install
omnistream[bench]``): without it the CLI writes the report and says that plots were
skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _latencies(run: dict[str, Any]) -> list[float]:
    return [
        c["latency_ms"]
        for s in run["sessions"]
        for c in s["series"]
        if c.get("latency_ms") is not None
    ]


def _legend(ax: Any, **kwargs: Any) -> None:
    """A legend when something is labelled, else a note that there was no data."""
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(**kwargs)
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="grey")


def _cdf(ax: Any, values: Sequence[float], label: str) -> None:
    data = np.sort(np.asarray(values, dtype=float))
    if data.size == 0:
        return
    y = np.arange(1, data.size + 1) / data.size
    ax.step(data, y, where="post", label=f"{label} (n={data.size})")


def latency_cdf(runs: Sequence[dict[str, Any]], labels: Sequence[str], path: Path) -> Path:
    """CDF of per-chunk latency, one curve per run; the chunk duration marks 'late'."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    chunk_ms = None
    for run, label in zip(runs, labels, strict=True):
        _cdf(ax, _latencies(run), label)
        chunk_ms = chunk_ms or run["summary"].get("chunk_ms")
    if chunk_ms:
        ax.axvline(chunk_ms, color="grey", linestyle="--", linewidth=1, label="chunk duration")
    ax.set_xlabel("latency: last AUDI byte sent → VIDX complete (ms)")
    ax.set_ylabel("fraction of chunks")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=8)
    ax.set_title("Per-chunk latency CDF")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def latency_timeline(runs: Sequence[dict[str, Any]], labels: Sequence[str], path: Path) -> Path:
    """Latency of every chunk over time, one line per session (one panel per run)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 3.2 * len(runs)), squeeze=False)
    for ax, run, label in zip(axes[:, 0], runs, labels, strict=True):
        sessions = run["sessions"]
        for s in sessions:
            points = [
                (c["sent_s"], c["latency_ms"])
                for c in s["series"]
                if c.get("latency_ms") is not None and c.get("sent_s") is not None
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(
                    xs,
                    ys,
                    marker=".",
                    linewidth=0.8,
                    markersize=3,
                    label=f"s{s['session']}" if len(sessions) <= 8 else None,
                )
            late = [(c["sent_s"], c["latency_ms"]) for c in s["series"] if c.get("late")]
            if late:
                lx, ly = zip(*late, strict=True)
                ax.scatter(lx, ly, marker="x", color="red", s=14, zorder=3)
        chunk_ms = run["summary"].get("chunk_ms")
        if chunk_ms:
            ax.axhline(chunk_ms, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{label}: latency over time per session (x = late)", fontsize=10)
        ax.set_xlabel("chunk sent at (s since run start)")
        ax.set_ylabel("latency (ms)")
        ax.grid(alpha=0.3)
        if len(sessions) <= 8:
            _legend(ax, fontsize=7, ncol=4)
        elif not any(c.get("latency_ms") is not None for s in sessions for c in s["series"]):
            _legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def ramp_plot(ramps: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: Path) -> Path:
    """Sessions vs latency p50/p95/p99 per ramp, with the p95 bound; failed steps hollow."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    bound = None
    for label, steps in ramps:
        rows = sorted(steps, key=lambda s: s["sessions"])
        n = [s["sessions"] for s in rows]
        for stat, style in (("p50", ":"), ("p95", "-"), ("p99", "--")):
            ys = [s["latency_ms"][stat] for s in rows]
            ax.plot(
                n,
                [np.nan if y is None else y for y in ys],
                style,
                marker="o",
                label=f"{label} {stat}",
            )
        failed = [(s["sessions"], s["latency_ms"]["p95"]) for s in rows if not s["held"]]
        failed = [(x, y) for x, y in failed if y is not None]
        if failed:
            fx, fy = zip(*failed, strict=True)
            ax.scatter(
                fx,
                fy,
                s=90,
                facecolors="none",
                edgecolors="red",
                zorder=3,
                label=f"{label} did not hold",
            )
        bound = bound or next((s["p95_bound_ms"] for s in rows if s["p95_bound_ms"]), None)
    if bound:
        ax.axhline(bound, color="grey", linestyle="--", linewidth=1, label="p95 bound")
    ax.set_xscale("log", base=2)
    ticks = sorted({s["sessions"] for _, steps in ramps for s in steps})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("per-chunk latency (ms)")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, fontsize=8)
    ax.set_title("Ramp: sessions vs latency")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def ttfa_cdf(runs: Sequence[dict[str, Any]], labels: Sequence[str], path: Path) -> Path:
    """CDF of TTS time to first audio, one curve per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for run, label in zip(runs, labels, strict=True):
        _cdf(ax, [r["ttfa_ms"] for r in run["requests"] if r.get("ttfa_ms") is not None], label)
    ax.set_xlabel("time to first audio (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=8)
    ax.set_title("TTS TTFA CDF")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def tts_timeline(runs: Sequence[dict[str, Any]], labels: Sequence[str], path: Path) -> Path:
    """TTFA and RTF of each request against when it started (one panel per run)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 3.2 * len(runs)), squeeze=False)
    for ax, run, label in zip(axes[:, 0], runs, labels, strict=True):
        reqs = [r for r in run["requests"] if r.get("ttfa_ms") is not None]
        ax.scatter(
            [r["start_s"] for r in reqs], [r["ttfa_ms"] for r in reqs], s=12, label="TTFA (ms)"
        )
        under = [r for r in reqs if r.get("underruns")]
        if under:
            ax.scatter(
                [r["start_s"] for r in under],
                [r["ttfa_ms"] for r in under],
                s=40,
                facecolors="none",
                edgecolors="red",
                label="had underruns",
            )
        ax2 = ax.twinx()
        rtf = [r for r in reqs if r.get("rtf") is not None]
        ax2.scatter(
            [r["start_s"] for r in rtf],
            [r["rtf"] for r in rtf],
            s=10,
            marker="^",
            color="tab:orange",
            label="RTF",
        )
        ax2.set_ylabel("RTF")
        ax.set_title(f"{label}: TTFA and RTF per request", fontsize=10)
        ax.set_xlabel("request started at (s since run start)")
        ax.set_ylabel("TTFA (ms)")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
