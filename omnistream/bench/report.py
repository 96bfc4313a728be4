"""The versioned JSON report, the Markdown summary, and comparisons between servers.

The JSON report is the record: settings, the machine it ran on, every per-session (or
per-request) series and the summaries, under ``schema_version`` so later tools can read
old baselines. The Markdown is what a person reads first; it is derived from the same
summaries so the two never disagree.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from omnistream.bench import SCHEMA_VERSION
from omnistream.bench.stats import ratio

AVATAR_RATIO_KEYS: tuple[tuple[str, str, str], ...] = (
    ("ttff_ms", "p50", "TTFF p50"),
    ("latency_ms", "p50", "latency p50"),
    ("latency_ms", "p95", "latency p95"),
    ("latency_ms", "p99", "latency p99"),
    ("jitter_ms", "p95", "jitter p95"),
    ("delivered_fps", "mean", "delivered fps"),
    ("payload_bytes_per_chunk", "mean", "bytes per chunk"),
)
TTS_RATIO_KEYS: tuple[tuple[str, str, str], ...] = (
    ("ttfa_ms", "p50", "TTFA p50"),
    ("ttfa_ms", "p95", "TTFA p95"),
    ("rtf", "p50", "RTF p50"),
    ("rtf", "p95", "RTF p95"),
    ("total_ms", "p50", "request time p50"),
)


def _first_line(path: str, prefix: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Where the client ran: enough to tell whether two reports are comparable."""
    mem_kb = _first_line("/proc/meminfo", "MemTotal")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        load = []
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "cpu_model": _first_line("/proc/cpuinfo", "model name") or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_gib": (round(int(mem_kb.split()[0]) / 1024 / 1024, 1) if mem_kb else None),
        "loadavg_at_start": load,
        "versions": {
            name: _version(name)
            for name in ("omnistream", "websockets", "httpx", "numpy", "matplotlib")
        },
    }


def build_report(
    kind: str,
    settings: dict[str, Any],
    runs: Sequence[dict[str, Any]],
    summary: dict[str, Any],
    machine: dict[str, Any],
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Assemble the JSON report (``kind``: ``avatar``, ``avatar_ramp`` or ``tts``)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "tool": {"name": "omnistream bench", "version": _version("omnistream")},
        "command": list(command) if command is not None else None,
        "machine": machine,
        "settings": settings,
        "summary": summary,
        "runs": list(runs),
    }


def compare(
    a: dict[str, Any], b: dict[str, Any], keys: Sequence[tuple[str, str, str]]
) -> dict[str, Any]:
    """Ratios B/A of the headline figures of two summaries (None where not defined)."""
    out: dict[str, Any] = {}
    for group, stat, name in keys:
        va = (a.get(group) or {}).get(stat)
        vb = (b.get(group) or {}).get(stat)
        out[name] = {"a": va, "b": vb, "b_over_a": ratio(vb, va)}
    return out


def write_report(report: dict[str, Any], markdown: str, out_dir: Path) -> dict[str, Path]:
    """Write ``report.json`` and ``summary.md`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "summary.md"}
    paths["json"].write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown, encoding="utf-8")
    return paths


# ------------------------------------------------------------------------------------------
# Markdown


def _f(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


AVATAR_HEADER = (
    "target",
    "N",
    "chunks ok/planned",
    "TTFF p50 ms",
    "lat p50",
    "p95",
    "p99",
    "max",
    "jitter p95",
    "late",
    "fps (min)",
    "frames/chunk",
    "KB/chunk",
    "errors",
    "held",
)


def avatar_row(s: dict[str, Any], target: str | None = None) -> list[str]:
    """One Markdown row of an avatar run summary."""
    lat = s["latency_ms"]
    payload = s["payload_bytes_per_chunk"]["mean"]
    fps = s["delivered_fps"]
    return [
        target or s["label"],
        str(s["sessions"]),
        f"{s['chunks_answered']}/{s['chunks_planned']}",
        _f(s["ttff_ms"]["p50"]),
        _f(lat["p50"]),
        _f(lat["p95"]),
        _f(lat["p99"]),
        _f(lat["max"]),
        _f(s["jitter_ms"]["p95"]),
        str(s["late_chunks"]),
        f"{_f(fps['mean'], 1)} ({_f(fps['min'], 1)})",
        _f(s["frames_per_chunk"]["mean"], 1),
        _f(None if payload is None else payload / 1024, 1),
        str(s["errors"]["total"]),
        "yes" if s["held"] else "no",
    ]


TTS_HEADER = (
    "target",
    "streams",
    "requests ok",
    "TTFA p50 ms",
    "p95",
    "p99",
    "max",
    "RTF p50",
    "RTF max",
    "underruns",
    "stall max ms",
    "audio s",
    "MB",
    "errors",
    "held",
)


def tts_row(s: dict[str, Any], target: str | None = None) -> list[str]:
    """One Markdown row of a TTS run summary."""
    ttfa, rtf = s["ttfa_ms"], s["rtf"]
    return [
        target or s["label"],
        str(s["streams"]),
        f"{s['requests_ok']}/{s['requests']}",
        _f(ttfa["p50"]),
        _f(ttfa["p95"]),
        _f(ttfa["p99"]),
        _f(ttfa["max"]),
        _f(rtf["p50"], 3),
        _f(rtf["max"], 3),
        str(s["underruns"]),
        _f(s["stall_ms"]["max"]),
        _f(s["audio_s"], 1),
        _f(s["bytes"] / 1e6, 2),
        str(s["errors"]["total"]),
        "yes" if s["held"] else "no",
    ]


def _errors_block(summaries: Sequence[dict[str, Any]]) -> str:
    lines: list[str] = []
    for s in summaries:
        errors = s["errors"]
        if errors["total"]:
            kinds = ", ".join(f"{k} ×{v}" for k, v in errors["by_kind"].items())
            lines.append(f"- **{s['label']}** ({s['url']}): {kinds}")
            lines += [f"  - `{m}`" for m in errors["first_messages"][:5]]
    return ("\n\n**Errors**\n\n" + "\n".join(lines)) if lines else ""


def _worst(values: Sequence[Any]) -> Any:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _client_line(summaries: Sequence[dict[str, Any]]) -> str:
    """The client's own timing health, worst over the runs of each target."""
    parts = []
    for label in dict.fromkeys(s["label"] for s in summaries):
        clients = [s["client"] for s in summaries if s["label"] == label]
        lag = _worst([c["loop_lag_ms"]["p99"] for c in clients])
        if "pacing_ms" in clients[0]:
            p99 = _worst([c["pacing_ms"]["p99"] for c in clients])
            worst = _worst([c["pacing_ms"]["max"] for c in clients])
            parts.append(
                f"{label}: send pacing error p99 {_f(p99, 1)} ms (max {_f(worst, 1)}), "
                f"event-loop lag p99 {_f(lag, 1)} ms"
            )
        else:
            parts.append(f"{label}: event-loop lag p99 {_f(lag, 1)} ms")
    return "Client health (worst run): " + "; ".join(parts) + "."


