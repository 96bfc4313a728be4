"""The node registry: each node publishes its capacity to Redis with a TTL.

A node writes ``P:node:<id>`` (JSON) every second with an expiry of
``cluster_node_ttl_s``, and adds its id to ``P:nodes``; a node that dies simply stops
appearing. ``GET /v1/cluster/nodes`` reads every entry still alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

PUBLISH_INTERVAL_S = 1.0


class NodeRegistry:
    """Publishes this node's entry and reads everyone's.

    Args:
        r: a Redis client (``decode_responses=True``).
        node_id: this node's id.
        describe: builds this node's entry (live sessions, slots, capacity, drain state).
        ttl_s: how long an entry outlives its last publication.
        prefix: key prefix shared by the cluster.
    """

    def __init__(
        self,
        r: aioredis.Redis,
        node_id: str,
        describe: Callable[[], dict[str, Any]],
        *,
        ttl_s: float,
        prefix: str = "omnistream",
    ) -> None:
        self.r = r
        self.node_id = node_id
        self.describe = describe
        self.ttl_ms = max(1000, int(ttl_s * 1000))
        self.prefix = prefix
        self._task: asyncio.Task[None] | None = None

    @property
    def k_nodes(self) -> str:
        return f"{self.prefix}:nodes"

    def k_node(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}"

    async def publish(self) -> None:
        """Write this node's entry now (also called right after a drain starts)."""
        entry = self.describe() | {"node_id": self.node_id, "updated_at": time.time()}
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.k_node(self.node_id), json.dumps(entry), px=self.ttl_ms)
        pipe.sadd(self.k_nodes, self.node_id)
        await pipe.execute()

    def start(self) -> None:
        """Publish every second until :meth:`aclose`."""
        self._task = asyncio.create_task(self._loop(), name="cluster-registry")

    async def _loop(self) -> None:
        while True:
            try:
                await self.publish()
            except (RedisError, OSError) as exc:
                log.debug("publishing node %s failed: %s", self.node_id, exc)
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    async def nodes(self) -> list[dict[str, Any]]:
        """Every node whose entry has not expired, by id."""
        ids = sorted(str(i) for i in await self.r.smembers(self.k_nodes))
        if not ids:
            return []
        values = await self.r.mget([self.k_node(i) for i in ids])
        out: list[dict[str, Any]] = []
        gone: list[str] = []
        for node_id, value in zip(ids, values, strict=True):
            if value is None:
                gone.append(node_id)
                continue
            with contextlib.suppress(ValueError):
                out.append(json.loads(value))
        if gone:
            await self.r.srem(self.k_nodes, *gone)
        return out

    async def node(self, node_id: str) -> dict[str, Any] | None:
        """One node's entry (``None`` when it expired)."""
        value = await self.r.get(self.k_node(node_id))
        if value is None:
            return None
        entry: dict[str, Any] = json.loads(value)
        return entry

    async def aclose(self) -> None:
        """Stop publishing and remove this node's entry (a clean exit)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError):
            pipe = self.r.pipeline(transaction=True)
            pipe.delete(self.k_node(self.node_id))
            pipe.srem(self.k_nodes, self.node_id)
            await pipe.execute()
