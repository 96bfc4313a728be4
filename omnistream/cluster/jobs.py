"""The job backend on Redis: a queue every node reads, state and events every node sees.

Layout (``P`` is the key prefix, ``omnistream`` by default):

* ``P:q:interactive`` and ``P:q:batch`` — one stream per priority class (sync calls that a
  client waits on, then async jobs), each entry ``{job: <id>}``, read by the consumer
  group ``workers``; the consumer name is the node id;
* ``P:job:<id>`` — the job's hash: the full request (inputs included), the record's
  fields, ``attempt``, ``node``, and ``lease`` (a token naming the run that owns it now);
* ``P:job:<id>:ev`` — its events, one stream entry ``{seq, ev}`` each, in order;
* ``P:job:<id>:up`` — uploaded files of the request until the job ends;
* ``P:jobs`` — the index of jobs (score: enqueue time), ``P:file:<id>`` — which node
  wrote an artifact;
* ``P:events`` (pub/sub) — "job <id> has new events"; ``P:cancel`` — "stop job <id>".

A node claims entries only while it has free job slots (``XREADGROUP COUNT`` = free
slots), renews the claim while the job runs (``XCLAIM … JUSTID``), and acknowledges at the
end. Every node sweeps entries idle past the lease (``XAUTOCLAIM``), so a job whose node
died or hangs runs again elsewhere: the hash's ``attempt`` counts starts, and past
``cluster_max_deliveries`` the job fails with a reason instead of looping. Every write of
a run is fenced by its lease token (one Lua script checks it and writes), so a node that
comes back after losing its job cannot append to a log another node now writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.responses import Response

from omnistream.jobs.errors import GenerateError
from omnistream.jobs.inputs import Upload
from omnistream.jobs.schemas import (
    TERMINAL_EVENTS,
    GenerateRequest,
    GenerateResult,
    JobError,
    JobEvent,
    Span,
)
from omnistream.jobs.store import Job, now_ms

if TYPE_CHECKING:
    from omnistream.engine.registry import ModelSpec
    from omnistream.jobs.service import JobService
    from omnistream.jobs.tasks import Prepared

log = logging.getLogger(__name__)

GROUP = "workers"
CLASSES: tuple[str, ...] = ("interactive", "batch")
"""Priority classes, read in this order: sync calls (a client waits) before async jobs."""
BLOCK_MS = 1000
MIRROR_POLL_S = 1.0
WRITE_RETRY_S = 0.5
CANCEL_WAIT_S = 2.0
RETRY_AFTER_REDIS_S = 1.0
HEALTH_CHECK_S = 2.0
MAX_SWEEP_CALLS = 50
#: Hash fields a job listing reads (not the request's inputs, which may be megabytes).
LIST_FIELDS: list[str] = [
    "id", "trace_id", "model", "task", "mode", "state", "node", "owner", "enqueued_at_ms",
    "started_at_ms", "finished_at_ms", "error", "result", "spans", "request_summary",
]  # fmt: skip
CONNECT_TIMEOUT_S = 3.0

# -- Lua: every transition that must be atomic across nodes ------------------------------

# KEYS: job hash. ARGV: node id, lease token.
# A start bumps the attempt and takes the lease; it returns what the previous run was.
_START = """
local h = KEYS[1]
local state = redis.call('HGET', h, 'state')
if not state then return {'missing', '0', ''} end
if state ~= 'queued' and state ~= 'running' then return {'terminal', '0', state} end
local attempt = tonumber(redis.call('HGET', h, 'attempt') or '0') + 1
local prev = redis.call('HGET', h, 'node') or ''
redis.call('HSET', h, 'state', 'running', 'attempt', attempt, 'node', ARGV[1], 'lease', ARGV[2])
local status = 'ok'
if redis.call('HGET', h, 'cancel') == '1' then status = 'cancel' end
return {status, tostring(attempt), prev}
"""

# KEYS: job hash, events stream. ARGV: lease, channel, job id, n events, (seq, json)*n,
# n fields, (name, value)*n. Appends events and updates the record only for the lease
# holder, then tells every node the job moved.
_WRITE = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
local n = tonumber(ARGV[4])
local i = 5
for _ = 1, n do
  redis.call('XADD', KEYS[2], '*', 'seq', ARGV[i], 'ev', ARGV[i + 1])
  i = i + 2
end
local m = tonumber(ARGV[i])
i = i + 1
for _ = 1, m do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""

# KEYS: job hash, events, uploads, queue stream. ARGV: lease, group, entry id, ttl s.
_FINISH = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'lease')
redis.call('XACK', KEYS[4], ARGV[2], ARGV[3])
redis.call('DEL', KEYS[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""

# KEYS: job hash, queue stream. ARGV: lease, group, entry id, job id.
# Hands a job back to the queue (drain): a fresh entry, the old one acknowledged.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued')
redis.call('HDEL', KEYS[1], 'lease')
redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
redis.call('XADD', KEYS[2], '*', 'job', ARGV[4])
return 1
"""

