"""The Model Capability Manifest, with OmniRT's field names.

One entry per model and task: ``model, task, tier, role, maturity, inputs,
optional_inputs, outputs, config, default_config, streaming, resident, service_adapter,
backends``. Fields of ours ride along as additions (``id``, ``tasks``, ``summary``,
``owned_by``, ``available``, ``reason``, ``routes``, ``capabilities``), which OmniRT's
schema tells clients to accept.
"""

from __future__ import annotations

from typing import Any

from omnistream.engine.devices import cuda_available
from omnistream.engine.registry import ModelSpec
from omnistream.profiles.schema import DEFAULT_ADAPTER, ModelPlan

MANIFEST_SCHEMA_VERSION = "1.0.0"

#: What a model of each task is for in a composition.
ROLES: dict[str, str] = {
    "text2audio": "speech-synthesis",
    "audio2video": "talking-head",
    "audio2text": "speech-recognition",
}

#: Inputs a request must give; the task's other inputs are optional.
REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "text2audio": ("prompt",),
    "audio2video": ("audio",),
    "audio2text": ("audio",),
}

#: Every route that reaches a task's models (an addition to ``service_adapter``).
ROUTES: dict[str, list[str]] = {
    "audio2video": [
        "WS /",
        "WS /v1/audio2video/{model}",
        "WS /v1/avatar/{model}",
        "WS /v1/avatar/realtime",
        "POST /v1/webrtc/offer",
        "POST /v1/generate",
    ],
    "text2audio": [
        "POST /v1/text2audio/stream",
        "POST /v1/text2audio/{model}",
        "WS /v1/text2audio/realtime",
        "POST /v1/audio/speech",
        "POST /v1/generate",
    ],
    "audio2text": ["POST /v1/audio/transcriptions", "POST /v1/generate"],
    "text2image": ["POST /v1/images/generations", "POST /v1/generate"],
    "image2image": ["POST /v1/images/edits", "POST /v1/generate"],
    "inpaint": ["POST /v1/images/edits", "POST /v1/generate"],
    "edit": ["POST /v1/images/edits", "POST /v1/generate"],
    "text2video": ["POST /v1/videos", "POST /v1/videos/generations", "POST /v1/generate"],
    "image2video": ["POST /v1/videos", "POST /v1/videos/generations", "POST /v1/generate"],
}

_AVATAR_CONFIG: dict[str, Any] = {
    "width": {"type": "integer", "even": True},
    "height": {"type": "integer", "even": True},
    "fps": {"type": "integer"},
    "frame_num": {"type": "integer"},
    "slice_len": {"type": "integer"},
    "chunk_samples": {"type": "integer"},
    "motion_frames_num": {"type": "integer"},
}
_AVATAR_DEFAULTS: dict[str, Any] = {
    "width": 416,
    "height": 704,
    "fps": 25,
    "frame_num": 29,
    "slice_len": 28,
    "chunk_samples": 17920,
    "motion_frames_num": 1,
    "sample_rate": 16000,
}


def _config(spec: ModelSpec, task: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config keys a task on this model accepts, and their defaults."""
    caps = spec.capabilities
    if task == "text2audio":
        speed = caps.get("speed", [0.25, 4.0])
        config: dict[str, Any] = {
            "speed": {"type": "number", "range": list(speed)},
            "sample_rate": {"type": "integer"},
            "streaming_mode": {
                "type": "string",
                "values": ["token_window", "sentence"],
                "note": "accepted; this model streams per clause/sentence segment",
            },
            "temperature": {"type": "number", "note": "accepted and reported as ignored"},
        }
        defaults: dict[str, Any] = {
            "speed": 1.0,
            "sample_rate": caps.get("sample_rate"),
            "streaming_mode": "sentence",
            "voice": caps.get("default_voice"),
        }
        return config, defaults
    if task == "audio2video":
        config = dict(_AVATAR_CONFIG)
        if spec.checkpoint_check is not None:
            config["model_path"] = {"type": "string", "note": "under OMNISTREAM_CHECKPOINT_ROOTS"}
        return config, dict(_AVATAR_DEFAULTS)
    if task == "audio2text":
        languages = caps.get("languages", [])
        return (
            {"language": {"type": "string", "values": languages}},
            {"language": languages[0] if languages else None},
        )
    if "config_schema" in caps:  # models that describe their own keys (diffusion)
        return dict(caps["config_schema"]), dict(caps.get("default_config") or {})
    return {}, {}


def _backends(spec: ModelSpec) -> dict[str, str]:
    """Status per backend: ``supported`` here now, ``unavailable`` here, or ``unsupported``."""
    usable = spec.unavailable_reason() is None
    status: dict[str, str] = {}
    for backend in ("cuda", "ascend", "cpu-stub", "cpu"):
        device = "cpu" if backend == "cpu-stub" else backend
        if device not in spec.devices:
            status[backend] = "unsupported"
        elif not usable or (device == "cuda" and not cuda_available()):
            status[backend] = "unavailable"
        else:
            status[backend] = "supported"
    return status


def manifest_entry(spec: ModelSpec, task: str, plan: ModelPlan | None = None) -> dict[str, Any]:
    """The manifest of one model for one task (``plan``: a profile's view of it)."""
    from omnistream.jobs.tasks import TASK_IMPLS

    caps = dict(spec.capabilities)
    impl = TASK_IMPLS.get(task)
    declared = list(impl.inputs) if impl else list(caps.get("inputs", []))
    required = [i for i in declared if i in REQUIRED_INPUTS.get(task, declared[:1])]
    optional = [i for i in declared if i not in required]
    outputs = list(impl.outputs) if impl else list(caps.get("outputs", []))
    config, default_config = _config(spec, task)
    reason = spec.unavailable_reason()
    entry: dict[str, Any] = {
        "model": spec.id,
        "task": task,
        "tier": str(spec.tier),
        "role": ROLES.get(task, task),
        "maturity": spec.maturity,
        "inputs": required,
        "optional_inputs": optional,
        "outputs": outputs,
        "config": config,
        "default_config": default_config,
        "streaming": bool(caps.get("streaming", False)),
        "resident": bool(caps.get("resident", True)),
        "service_adapter": DEFAULT_ADAPTER.get(task, "batch-generate.v1"),
        "backends": _backends(spec),
        # additions of ours
        "id": spec.id,
        "tasks": list(spec.tasks),
        "summary": spec.summary,
        "owned_by": spec.owned_by,
        "available": reason is None,
        "reason": reason or "",
        "routes": list(ROUTES.get(task, ["POST /v1/generate"])),
        "capabilities": caps,
        "schema_version": MANIFEST_SCHEMA_VERSION,
    }
    if plan is not None:
        entry["profile"] = {
            "state": plan.state,
            "served_by": plan.served_by,
            "reason": plan.reason,
            "service": plan.service,
            "port": plan.port,
        }
    return entry


def manifest_of(spec: ModelSpec, plan: ModelPlan | None = None) -> dict[str, Any]:
    """``models ID --manifest``: one object for a one-task model, else a map by task."""
    entries = {task: manifest_entry(spec, task, plan) for task in spec.tasks}
    if len(entries) == 1:
        return next(iter(entries.values()))
    return entries
