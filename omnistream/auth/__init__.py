"""API keys, scopes and per-key quotas, consulted at the edge by every transport.

Sessions and the engine never see a key: a transport asks :func:`principal_of` who is
calling and passes on only the principal's :attr:`Principal.owner` (a stable, non-secret
id) to mark what that caller creates (jobs, files, tasks, sessions).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from omnistream.auth.policy import SCOPES, rule_for


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's name, scopes and limits; never the key itself.

    Attributes:
        name: the key's ``name`` from the key file (what logs and metrics show).
        owner: the ownership id stored on jobs, files and tasks (``key:<name>``, or
            ``anonymous`` when keys are off).
        scopes: scopes this key holds; ``admin`` implies every scope.
        tiers: model tiers this key may use (None: whatever the server allows).
        max_sessions / requests_per_minute / max_queued_jobs: per-key quotas (None: only
            the server's own limits apply).
    """

    name: str
    owner: str
    scopes: frozenset[str] = field(default_factory=lambda: frozenset(SCOPES))
    tiers: frozenset[str] | None = None
    max_sessions: int | None = None
    requests_per_minute: float | None = None
    max_queued_jobs: int | None = None

    @property
    def is_admin(self) -> bool:
        """An admin key sees every owner's jobs, files and tasks."""
        return "admin" in self.scopes

    def has_scope(self, scope: str) -> bool:
        """Whether this principal may call routes that need ``scope``."""
        return self.is_admin or scope in self.scopes

    def may_see(self, owner: str | None) -> bool:
        """Whether a resource owned by ``owner`` is visible to this principal."""
        return self.is_admin or owner is None or owner == self.owner


ANONYMOUS = Principal(name="anonymous", owner="anonymous")

#: The caller of a key-less request to a public or signed path while keys are on: it
#: holds no scope, so nothing that needs one (or admin) is granted to it.
PUBLIC = Principal(name="public", owner="public", scopes=frozenset())


#: The caller whose request this task serves. The edge middleware sets it; tasks a
#: request starts (an offline job) inherit it, so a model lookup deep in a job still
#: applies the key's tier policy without every call site passing the key along.
_CURRENT: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "omnistream_principal", default=ANONYMOUS
)

PRINCIPAL_SCOPE_KEY = "omnistream.principal"


def principal_of(conn: HTTPConnection) -> Principal:
    """The caller of this request or WebSocket (``ANONYMOUS`` when keys are off)."""
    principal = conn.scope.get(PRINCIPAL_SCOPE_KEY)
    return principal if isinstance(principal, Principal) else ANONYMOUS


def current_principal() -> Principal:
    """The caller of the request this task serves (``ANONYMOUS`` outside one)."""
    return _CURRENT.get()


def bind_principal(principal: Principal) -> contextvars.Token[Principal]:
    """Make ``principal`` the current caller for this task and what it starts."""
    return _CURRENT.set(principal)


__all__ = [
    "ANONYMOUS",
    "PUBLIC",
    "Principal",
    "bind_principal",
    "current_principal",
    "principal_of",
    "rule_for",
]
