"""The rest of OmniRT's text2audio service adapter: ``/health`` and ``/metrics``.

``tts_http`` serves the synthesis routes; these two answer what an orchestrator polls
before and while it routes speech to this server: whether each voice model is loaded,
how many streams it carries, and how fast its recent streams started (time to first
audio) and ran (real-time factor). Figures come from the server's window of recent
streams, so they describe current behaviour rather than the process's whole life.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request

from omnistream.models.tts import TASK
from omnistream.transports.state import get_state
from omnistream.transports.tts_http import ADAPTER_SCHEMA, RECENT_STREAMS, recent_streams

router = APIRouter()


def _percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return round(ordered[index], 3)


@router.get("/v1/text2audio/health")
async def text2audio_health(request: Request) -> dict[str, Any]:
    """Adapter liveness: which voice models can serve now and whether they are loaded."""
    state = get_state(request)
    models = []
    for spec in state.registry.specs(TASK):
        reason = spec.unavailable_reason()
        models.append(
            {
                "id": spec.id,
                "available": reason is None,
                "loaded": state.engine.loaded(spec.id),
                "reason": reason or "",
            }
        )
    usable = [m for m in models if m["available"]]
    return {
        "status": "ok" if usable else "unavailable",
        "adapter": ADAPTER_SCHEMA,
        "default": state.settings.tts_model,
        "live_streams": len(state.sessions.live("tts")),
        "models": models,
    }


@router.get("/v1/text2audio/metrics")
async def text2audio_metrics(request: Request) -> dict[str, Any]:
    """Per voice model: loaded, live streams, TTFA and RTF of the recent streams."""
    state = get_state(request)
    streams = list(recent_streams(state))
    models: dict[str, Any] = {}
    for spec in state.registry.specs(TASK):
        mine = [s for s in streams if s.model_id == spec.id]
        ttfa = [s.first_audio_ms for s in mine if s.first_audio_ms is not None]
        rtf = [s.rtf for s in mine if s.audio_s > 0]
        models[spec.id] = {
            "loaded": state.engine.loaded(spec.id),
            "live_streams": state.sessions.live_for_model(spec.id),
            "recent_streams": len(mine),
            "audio_s": round(sum(s.audio_s for s in mine), 3),
            "ttfa_ms": {
                "p50": _percentile(ttfa, 0.5),
                "p95": _percentile(ttfa, 0.95),
                "last": round(ttfa[-1], 3) if ttfa else None,
            },
            "rtf": {
                "p50": _percentile(rtf, 0.5),
                "p95": _percentile(rtf, 0.95),
                "mean": round(statistics.fmean(rtf), 4) if rtf else None,
            },
        }
    return {
        "adapter": ADAPTER_SCHEMA,
        "window": f"last {RECENT_STREAMS} streams",
        "models": models,
    }
