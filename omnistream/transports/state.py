"""The per-app runtime every route reaches through ``app.state.omni``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection

from omnistream.auth import current_principal
from omnistream.auth.service import AuthService
from omnistream.engine.engine import Engine
from omnistream.engine.registry import ModelRegistry, ModelSpec, ModelUnavailable
from omnistream.metrics import Metrics
from omnistream.sessions.avatar import AvatarService
from omnistream.sessions.manager import SessionManager
from omnistream.settings import Settings


class ModelAccessError(Exception):
    """A model a request named cannot be used; ``status`` maps to HTTP, ``code`` to WS."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class AppState:
    """The server's shared runtime: settings, metrics, models, engine and sessions."""

    settings: Settings
    metrics: Metrics
    registry: ModelRegistry
    engine: Engine
    sessions: SessionManager
    avatars: AvatarService
    auth: AuthService
    extras: dict[str, Any] = field(default_factory=dict)

    def resolve_model(self, model_id: str, task: str | None = None) -> ModelSpec:
        """Look a model up with the tier policy applied, the same way on every route.

        Raises:
            ModelAccessError: 404 unknown (or not serving ``task``), 403 outside the
                server's allowed tiers, 503 registered but unavailable here.
        """
        spec = self._allowed(model_id, task)
        reason = spec.unavailable_reason()
        if reason is not None:
            raise ModelAccessError(
                503, "model_unavailable", f"Model '{model_id}' is unavailable: {reason}"
            )
        return spec

    def resolve_checkpoint(
        self, model_id: str, task: str | None, model_path: Any
    ) -> tuple[ModelSpec, str | None]:
        """:meth:`resolve_model` for a request that may name its own weights.

        Returns the spec and the checked path of ``config.model_path`` (None: the
        configured weights). With a path the model need not have weights configured.

        Raises:
            ModelAccessError: as :meth:`resolve_model`.
            CheckpointRefused: ``model_path`` is given and cannot be used.
        """
        if model_path is None:
            return self.resolve_model(model_id, task), None
        spec = self._allowed(model_id, task)
        return spec, self.engine.checkpoint(model_id, model_path)

    def _allowed(self, model_id: str, task: str | None) -> ModelSpec:
        """The spec, if it exists for ``task`` and the tier policy allows it (404/403).

        A model a Runtime Profile degraded resolves to its fallback's spec.
        """
        spec = self.registry.get(self.registry.serving_id(model_id))
        if spec is None or (task is not None and task not in spec.tasks):
            known = ", ".join(s.id for s in self.registry.specs(task)) or "none"
            raise ModelAccessError(
                404, "model_not_found", f"Unknown model '{model_id}'. Available: {known}"
            )
        if not self.registry.allowed(spec):
            allowed = ", ".join(sorted(self.registry.allowed_tiers))
            raise ModelAccessError(
                403,
                "model_tier_forbidden",
                f"Model '{model_id}' is tier '{spec.tier}', not in this server's allowed "
                f"tiers ({allowed}).",
            )
        caller = current_principal()
        if caller.tiers is not None and str(spec.tier) not in caller.tiers:
            raise ModelAccessError(
                403,
                "model_tier_forbidden",
                f"Model '{model_id}' is tier '{spec.tier}'; key '{caller.name}' may use "
                f"tiers {', '.join(sorted(caller.tiers))}.",
            )
        return spec

    def takes_request_checkpoints(self, model_id: str) -> bool:
        """Whether a request may bring this model's weights (``config.model_path``) here."""
        spec = self.registry.get(model_id)
        engine = self.engine
        return bool(spec and spec.checkpoint_check and engine.checkpoint_roots
                    and engine.max_request_checkpoints > 0)


def get_state(conn: HTTPConnection) -> AppState:
    """The AppState of the app serving this request or WebSocket."""
    state: AppState = conn.app.state.omni
    return state


__all__ = ["AppState", "ModelAccessError", "ModelUnavailable", "get_state"]
