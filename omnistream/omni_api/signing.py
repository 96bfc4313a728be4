"""Signed, expiring URLs: what lets an upload slot or an output file answer without a key.

A signed URL carries ``expires`` (unix seconds) and ``sig``, an HMAC-SHA256 over the
purpose, the resource's ids and that expiry, keyed by the server's signing secret. A route
behind such a URL recomputes the HMAC and compares it in constant time before it looks
anything up, so changing any part of the URL (another task, another field, a later expiry)
makes it worthless, and a URL stops working at its expiry or when the secret changes.

The secret comes from ``OMNISTREAM_OMNI_SIGNING_SECRET``; without it each process draws a
random one, so URLs handed out die with a restart (and differ between cluster nodes: set
the secret on every node of a cluster).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlencode

Purpose = Literal["upload", "file"]


class SignatureError(Exception):
    """A signed URL that must be refused: ``status`` is 403 (bad) or 410 (expired)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class SignedQuery:
    """The query parameters of a signed URL."""

    expires: int
    sig: str

    def encode(self) -> str:
        """``expires=…&sig=…``."""
        return urlencode({"expires": self.expires, "sig": self.sig})


class UrlSigner:
    """Signs and checks URL parameters with one secret.

    Args:
        secret: the signing key; ``None`` or empty draws a random one (URLs then live
            only as long as this process).
    """

    def __init__(self, secret: str | None) -> None:
        self.ephemeral = not secret
        self._key = (secret or secrets.token_urlsafe(32)).encode("utf-8")

    def _mac(self, purpose: Purpose, parts: tuple[str, ...], expires: int) -> str:
        message = "\n".join((purpose, *parts, str(expires))).encode("utf-8")
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def sign(self, purpose: Purpose, *parts: str, expires: int) -> SignedQuery:
        """The ``expires`` and ``sig`` that make a URL for ``parts`` valid until ``expires``."""
        return SignedQuery(expires, self._mac(purpose, parts, expires))

    def verify(
        self, purpose: Purpose, *parts: str, expires: str | None, sig: str | None,
        now: float | None = None,
    ) -> int:
        """Check a URL's signature, then its expiry; returns the expiry.

        Raises:
            SignatureError: 403 ``invalid_signature`` when the signature is missing or
                does not match (checked first, so an expiry cannot be forged into a 410),
                410 ``url_expired`` when it matched but the time has passed.
        """
        if not expires or not sig or not expires.isdigit() or len(expires) > 12:
            raise SignatureError(403, "invalid_signature", "The URL is not signed (or not fully).")
        when = int(expires)
        expected = self._mac(purpose, parts, when)
        if not hmac.compare_digest(expected.encode("ascii"), sig.encode("utf-8", "replace")):
            raise SignatureError(403, "invalid_signature", "The URL's signature does not match.")
        if (time.time() if now is None else now) >= when:
            raise SignatureError(410, "url_expired", "The URL has expired.")
        return when
