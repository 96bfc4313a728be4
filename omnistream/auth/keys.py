"""The API key file: who may call, with which scopes and limits.

Two formats, told apart by content:

* one key per line (OmniRT's ``--api-key-file``): every key gets every scope;
* YAML, a list of keys (or ``keys:`` holding that list), each with ``name`` and the key
  itself (``key``) or its hex ``sha256``, plus optional ``scopes``, ``tiers``,
  ``max_sessions``, ``requests_per_minute`` and ``max_queued_jobs``.

Only SHA-256 digests are kept in memory. A presented key is hashed and compared against
every digest with :func:`hmac.compare_digest`, so neither a match nor its position leaks
through timing.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from omnistream.auth import Principal
from omnistream.auth.policy import SCOPES

TIERS: tuple[str, ...] = ("core", "adjacent", "experimental")
_ENTRY_FIELDS = frozenset(
    {"name", "key", "sha256", "scopes", "tiers", "max_sessions", "requests_per_minute",
     "max_queued_jobs"}
)


class KeyFileError(ValueError):
    """The key file cannot be used; the message names the entry and the problem."""


def digest(key: str) -> bytes:
    """SHA-256 of a key: what the store keeps and compares."""
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class KeyEntry:
    """One key's digest and the principal it stands for."""

    digest: bytes
    principal: Principal


def _positive(value: Any, field: str, where: str, *, integer: bool) -> Any:
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise KeyFileError(f"{where}: '{field}' must be a positive number, got {value!r}")
    return value


def _names(value: Any, field: str, allowed: tuple[str, ...], where: str) -> frozenset[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise KeyFileError(f"{where}: '{field}' must be a list of strings")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise KeyFileError(
            f"{where}: unknown {field} {', '.join(unknown)} (known: {', '.join(allowed)})"
        )
    return frozenset(value)


def _entry(raw: Any, index: int) -> KeyEntry:
    where = f"key #{index + 1}"
    if not isinstance(raw, dict):
        raise KeyFileError(f"{where}: expected a mapping with 'name' and 'key' or 'sha256'")
    unknown = sorted(set(raw) - _ENTRY_FIELDS)
    if unknown:
        raise KeyFileError(f"{where}: unknown field(s) {', '.join(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise KeyFileError(f"{where}: 'name' is required (it is what logs and metrics show)")
    where = f"key '{name}'"
    key, sha = raw.get("key"), raw.get("sha256")
    if (key is None) == (sha is None):
        raise KeyFileError(f"{where}: give exactly one of 'key' or 'sha256'")
    if key is not None:
        if not isinstance(key, str) or len(key) < 8:
            raise KeyFileError(f"{where}: 'key' must be a string of at least 8 characters")
        key_digest = digest(key)
    else:
        try:
            key_digest = bytes.fromhex(str(sha))
        except ValueError:
            key_digest = b""
        if len(key_digest) != 32:
            raise KeyFileError(f"{where}: 'sha256' must be 64 hex digits")
    scopes = _names(raw.get("scopes", list(SCOPES)), "scopes", SCOPES, where)
    tiers = raw.get("tiers")
    principal = Principal(
        name=name,
        owner=f"key:{name}",
        scopes=scopes,
        tiers=None if tiers is None else _names(tiers, "tiers", TIERS, where),
        max_sessions=_positive(raw.get("max_sessions"), "max_sessions", where, integer=True),
        requests_per_minute=_positive(
            raw.get("requests_per_minute"), "requests_per_minute", where, integer=False
        ),
        max_queued_jobs=_positive(
            raw.get("max_queued_jobs"), "max_queued_jobs", where, integer=True
        ),
    )
    return KeyEntry(key_digest, principal)


def parse_key_file(text: str) -> list[KeyEntry]:
    """Parse a key file's text (either format).

    Raises:
        KeyFileError: an entry is malformed, a name repeats, or the file holds no key.
    """
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        loaded = None
    if isinstance(loaded, dict) and "keys" in loaded:
        loaded = loaded["keys"]
    if isinstance(loaded, list) and any(isinstance(item, dict) for item in loaded):
        entries = [_entry(raw, i) for i, raw in enumerate(loaded)]
    else:
        lines = [ln.strip() for ln in text.splitlines()]
        keys = [ln for ln in lines if ln and not ln.startswith("#")]
        entries = [
            KeyEntry(digest(k), Principal(name=f"key-{i + 1}", owner=f"key:key-{i + 1}"))
            for i, k in enumerate(keys)
        ]
    if not entries:
        raise KeyFileError("the key file holds no key")
    seen: set[str] = set()
    for entry in entries:
        if entry.principal.name in seen:
            raise KeyFileError(f"key name '{entry.principal.name}' appears twice")
        seen.add(entry.principal.name)
    return entries


class KeyStore:
    """The keys in force, reloadable from their file without dropping anything live."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._entries: list[KeyEntry] = []
        self.reload()

    def reload(self) -> int:
        """Read the file again; on any error the keys in force stay as they were.

        Returns:
            How many keys are now in force.

        Raises:
            KeyFileError: the file is unreadable or malformed (nothing changed).
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {self.path}: {exc.strerror}") from exc
        self._entries = parse_key_file(text)
        return len(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str) -> Principal | None:
        """The principal for ``key``, comparing against every entry in constant time."""
        presented = digest(key)
        found: Principal | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, presented):
                found = entry.principal
        return found
