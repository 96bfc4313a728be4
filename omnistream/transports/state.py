"""The per-app runtime every route reaches through ``app.state.omni``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection

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
    extras: dict[str, Any] = field(default_factory=dict)

    def resolve_model(
        self, model_id: str, task: str | None = None, *, model_path: Any = None
    ) -> ModelSpec:
        """Look a model up with the tier policy applied, the same way on every route.

        With ``model_path`` (a request's ``config.model_path``) the model need not have
        weights configured: the path is checked instead, by :meth:`checkpoint`.

        Raises:
            ModelAccessError: 404 unknown (or not serving ``task``), 403 outside the
                server's allowed tiers, 503 registered but unavailable here.
            CheckpointRefused: ``model_path`` is given and cannot be used.
        """
        spec = self.registry.get(model_id)
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
        if model_path is not None:
            self.engine.checkpoint(model_id, model_path)
            return spec
        reason = spec.unavailable_reason()
        if reason is not None:
            raise ModelAccessError(
                503, "model_unavailable", f"Model '{model_id}' is unavailable: {reason}"
            )
        return spec

    def takes_request_checkpoints(self, model_id: str) -> bool:
        """Whether a request may bring this model's weights (``config.model_path``) here."""
        spec = self.registry.get(model_id)
        engine = self.engine
        return bool(spec and spec.checkpoint_check and engine.checkpoint_roots
                    and engine.max_request_checkpoints > 0)

    def checkpoint(self, model_id: str, model_path: Any) -> str | None:
        """The checked path of a request's ``config.model_path`` (None: the default).

        Raises:
            CheckpointRefused: the model takes no path, or this one cannot be used.
        """
        if model_path is None:
            return None
        return self.engine.checkpoint(model_id, model_path)


def get_state(conn: HTTPConnection) -> AppState:
    """The AppState of the app serving this request or WebSocket."""
    state: AppState = conn.app.state.omni
    return state


__all__ = ["AppState", "ModelAccessError", "ModelUnavailable", "get_state"]
