"""The scheduler: runners that own resident models and batch work across sessions."""

from omnistream.engine.registry import ModelRegistry, ModelSpec, Tier
from omnistream.engine.runner import ModelRunner, Priority, StaleWork, WorkResult

__all__ = [
    "ModelRegistry",
    "ModelRunner",
    "ModelSpec",
    "Priority",
    "StaleWork",
    "Tier",
    "WorkResult",
]
