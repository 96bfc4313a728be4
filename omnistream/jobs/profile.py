"""Runtime Profiles: a deployment described as data (services, models, ports, resources,
warmup, concurrency, fallbacks), validated with errors that name the line.

Example::

    name: edge-box
    services:
      - {name: avatar, kind: websocket, port: 8000}
      - {name: jobs, kind: http, port: 8000}
    models:
      - {id: omni-avatar-lite, backend: cpu, replicas: 2}
      - {id: whisper-tiny.en}
    ports: {http: 8000, metrics: 9100}
    resources: {cpus: 2, memory_gb: 4, gpus: 0}
    warmup: {models: [omni-avatar-lite], timeout_s: 60}
    concurrency: {max_sessions: 8, max_running_jobs: 1, max_queued_jobs: 16}
    fallbacks: [{model: omni-avatar-lite, fallback: omni-avatar-lite}]
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from omnistream.jobs.yamlsource import SourceDocument, SourceError

PROFILE_SCHEMA_VERSION = "1"
TierName = Literal["core", "adjacent", "experimental"]
ALL_TIERS: tuple[TierName, ...] = ("core", "adjacent", "experimental")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServiceEntry(_Strict):
    """One exposed service."""

    name: str
    kind: Literal["http", "websocket", "webrtc", "grpc"]
    port: int | None = Field(None, ge=1, le=65535)
    routes: list[str] = Field(default_factory=list)


class ModelEntry(_Strict):
    """A model the deployment keeps resident."""

    id: str
    backend: Literal["auto", "cpu", "cuda", "cpu-stub"] = "auto"
    replicas: int = Field(1, ge=1, le=256)
    tier: Literal["core", "adjacent", "experimental"] | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class Ports(_Strict):
    """Listening ports."""

    http: int = Field(8000, ge=1, le=65535)
    metrics: int | None = Field(None, ge=1, le=65535)
    webrtc_udp: list[int] = Field(default_factory=list)


class Resources(_Strict):
    """What the deployment may use."""

    cpus: float = Field(1.0, gt=0)
    memory_gb: float = Field(1.0, gt=0)
    gpus: int = Field(0, ge=0)


class Warmup(_Strict):
    """Models loaded before the server reports ready."""

    models: list[str] = Field(default_factory=list)
    timeout_s: float = Field(120.0, gt=0)


class Concurrency(_Strict):
    """Admission limits."""

    max_sessions: int = Field(64, ge=1)
    max_running_jobs: int = Field(2, ge=1)
    max_queued_jobs: int = Field(64, ge=1)


class Fallback(_Strict):
    """What to use when a model is unavailable."""

    model: str
    fallback: str


class RuntimeProfile(_Strict):
    """A whole deployment."""

    name: str
    version: str = PROFILE_SCHEMA_VERSION
    services: list[ServiceEntry] = Field(default_factory=list)
    models: list[ModelEntry] = Field(default_factory=list)
    ports: Ports = Field(default_factory=lambda: Ports())
    resources: Resources = Field(default_factory=lambda: Resources())
    warmup: Warmup = Field(default_factory=lambda: Warmup())
    concurrency: Concurrency = Field(default_factory=lambda: Concurrency())
    fallbacks: list[Fallback] = Field(default_factory=list)
    model_tiers: list[TierName] = Field(default_factory=lambda: list(ALL_TIERS))


def validate_profile(
    doc: SourceDocument, known_models: set[str] | None = None
) -> list[SourceError]:
    """Every problem in a profile: schema errors, then cross-references between sections."""
    if not isinstance(doc.data, dict):
        return [doc.error((), "a runtime profile must be a mapping (name, services, models, …)")]
    parsed, errors = doc.validate(RuntimeProfile)
    if errors or parsed is None:
        return errors
    assert isinstance(parsed, RuntimeProfile)
    profile = parsed
    declared = {m.id for m in profile.models}
    seen: dict[str, int] = {}
    for index, model in enumerate(profile.models):
        if model.id in seen:
            errors.append(doc.error(("models", index, "id"), f"model '{model.id}' is listed twice"))
        seen[model.id] = index
        if known_models is not None and model.id not in known_models:
            errors.append(
                doc.error(
                    ("models", index, "id"),
                    f"unknown model '{model.id}'; known: {', '.join(sorted(known_models))}",
                )
            )
    for index, name in enumerate(profile.warmup.models):
        if name not in declared:
            errors.append(
                doc.error(("warmup", "models", index), f"warmup model '{name}' is not in models")
            )
    for index, fb in enumerate(profile.fallbacks):
        for key in ("model", "fallback"):
            value = getattr(fb, key)
            if value not in declared:
                errors.append(
                    doc.error(("fallbacks", index, key), f"{key} '{value}' is not in models")
                )
        if fb.model == fb.fallback:
            errors.append(
                doc.error(("fallbacks", index, "fallback"), "a model cannot fall back to itself")
            )
    ports_in_use: dict[int, str] = {}
    if profile.ports.metrics is not None and profile.ports.metrics == profile.ports.http:
        errors.append(doc.error(("ports", "metrics"), "metrics port equals the http port"))
    for index, service in enumerate(profile.services):
        if service.port is None or service.kind in ("http", "websocket"):
            continue
        if service.port in ports_in_use:
            errors.append(
                doc.error(
                    ("services", index, "port"),
                    f"port {service.port} already used by {ports_in_use[service.port]}",
                )
            )
        ports_in_use[service.port] = service.name
    gpu_models = [i for i, m in enumerate(profile.models) if m.backend == "cuda"]
    if gpu_models and profile.resources.gpus == 0:
        errors.append(
            doc.error(
                ("models", gpu_models[0], "backend"), "backend 'cuda' but resources.gpus is 0"
            )
        )
    return errors