# KEYS: job hash, events. ARGV: now ms, message, job id, ttl s, events channel,
# cancel channel.
# A queued job is cancelled right here; a running one is flagged (its node is told).
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'queued' then
  local seq = redis.call('XLEN', KEYS[2])
  local ev = cjson.encode({event = 'job_cancelled', job_id = ARGV[3], seq = seq,
    timestamp_ms = tonumber(ARGV[1]), stage = cjson.null, data = {message = ARGV[2]}})
  redis.call('XADD', KEYS[2], '*', 'seq', seq, 'ev', ev)
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at_ms', ARGV[1],
    'error', cjson.encode({code = 'job_cancelled', message = ARGV[2]}))
  redis.call('HDEL', KEYS[1], 'lease')
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  redis.call('PUBLISH', ARGV[5], ARGV[3])
  return 'cancelled'
end
if state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  redis.call('PUBLISH', ARGV[6], ARGV[3])
  return 'running'
end
return 'finished:' .. state
"""

# KEYS: queue stream, then one job hash per entry. ARGV: group, node, then per entry
# (entry id, lease or ''). Renews the claims this node still holds; returns lost ids.
_HEARTBEAT = """
local lost = {}
local keep = {}
for i = 2, #KEYS do
  local id = ARGV[1 + (i - 1) * 2]
  local lease = ARGV[2 + (i - 1) * 2]
  if lease == '' or redis.call('HGET', KEYS[i], 'lease') == lease then
    table.insert(keep, id)
  else
    table.insert(lost, id)
  end
end
if #keep > 0 then
  local call = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], '0'}
  for _, id in ipairs(keep) do table.insert(call, id) end
  table.insert(call, 'JUSTID')
  redis.call(unpack(call))
end
return lost
"""


class ClusterUnavailable(RuntimeError):
    """Redis cannot be reached (at start-up this stops the node with a clear message)."""


@dataclass
class Claim:
    """A queue entry this node holds: waiting for a slot, or running."""

    stream: str
    cls: str
    entry_id: str
    job_id: str
    lease: str = ""
    job: Job | None = None
    task: asyncio.Task[None] | None = None
    released: bool = False
    lost: bool = False


@dataclass
class ClusterCounters:
    """What the backend counts for Prometheus (read by the node's collector)."""

    reclaims: int = 0
    released: int = 0
    redis_errors: int = 0
    failed_deliveries: int = 0
    queue: dict[str, dict[str, int]] = field(default_factory=dict)


def connect(url: str, *, decode_responses: bool) -> aioredis.Redis:
    """A client that survives a Redis restart: idle connections are checked before use
    and a command that meets a dropped connection is retried on a fresh one."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=decode_responses,
        health_check_interval=HEALTH_CHECK_S,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_connect_timeout=CONNECT_TIMEOUT_S,
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class _Writer:
    """Writes one run's events and record to Redis in order, fenced by its lease."""

    def __init__(self, backend: RedisJobBackend, job: Job, lease: str) -> None:
        self.backend = backend
        self.job = job
        self.lease = lease
        self.pending: list[JobEvent] = []
        self.task: asyncio.Task[None] | None = None
        self.fenced = False

    def push(self, event: JobEvent) -> None:
        self.pending.append(event)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._drain(), name=f"write-{self.job.id}")

    async def flush(self) -> None:
        while self.task is not None and not self.task.done():
            await asyncio.shield(self.task)
        if self.pending and not self.fenced:
            self.task = asyncio.create_task(self._drain())
            await self.task

    async def _drain(self) -> None:
        while self.pending and not self.fenced:
            batch = list(self.pending)
            try:
                ok = await self.backend.write(self.job, self.lease, batch)
            except RedisError as exc:
                self.backend.counters.redis_errors += 1
                log.warning("job %s: writing events failed (%s); retrying", self.job.id, exc)
                await asyncio.sleep(WRITE_RETRY_S)
                continue
            del self.pending[: len(batch)]
            if not ok:
                # Another node holds the job now (this one hung past its lease): stop.
                self.fenced = True
                self.pending.clear()
                log.warning("job %s: lease lost to another node; stopping here", self.job.id)
                self.job.request_cancel()