def _ratio_block(ratios: dict[str, Any]) -> str:
    rows = [
        [name, _f(v["a"], 2), _f(v["b"], 2), _f(v["b_over_a"], 3)] for name, v in ratios.items()
    ]
    return "\n\n**B / A**\n\n" + _table(("figure", "A", "B", "B/A"), rows)


def _targets_line(summaries: Sequence[dict[str, Any]]) -> str:
    seen: dict[str, str] = {}
    for s in summaries:
        seen.setdefault(s["label"], s["url"])
    return "Targets: " + ", ".join(f"{k} = `{v}`" for k, v in seen.items()) + "."


def avatar_markdown(
    title: str, summaries: Sequence[dict[str, Any]], ratios: dict[str, Any] | None = None
) -> str:
    """Markdown for avatar runs (one row per run)."""
    chunk = summaries[0].get("chunk_ms") if summaries else None
    rounds = max((s.get("rounds", 1) for s in summaries), default=1)
    chunk_note = (
        f" Chunk {chunk:.0f} ms; latency = last AUDI byte sent → VIDX complete." if chunk else ""
    )
    if rounds > 1:
        chunk_note += f" Figures pooled over {rounds} alternating rounds per target."
    text = [
        f"## {title}",
        "",
        _targets_line(summaries) + chunk_note,
        "",
        _table(AVATAR_HEADER, [avatar_row(s) for s in summaries]),
        "",
        _client_line(summaries),
    ]
    out = "\n".join(text)
    if ratios:
        out += _ratio_block(ratios)
    return out + _errors_block(summaries) + "\n"


def ramp_markdown(
    title: str,
    ramps: Sequence[tuple[str, dict[str, Any], Sequence[dict[str, Any]]]],
) -> str:
    """Markdown for one or two ramps: ``(label, ramp summary, step run summaries)``."""
    parts = [f"## {title}", ""]
    all_steps: list[dict[str, Any]] = []
    for label, ramp, steps in ramps:
        all_steps += steps
        parts.append(
            f"**{label}**: largest N that held real time: **{ramp['max_sessions_held']}** "
            f"({ramp['stop_reason']})."
        )
        parts.append("")
    parts.append(_targets_line(all_steps))
    parts.append("")
    rows = sorted(all_steps, key=lambda s: (s["label"], s["sessions"]))
    parts.append(_table(AVATAR_HEADER, [avatar_row(s) for s in rows]))
    parts += ["", _client_line(rows)]
    return "\n".join(parts) + _errors_block(rows) + "\n"


def tts_markdown(
    title: str, summaries: Sequence[dict[str, Any]], ratios: dict[str, Any] | None = None
) -> str:
    """Markdown for TTS runs."""
    text = [
        f"## {title}",
        "",
        _targets_line(summaries)
        + " TTFA = request sent → first audio byte; RTF = request time / audio duration;"
        " underruns = a real-time player running dry.",
        "",
        _table(TTS_HEADER, [tts_row(s) for s in summaries]),
        "",
        _client_line(summaries),
    ]
    out = "\n".join(text)
    if ratios:
        out += _ratio_block(ratios)
    return out + _errors_block(summaries) + "\n"
