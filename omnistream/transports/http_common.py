"""Service routes every deployment needs: health, readiness, Prometheus, model lists."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from omnistream import __version__
from omnistream.transports.state import get_state

router = APIRouter()


@router.get("/healthz")
@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Liveness: the process and its event loop answer."""
    state = get_state(request)
    return {
        "status": "ok",
        "version": __version__,
        "live_sessions": len(state.sessions.live()),
    }


@router.get("/readyz")
async def ready(request: Request, response: Response) -> dict[str, Any]:
    """Readiness: tier policy and whether each core model is loaded and available.

    Under a Runtime Profile: 503 ``warming`` until its models are preloaded and warmed,
    and a ``profile`` section with each model's state, fallback and warmup time.
    """
    from omnistream.profiles.launch import profile_runtime

    state = get_state(request)
    degraded = state.registry.degraded()
    models = {
        spec.id: {
            "tier": str(spec.tier),
            "loaded": state.engine.loaded(spec.id),
            "available": spec.unavailable_reason() is None,
            "reason": spec.unavailable_reason() or "",
            "runners": state.engine.runtime(spec.id),
        }
        | ({"degraded_to": degraded[spec.id][0]} if spec.id in degraded else {})
        for spec in state.registry.specs()
    }
    body: dict[str, Any] = {
        "status": "ready",
        "allowed_model_tiers": sorted(str(t) for t in state.registry.allowed_tiers),
        "models": models,
    }
    runtime = profile_runtime(state)
    if runtime is not None:
        body["profile"] = runtime.report(state)
        if not runtime.ready:
            body["status"] = "warming"
            response.status_code = 503
    # A cluster node is not ready while it is full or draining (HAProxy stops sending).
    reasons = [r for check in state.extras.get("readiness_checks", []) if (r := check())]
    if reasons:
        body["status"] = "unavailable"
        body["reasons"] = reasons
        response.status_code = 503
    return body


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus exposition of this server's registry."""
    state = get_state(request)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/audio2video/models")
@router.get("/v1/avatar/models")
async def avatar_models(request: Request) -> dict[str, Any]:
    """FlashTalk-compatible model list: ids usable now plus a status for every model."""
    state = get_state(request)
    statuses = []
    usable = []
    for spec in state.registry.specs("audio2video"):
        reason = spec.unavailable_reason()
        statuses.append({"id": spec.id, "connected": reason is None, "reason": reason or ""})
        if reason is None:
            usable.append(spec.id)
    return {"models": usable, "statuses": statuses}