class RedisJobBackend:
    """Jobs on Redis for one node (see the module docstring for the layout).

    Args:
        service: this node's job service (it prepares inputs and runs tasks).
        url: the Redis URL.
        node_id: this node's id (consumer name, ``node`` of its jobs, RunReport worker).
        prefix: key prefix shared by every node of one cluster.
    """

    def __init__(
        self, service: JobService, url: str, node_id: str, *, prefix: str = "omnistream"
    ) -> None:
        settings = service.state.settings
        self.service = service
        self.node_id = node_id
        self.prefix = prefix
        self.url = url
        self.r: aioredis.Redis = connect(url, decode_responses=True)
        self.rb: aioredis.Redis = connect(url, decode_responses=False)
        self.slots = settings.max_running_jobs
        self.lease_ms = int(settings.cluster_lease_s * 1000)
        self.max_deliveries = settings.cluster_max_deliveries
        self.ttl_s = int(max(1.0, settings.job_ttl_s))
        self.max_jobs = settings.max_jobs
        self.counters = ClusterCounters()
        self.draining = False
        self.file_fetcher: Callable[[str, str | None], Awaitable[Response | None]] | None = None
        self._claims: dict[str, Claim] = {}
        self._running_sem = asyncio.Semaphore(self.slots)
        self._slot_freed = asyncio.Event()
        self._mirrors: OrderedDict[str, Job] = OrderedDict()
        self._mirror_last: dict[str, str] = {}
        self._mirror_locks: dict[str, asyncio.Lock] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._refreshing: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._start = self.r.register_script(_START)
        self._write = self.r.register_script(_WRITE)
        self._finish = self.r.register_script(_FINISH)
        self._release = self.r.register_script(_RELEASE)
        self._cancel = self.r.register_script(_CANCEL)
        self._heartbeat = self.r.register_script(_HEARTBEAT)

    # -- keys ------------------------------------------------------------------------

    def k_queue(self, cls: str) -> str:
        return f"{self.prefix}:q:{cls}"

    def k_job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def k_events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:ev"

    def k_uploads(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:up"

    def k_file(self, file_id: str) -> str:
        return f"{self.prefix}:file:{file_id}"

    @property
    def k_index(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def ch_events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def ch_cancel(self) -> str:
        return f"{self.prefix}:cancel"

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Check Redis answers and create the consumer group; start the node's loops.

        Raises:
            ClusterUnavailable: Redis cannot be reached or refuses the commands.
        """
        try:
            await self.r.ping()
            for cls in CLASSES:
                try:
                    await self.r.xgroup_create(self.k_queue(cls), GROUP, id="0", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
        except (RedisError, OSError) as exc:
            raise ClusterUnavailable(f"Redis at {self.url} is not reachable: {exc}") from exc
        for coro, name in (
            (self._work_loop(), "cluster-work"),
            (self._sweep_loop(), "cluster-sweep"),
            (self._heartbeat_loop(), "cluster-heartbeat"),
            (self._pubsub_loop(), "cluster-pubsub"),
            (self._mirror_poll_loop(), "cluster-mirrors"),
        ):
            self._tasks.append(asyncio.create_task(coro, name=name))

    async def aclose(self) -> None:
        """Stop the loops; jobs still running here are released to the queue."""
        self._stopping = True
        await self.release_all(running_too=True)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.r.aclose()
        with contextlib.suppress(Exception):
            await self.rb.aclose()

    @property
    def running(self) -> int:
        """Jobs this node holds (running or about to)."""
        return len(self._claims)

    @property
    def free_slots(self) -> int:
        """Job slots this node could fill now (0 while draining)."""
        return 0 if self.draining else max(0, self.slots - len(self._claims))

    # -- the JobBackend interface -------------------------------------------------

    async def start(
        self,
        job: Job,
        spec: ModelSpec,
        prepared: Prepared,
        inputs_ms: float,
        uploads: dict[str, Upload],
    ) -> None:
        """Persist the job and queue it for whichever node has room (maybe this one).

        The job object stays here as a mirror: it follows the job's events in Redis.
        """
        cls = CLASSES[0] if job.mode == "sync" else CLASSES[1]
        fields = self._record_fields(job)
        fields.update(
            request=job.request.model_dump_json(),
            # What listings show (long inputs summarised): GET /v1/jobs never reads inputs.
            request_summary=_dumps(job.record(with_events=False).request),
            task=job.request.task,
            mode=job.mode,
            cls=cls,
            attempt="0",
            owner=job.owner or "",
        )
        try:
            pipe = self.rb.pipeline(transaction=True)
            pipe.hset(self.k_job(job.id), mapping=fields)  # type: ignore[arg-type]
            for event in job.events:
                pipe.xadd(self.k_events(job.id), {"seq": event.seq, "ev": event.model_dump_json()})
            if uploads:
                mapping: dict[str, bytes | str] = {}
                for name, upload in uploads.items():
                    mapping[f"data:{name}"] = upload.data
                    mapping[f"meta:{name}"] = _dumps(
                        {"filename": upload.filename, "content_type": upload.content_type}
                    )
                pipe.hset(self.k_uploads(job.id), mapping=mapping)  # type: ignore[arg-type]
                pipe.expire(self.k_uploads(job.id), self.ttl_s)
            pipe.zadd(self.k_index, {job.id: job.enqueued_at_ms})
            pipe.xadd(self.k_queue(cls), {"job": job.id})
            results = await pipe.execute()
        except RedisError as exc:
            self.counters.redis_errors += 1
            job.finish("failed", error=JobError(code="cluster_unavailable", message=str(exc)))
            raise GenerateError(
                503,
                "cluster_unavailable",
                f"The job queue (Redis) is not reachable: {exc}. Retry later.",
            ) from exc
        last_event_id = results[len(job.events)] if job.events else "0-0"
        if isinstance(last_event_id, bytes):
            last_event_id = last_event_id.decode()
        self._remember(job, str(last_event_id))

    async def find(self, job_id: str) -> Job | None:
        """The job's mirror on this node, loaded from Redis on first use."""
        mirror = self._mirrors.get(job_id)
        if mirror is not None:
            self._mirrors.move_to_end(job_id)
            return mirror
        if not job_id.startswith("job_") or len(job_id) > 64:
            return None
        try:
            loaded = await self._load(job_id, with_events=True)
        except RedisError as exc:
            self.counters.redis_errors += 1
            raise GenerateError(
                503, "cluster_unavailable", f"Job state (Redis) is not reachable: {exc}"
            ) from exc
        if loaded is None:
            return None
        job, last = loaded
        existing = self._mirrors.get(job_id)
        if existing is not None:  # loaded twice at once: keep the first
            return existing
        self._remember(job, last)
        return job

    async def list_jobs(self) -> list[Job]:
        """Jobs in the cluster index, oldest first (records without events)."""
        try:
            ids = await self.r.zrevrange(self.k_index, 0, self.max_jobs - 1)
            pipe = self.r.pipeline(transaction=False)
            for job_id in ids:
                pipe.hmget(self.k_job(str(job_id)), LIST_FIELDS)
            replies = await pipe.execute()
            rows = [
                {k: v for k, v in zip(LIST_FIELDS, values, strict=True) if v is not None}
                for values in replies
            ]
        except RedisError as exc:
            self.counters.redis_errors += 1
            raise GenerateError(
                503, "cluster_unavailable", f"Job state (Redis) is not reachable: {exc}"
            ) from exc
        jobs: list[Job] = []
        gone: list[str] = []
        for job_id, row in zip([str(i) for i in ids], rows, strict=True):
            if not row:
                gone.append(job_id)
                continue
            jobs.append(self._restore(job_id, row, []))
        if gone:
            with contextlib.suppress(RedisError):
                await self.r.zrem(self.k_index, *gone)
        jobs.reverse()
        return jobs

    async def cancel(self, job: Job) -> Job:
        """Cancel wherever the job is: queued ones at once, running ones via their node.

        Returns once the job stopped, or after a short wait with the job still stopping
        (the route answers 202 then).
        """
        try:
            outcome = await self._cancel(
                keys=[self.k_job(job.id), self.k_events(job.id)],
                args=[
                    now_ms(),
                    "cancelled by request",
                    job.id,
                    self.ttl_s,
                    self.ch_events,
                    self.ch_cancel,
                ],
            )
        except RedisError as exc:
            self.counters.redis_errors += 1
            raise GenerateError(
                503, "cluster_unavailable", f"Job state (Redis) is not reachable: {exc}"
            ) from exc
        for claim in self._claims.values():  # running here: no need to wait for pub/sub
            if claim.job_id == job.id and claim.job is not None:
                claim.job.request_cancel()
        if outcome == "missing":
            raise GenerateError(404, "job_not_found", f"No job with id '{job.id}'.")
        if str(outcome).startswith("finished:"):
            outcome = str(outcome).split(":", 1)[1]
            await self._refresh(job)
            raise GenerateError(
                409,
                "job_finished",
                f"Job {job.id} already finished ({outcome}); nothing to cancel.",
            )
        await self._refresh(job)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(job.done.wait()), CANCEL_WAIT_S)
        return job

    async def file_response(self, file_id: str, owner: str | None = None) -> Response | None:
        """An artifact another node wrote, streamed from it (see :mod:`.files`)."""
        if self.file_fetcher is None:
            return None
        return await self.file_fetcher(file_id, owner)

    async def file_node(self, file_id: str) -> str | None:
        """The node that wrote an artifact (``None`` when unknown or expired)."""
        value = await self.r.get(self.k_file(file_id))
        return None if value is None else str(value)

    # -- records ---------------------------------------------------------------------

    @staticmethod
    def _record_fields(job: Job) -> dict[str, str]:
        """The record's changing fields as the hash stores them."""
        fields = {
            "id": job.id,
            "trace_id": job.trace_id,
            "model": job.model,
            "state": job.state,
            "enqueued_at_ms": repr(job.enqueued_at_ms),
            "started_at_ms": "" if job.started_at_ms is None else repr(job.started_at_ms),
            "finished_at_ms": "" if job.finished_at_ms is None else repr(job.finished_at_ms),
            "error": "" if job.error is None else job.error.model_dump_json(),
            "result": "" if job.result is None else job.result.model_dump_json(),
            "spans": _dumps([s.model_dump(mode="json") for s in job.spans]),
        }
        if job.node:
            fields["node"] = job.node
        return fields

    def _restore(self, job_id: str, row: dict[str, str], events: list[JobEvent]) -> Job:
        """A Job object from its hash (and events): a mirror, or the run's starting point."""
        try:
            if "request" in row:
                request = GenerateRequest.model_validate_json(row["request"])
            else:
                request = GenerateRequest.model_validate_json(row.get("request_summary", ""))
        except ValidationError:
            request = GenerateRequest.model_construct(
                task=row.get("task", "text2audio"), model=row.get("model"), inputs={}, config={}
            )
        job = Job(request, row.get("model", ""), mode=row.get("mode", "async"))
        job.id = job_id
        job.trace_id = row.get("trace_id", job.trace_id)
        job.owner = row.get("owner") or job.owner
        job.enqueued_at_ms = float(row.get("enqueued_at_ms") or now_ms())
        self._apply(job, row)
        for event in events:
            job.append(event)
        if job.terminal:
            job.done.set()
        return job

    @staticmethod
    def _apply(job: Job, row: dict[str, str]) -> None:
        """Copy the hash's changing fields onto a Job object."""
        state = row.get("state")
        if state in ("queued", "running", "succeeded", "failed", "cancelled"):
            job.state = state  # type: ignore[assignment]
        job.node = row.get("node") or job.node
        if row.get("started_at_ms"):
            job.started_at_ms = float(row["started_at_ms"])
        if row.get("finished_at_ms"):
            job.finished_at_ms = float(row["finished_at_ms"])
        if row.get("error"):
            job.error = JobError.model_validate_json(row["error"])
        if row.get("result"):
            job.result = GenerateResult.model_validate_json(row["result"])
        if row.get("spans"):
            job.spans = [Span.model_validate(s) for s in json.loads(row["spans"])]

    async def _load(self, job_id: str, *, with_events: bool) -> tuple[Job, str] | None:
        """The job and the id of its last event in Redis, or ``None``."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(self.k_job(job_id))
        pipe.xrange(self.k_events(job_id))
        row, entries = await pipe.execute()
        if not row:
            return None
        events = [JobEvent.model_validate_json(fields["ev"]) for _, fields in entries]
        last = entries[-1][0] if entries else "0-0"
        return self._restore(job_id, row, events if with_events else []), last

    # -- mirrors: jobs other nodes run, followed through Redis ---------------------

    def _remember(self, job: Job, last_event_id: str) -> None:
        self._mirrors[job.id] = job
        self._mirror_last[job.id] = last_event_id
        while len(self._mirrors) > self.max_jobs:
            victim = next((j for j in self._mirrors.values() if j.terminal), None)
            if victim is None:
                break
            self._forget(victim.id)

    def _forget(self, job_id: str) -> None:
        self._mirrors.pop(job_id, None)
        self._mirror_last.pop(job_id, None)
        self._mirror_locks.pop(job_id, None)

    async def _refresh(self, job: Job) -> None:
        """Bring a mirror up to date: new events in order, the record before a terminal one."""
        if job.id not in self._mirrors or self._mirrors[job.id] is not job:
            return
        lock = self._mirror_locks.setdefault(job.id, asyncio.Lock())
        async with lock:
            if job.done.is_set():
                return
            last = self._mirror_last.get(job.id, "0-0")
            pipe = self.r.pipeline(transaction=True)
            pipe.xrange(self.k_events(job.id), min=f"({last}" if last != "0-0" else "-")
            pipe.hgetall(self.k_job(job.id))
            entries, row = await pipe.execute()
            if row:
                self._apply(job, row)
            seen = len(job.events)
            for entry_id, fields in entries:
                event = JobEvent.model_validate_json(fields["ev"])
                self._mirror_last[job.id] = entry_id
                if event.seq < seen:
                    continue  # already have it (the submitting node's own job_enqueued)
                seen = event.seq + 1
                job.append(event)
            if not row and not job.terminal:  # expired under us
                job.finish("failed", error=JobError(code="job_expired", message="expired"))
                job.done.set()

    async def _pubsub_loop(self) -> None:
        """Follow ``events`` (refresh mirrors) and ``cancel`` (stop runs here)."""
        while not self._stopping:
            pubsub = self.r.pubsub()
            try:
                await pubsub.subscribe(self.ch_events, self.ch_cancel)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
                    if message is None:
                        continue
                    job_id = str(message.get("data", ""))
                    if message.get("channel") == self.ch_cancel:
                        self._cancel_here(job_id)
                    else:
                        mirror = self._mirrors.get(job_id)
                        if mirror is not None and not mirror.done.is_set():
                            task = asyncio.create_task(self._refresh_quietly(mirror))
                            self._refreshing.add(task)
                            task.add_done_callback(self._refreshing.discard)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.counters.redis_errors += 1
                log.warning("cluster pub/sub lost (%s); resubscribing", exc)
                await asyncio.sleep(RETRY_AFTER_REDIS_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _refresh_quietly(self, job: Job) -> None:
        try:
            await self._refresh(job)
        except RedisError as exc:
            self.counters.redis_errors += 1
            log.debug("refreshing job %s failed: %s", job.id, exc)

    async def _mirror_poll_loop(self) -> None:
        """Catch up mirrors whose notification was missed (pub/sub is fire-and-forget)."""
        while True:
            await asyncio.sleep(MIRROR_POLL_S)
            for job in [j for j in self._mirrors.values() if not j.done.is_set()]:
                await self._refresh_quietly(job)

    def _cancel_here(self, job_id: str) -> None:
        for claim in self._claims.values():
            if claim.job_id == job_id and claim.job is not None:
                log.info("job %s: cancel received; stopping at its next step", job_id)
                claim.job.request_cancel()

    # -- claiming and running ----------------------------------------------------------

    async def _work_loop(self) -> None:
        """Claim new entries while job slots are free (COUNT = free slots)."""
        while True:
            free = self.free_slots
            if free <= 0 or self._stopping:
                self._slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), 0.5)
                continue
            try:
                claims = await self._read(free)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.counters.redis_errors += 1
                log.warning("reading the job queue failed (%s); retrying", exc)
                await asyncio.sleep(RETRY_AFTER_REDIS_S)
                continue
            for claim in claims:
                self._spawn(claim)

    async def _read(self, free: int) -> list[Claim]:
        claims: list[Claim] = []
        for cls in CLASSES:  # interactive first, without blocking
            if free - len(claims) <= 0:
                break
            reply = await self.r.xreadgroup(
                GROUP, self.node_id, {self.k_queue(cls): ">"}, count=free - len(claims)
            )
            claims.extend(self._claims_of(reply))
        if claims:
            return claims
        # Nothing waiting: block until an entry arrives in either class (one each at most;
        # one more than the free slots waits here for a slot, its claim renewed meanwhile).
        reply = await self.r.xreadgroup(
            GROUP,
            self.node_id,
            {self.k_queue(cls): ">" for cls in CLASSES},
            count=1,
            block=BLOCK_MS,
        )
        return self._claims_of(reply)

    def _claims_of(self, reply: Any) -> list[Claim]:
        claims = []
        for stream, entries in reply or []:
            cls = str(stream).rsplit(":", 1)[-1]
            for entry_id, fields in entries:
                if not fields or "job" not in fields:
                    continue
                claims.append(Claim(str(stream), cls, str(entry_id), str(fields["job"])))
        return claims

    def _spawn(self, claim: Claim) -> None:
        if claim.entry_id in self._claims:
            return
        self._claims[claim.entry_id] = claim
        claim.task = asyncio.create_task(self._execute(claim), name=f"claim-{claim.job_id}")

    async def _ack(self, claim: Claim) -> None:
        with contextlib.suppress(RedisError):
            await self.r.xack(claim.stream, GROUP, claim.entry_id)

    async def _execute(self, claim: Claim) -> None:
        try:
            async with self._running_sem:
                if claim.released:
                    return
                if self.draining:  # claimed but not started: back to the queue
                    await self._requeue_unstarted(claim)
                    return
                await self._run_claim(claim)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: running the claim failed", claim.job_id)
        finally:
            self._claims.pop(claim.entry_id, None)
            self._slot_freed.set()

    async def _run_claim(self, claim: Claim) -> None:
        lease = f"{self.node_id}/{secrets.token_hex(8)}"
        status, attempt_s, prev = await self._start(keys=[self.k_job(claim.job_id)],
                                                    args=[self.node_id, lease])
        if status in ("missing", "terminal"):
            await self._ack(claim)  # cancelled while queued, expired, or a duplicate entry
            return
        attempt = int(attempt_s)
        claim.lease = lease
        loaded = await self._load(claim.job_id, with_events=True)
        if loaded is None:
            await self._ack(claim)
            return
        job, _ = loaded
        job.state = "queued"  # the run below starts it (state, started_at, job_started)
        job.started_at_ms = None
        job.node = self.node_id
        claim.job = job
        writer = _Writer(self, job, lease)
        job.listeners.append(writer.push)
        if attempt >= 2:
            reason = (
                f"node {prev} stopped renewing its claim or handed the job back"
                if prev and prev != self.node_id
                else "the job's previous run did not finish"
            )
            job.emit("job_requeued", previous_node=prev or None, attempt=attempt, reason=reason)
        service = self.service
        if status == "cancel":
            service._finish_cancelled(job, "cancelled by request")
        elif attempt > self.max_deliveries:
            self.counters.failed_deliveries += 1
            message = (
                f"Job was started {attempt - 1} times without finishing (its nodes died or "
                f"hung); giving up after cluster_max_deliveries={self.max_deliveries}."
            )
            service._fail(job, None, "max_deliveries", message)
        else:
            await self._prepare_and_run(job, attempt)
        await writer.flush()
        if claim.released or writer.fenced:
            return
        await self._finish(
            keys=[
                self.k_job(job.id),
                self.k_events(job.id),
                self.k_uploads(job.id),
                claim.stream,
            ],
            args=[lease, GROUP, claim.entry_id, self.ttl_s],
        )

    async def _prepare_and_run(self, job: Job, attempt: int) -> None:
        service = self.service
        try:
            raw = await self.rb.hget(self.k_job(job.id), "request")
            request = GenerateRequest.model_validate_json(raw or b"")
        except ValidationError as exc:
            service._fail(job, None, "invalid_payload", f"The queued request cannot be read: {exc}")
            return
        job.request = request
        uploads = await self._uploads(job.id)
        try:
            spec = service.resolve(request)
            prepared, inputs_ms = await service.prepare(request, spec, uploads)
        except GenerateError as exc:
            service._fail(job, None, exc.code, exc.message)
            return
        job.started_data = {"attempt": attempt, "node": self.node_id}
        await service.run_local(job, spec, prepared, inputs_ms)

    async def _uploads(self, job_id: str) -> dict[str, Upload]:
        raw: dict[Any, Any] = await self.rb.hgetall(self.k_uploads(job_id))
        uploads: dict[str, Upload] = {}
        for key, value in raw.items():
            name = key.decode()
            if not name.startswith("data:"):
                continue
            field_name = name[5:]
            meta = json.loads(raw.get(f"meta:{field_name}".encode(), b"{}") or b"{}")
            uploads[field_name] = Upload(
                data=value,
                filename=str(meta.get("filename", "")),
                content_type=str(meta.get("content_type", "")),
            )
        return uploads

    async def write(self, job: Job, lease: str, events: list[JobEvent]) -> bool:
        """Append events and the current record, if this run still holds the lease."""
        args: list[Any] = [lease, self.ch_events, job.id, len(events)]
        for event in events:
            args.extend([event.seq, event.model_dump_json()])
        fields = self._record_fields(job)
        if any(e.event in TERMINAL_EVENTS for e in events):
            fields["cancel"] = ""
        args.append(len(fields))
        for name, value in fields.items():
            args.extend([name, value])
        keys = [self.k_job(job.id), self.k_events(job.id)]
        files = [a.id for a in job.result.outputs if a.id] if job.result is not None else []
        if not files or not any(e.event in TERMINAL_EVENTS for e in events):
            return bool(await self._write(keys=keys, args=args))
        # Where the outputs are is known before anyone sees the job finished.
        ttl = int(max(1.0, self.service.artifacts.ttl_s))
        pipe = self.r.pipeline(transaction=True)
        for file_id in files:
            pipe.set(self.k_file(file_id), self.node_id, ex=ttl)
        await self._write(keys=keys, args=args, client=pipe)
        results = await pipe.execute()
        return bool(results[-1])

    # -- leases ----------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        """Renew this node's claims every third of the lease; notice claims lost."""
        interval = max(0.2, self.lease_ms / 3000.0)
        while True:
            await asyncio.sleep(interval)
            by_stream: dict[str, list[Claim]] = {}
            for claim in self._claims.values():
                by_stream.setdefault(claim.stream, []).append(claim)
            for stream, claims in by_stream.items():
                keys = [stream] + [self.k_job(c.job_id) for c in claims]
                args: list[Any] = [GROUP, self.node_id]
                for c in claims:
                    args.extend([c.entry_id, c.lease])
                try:
                    lost = await self._heartbeat(keys=keys, args=args)
                except (RedisError, OSError) as exc:
                    self.counters.redis_errors += 1
                    log.warning("renewing job claims failed: %s", exc)
                    continue
                for entry_id in lost or []:
                    held = self._claims.get(str(entry_id))
                    if held is not None and not held.lost:
                        held.lost = True
                        log.warning("job %s: claim taken over by another node", held.job_id)
                        if held.job is not None:
                            held.job.request_cancel()

    async def _sweep_loop(self) -> None:
        """Reclaim entries idle past the lease (their node died or hangs); trim streams."""
        interval = max(0.25, self.lease_ms / 2000.0)
        while True:
            await asyncio.sleep(interval)
            try:
                for cls in CLASSES:
                    await self._reclaim(cls)
                await self._queue_stats()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.counters.redis_errors += 1
                log.warning("sweeping the job queue failed: %s", exc)

    async def _reclaim(self, cls: str) -> None:
        """Take over entries idle past the lease, up to the free slots.

        XAUTOCLAIM looks at a bounded slice of the pending list per call, so the cursor
        is followed until the whole list was seen or the slots are full.
        """
        cursor = "0-0"
        for _ in range(MAX_SWEEP_CALLS):
            free = self.free_slots
            if free <= 0 or self._stopping:
                return
            reply = await self.r.xautoclaim(
                self.k_queue(cls), GROUP, self.node_id, self.lease_ms, cursor, count=free
            )
            if not reply:
                return
            for entry_id, fields in reply[1] if len(reply) > 1 else []:
                if not fields or "job" not in fields or entry_id in self._claims:
                    continue
                self.counters.reclaims += 1
                log.info("reclaimed job %s (its node stopped renewing)", fields["job"])
                self._spawn(Claim(self.k_queue(cls), cls, entry_id, fields["job"]))
            cursor = str(reply[0])
            if cursor == "0-0":
                return

    async def _queue_stats(self) -> None:
        """Queue depth and pending entries per class; trims entries every group has read."""
        for cls in CLASSES:
            stream = self.k_queue(cls)
            groups = await self.r.xinfo_groups(stream)
            info = next((g for g in groups if g.get("name") == GROUP), None)
            if info is None:
                continue
            lag = info.get("lag")
            self.counters.queue[cls] = {
                "lag": int(lag) if lag is not None else 0,
                "pending": int(info.get("pending", 0)),
            }
            last = str(info.get("last-delivered-id", "0-0"))
            summary = await self.r.xpending(stream, GROUP)
            oldest = summary.get("min") if summary and summary.get("pending") else None
            floor = str(oldest) if oldest else last
            if floor != "0-0":
                await self.r.xtrim(stream, minid=floor, approximate=True)
        # The index outlives nothing: entries older than the retention go.
        cutoff = now_ms() - self.ttl_s * 2000.0
        await self.r.zremrangebyscore(self.k_index, "-inf", cutoff)

    async def queue_depths(self) -> dict[str, dict[str, int]]:
        """The last measured queue figures per class (``lag``: not yet delivered)."""
        return dict(self.counters.queue)

    # -- drain -----------------------------------------------------------------------

    async def _requeue_unstarted(self, claim: Claim) -> None:
        claim.released = True
        try:
            pipe = self.r.pipeline(transaction=True)
            pipe.xack(claim.stream, GROUP, claim.entry_id)
            pipe.xadd(claim.stream, {"job": claim.job_id})
            await pipe.execute()
            self.counters.released += 1
        except RedisError as exc:  # left pending: the sweepers reclaim it after the lease
            log.warning("job %s: handing back failed (%s)", claim.job_id, exc)

    async def release_all(self, *, running_too: bool) -> None:
        """Hand claimed jobs back to the queue: unstarted ones always, running ones too
        when asked (their local run is stopped and its writes are fenced off)."""
        for claim in list(self._claims.values()):
            if claim.lease == "":
                if not claim.released:
                    await self._requeue_unstarted(claim)
                continue
            if not running_too or claim.released:
                continue
            claim.released = True
            with contextlib.suppress(RedisError):
                ok = await self._release(
                    keys=[self.k_job(claim.job_id), claim.stream],
                    args=[claim.lease, GROUP, claim.entry_id, claim.job_id],
                )
                if ok:
                    self.counters.released += 1
                    log.info("job %s handed back to the queue", claim.job_id)
            if claim.job is not None:
                claim.job.listeners.clear()
                claim.job.request_cancel()
        tasks = [c.task for c in self._claims.values() if c.task is not None]
        if tasks and running_too:
            await asyncio.wait(tasks, timeout=5)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no job runs here (draining); ``False`` when the time ran out."""
        deadline = time.monotonic() + timeout
        while self._claims:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)
        return True
