"""Short-lived client secrets for browsers (OpenAI Realtime's ``client_secrets`` shape).

A browser cannot set headers on a WebSocket and must not hold a real key, so a backend
that has one mints a secret here and hands it to the page. The secret is random, kept
only as a digest, expires after ``ttl_s``, and carries a subset of its minting key's
scopes (the realtime surfaces), never ``admin``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from omnistream.auth import Principal
from omnistream.auth.keys import digest

SECRET_PREFIX = "ek_"
#: What a browser page may do with a client secret: talk to the realtime surfaces.
CLIENT_SECRET_SCOPES = frozenset({"realtime"})


@dataclass(frozen=True)
class _Minted:
    principal: Principal
    expires_at: float


class ClientSecrets:
    """Minted secrets by digest, bounded in number, expired lazily."""

    def __init__(self, max_live: int = 10000, clock: Callable[[], float] = time.time) -> None:
        self.max_live = max_live
        self._clock = clock
        self._live: dict[bytes, _Minted] = {}

    def mint(self, principal: Principal, ttl_s: float) -> tuple[str, float]:
        """A new secret for ``principal``; returns the secret and its expiry (epoch s)."""
        self._purge()
        if len(self._live) >= self.max_live:
            # Drop the one closest to expiry: the store never grows past its bound.
            oldest = min(self._live, key=lambda d: self._live[d].expires_at)
            del self._live[oldest]
        value = SECRET_PREFIX + secrets.token_urlsafe(32)
        expires_at = self._clock() + ttl_s
        scoped = replace(
            principal,
            scopes=frozenset(s for s in principal.scopes if s in CLIENT_SECRET_SCOPES)
            or (CLIENT_SECRET_SCOPES if principal.is_admin else frozenset()),
        )
        self._live[digest(value)] = _Minted(scoped, expires_at)
        return value, expires_at

    def lookup(self, value: str) -> Principal | None:
        """The principal a live secret stands for (None: unknown or expired)."""
        if not value.startswith(SECRET_PREFIX):
            return None
        # A dict lookup by SHA-256 digest: its timing depends on the digest, which a
        # caller cannot steer towards a live secret, so it leaks nothing usable.
        key_digest = digest(value)
        minted = self._live.get(key_digest)
        if minted is None:
            return None
        if minted.expires_at <= self._clock():
            del self._live[key_digest]
            return None
        return minted.principal

    def _purge(self) -> None:
        now = self._clock()
        for key_digest in [d for d, m in self._live.items() if m.expires_at <= now]:
            del self._live[key_digest]
