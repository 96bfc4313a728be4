"""Model specs and the registry that every route looks models up in.

A spec is cheap metadata plus a factory: nothing is imported or loaded until a runner
needs the model, so a model whose package is missing is listed as unavailable with the
reason instead of breaking start-up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from omnistream.models.base import BatchModel


class Tier(StrEnum):
    """How far a model is supported: ``core`` is what the project stands behind."""

    CORE = "core"
    ADJACENT = "adjacent"
    EXPERIMENTAL = "experimental"


class ModelUnavailable(RuntimeError):
    """The model is registered but cannot be loaded here (missing package or weights)."""


class CheckpointRefused(ValueError):
    """A request's ``config.model_path`` cannot be used; the message says why.

    Routes answer it as a bad configuration (the client can fix it), never as a server
    fault.
    """


@dataclass(frozen=True)
class LoadContext:
    """What a factory gets when the engine loads a model: the device and its options."""

    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelSpec:
    """Everything the engine and the routes know about one model before it is loaded.

    Attributes:
        id: registry id used on every route.
        tasks: generation tasks it serves (``audio2video``, ``text2audio``…).
        tier: support tier; ``serve --model-tier`` filters on it.
        factory: builds one replica of the loaded model.
        summary: one line for model lists.
        capabilities: free-form facts for manifests (voices, sample rate, streaming…).
        replicas: how many copies a CPU runner runs side by side.
        devices: devices the model can run on, best first.
        check: returns ``None`` when the model can load here, else the reason it cannot.
        checkpoint_check: set for models whose weights a request may choose
            (``config.model_path``): given a resolved path, ``None`` when it can be tried,
            else the reason it cannot. ``None`` means the model takes no such path.
        default_checkpoint: the configured checkpoint, which a request naming the same
            file shares instead of loading a second copy.
        owned_by: shown in the OpenAI-shaped model list.
        maturity: ``stable`` / ``beta`` / ``alpha``.
    """

    id: str
    tasks: tuple[str, ...]
    tier: Tier
    factory: Callable[[LoadContext], BatchModel[Any, Any]]
    summary: str = ""
    capabilities: dict[str, Any] = field(default_factory=dict)
    replicas: int = 1
    devices: tuple[str, ...] = ("cpu",)
    check: Callable[[], str | None] = lambda: None
    checkpoint_check: Callable[[str], str | None] | None = None
    default_checkpoint: str | None = None
    owned_by: str = "omnistream"
    maturity: str = "stable"

    def unavailable_reason(self) -> str | None:
        """Why the model cannot load here, or ``None`` when it can."""
        try:
            return self.check()
        except Exception as exc:  # a broken check must not break listing
            return f"availability check failed: {exc}"


class ModelRegistry:
    """Specs by id, with tier filtering applied in one place for every route."""

    def __init__(self, allowed_tiers: Iterable[Tier | str] | None = None) -> None:
        self._specs: dict[str, ModelSpec] = {}
        self.allowed_tiers: frozenset[Tier] = frozenset(
            Tier(t) for t in (allowed_tiers or list(Tier))
        )
        # Set by a Runtime Profile: models that cannot load here and the model serving
        # their requests instead (``degrade_to``), and each model's default backend.
        self._degraded: dict[str, tuple[str, str]] = {}
        self._backends: dict[str, str] = {}

    def register(self, spec: ModelSpec) -> None:
        """Add a spec; ids are unique."""
        if spec.id in self._specs:
            raise ValueError(f"model {spec.id!r} is already registered")
        self._specs[spec.id] = spec

    def get(self, model_id: str) -> ModelSpec | None:
        """The spec for an id, tier policy ignored (use :meth:`allowed` to enforce it)."""
        return self._specs.get(model_id)

    def degrade(self, model_id: str, fallback_id: str, reason: str) -> None:
        """Serve ``model_id``'s requests with ``fallback_id`` (a profile's ``degrade_to``)."""
        if fallback_id not in self._specs:
            raise KeyError(fallback_id)
        self._degraded[model_id] = (fallback_id, reason)

    def degraded(self) -> dict[str, tuple[str, str]]:
        """Degraded model id → (fallback id, why the model itself cannot serve)."""
        return dict(self._degraded)

    def serving_id(self, model_id: str) -> str:
        """The model that actually serves requests for ``model_id`` (itself unless degraded)."""
        entry = self._degraded.get(model_id)
        return entry[0] if entry is not None else model_id

    def set_backend(self, model_id: str, backend: str) -> None:
        """The backend a request's ``auto`` means for this model (a profile's ``backend``)."""
        self._backends[model_id] = backend

    def backend_for(self, model_id: str, backend: str = "auto") -> str:
        """A request's backend, with ``auto`` replaced by the model's configured one."""
        return self._backends.get(model_id, backend) if backend == "auto" else backend

    def allowed(self, spec: ModelSpec) -> bool:
        """Whether the server's tier policy lets clients use this model."""
        return spec.tier in self.allowed_tiers

    def specs(
        self, task: str | None = None, *, include_disallowed: bool = False
    ) -> list[ModelSpec]:
        """Specs in registration order, optionally for one task, tier policy applied."""
        return [
            s
            for s in self._specs.values()
            if (task is None or task in s.tasks) and (include_disallowed or self.allowed(s))
        ]
