"""Model runners: one resident model per replica thread, fed from every live session.

Sessions submit work items from the event loop; a runner thread pops the most urgent item
(priority class first, then deadline), gathers more items that may share its batch, drops
anything whose session was cancelled or interrupted, runs the batch, and resolves each
item's future back on its own event loop with ``call_soon_threadsafe``. The event loop
never runs model code and never waits on a lock the runner holds for long.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Generic, TypeVar

from omnistream.engine.capacity import CapacityMeter
from omnistream.models.base import BatchModel

log = logging.getLogger(__name__)

R = TypeVar("R")

_ASK_MODEL: Any = object()


class Priority(IntEnum):
    """Priority classes: lower runs first. Offline work only fills spare capacity."""

    REALTIME = 0
    #: Preparing a new live session (its reference image): after live chunks, so a storm
    #: of new or doomed connections cannot delay the frames of sessions already running.
    SETUP = 1
    OFFLINE = 2


class StaleWork(Exception):
    """The item was dropped before running: its session was cancelled or interrupted."""


class RunnerFull(Exception):
    """The runner's queue is at its bound; the caller should shed load."""


class RunnerClosed(Exception):
    """The runner is shutting down and takes no more work."""


@dataclass
class WorkResult(Generic[R]):
    """A finished item with the timings a session reports in its metrics."""

    value: R
    queue_ms: float
    infer_ms: float
    batch_size: int
    batch_cost: float


@dataclass(order=True)
class _Item:
    sort_key: tuple[int, float, int]
    payload: Any = field(compare=False)
    cost: float | None = field(compare=False)
    key: Hashable = field(compare=False)  # _ASK_MODEL until the runner resolves it
    is_stale: Callable[[], bool] = field(compare=False)
    future: asyncio.Future[Any] = field(compare=False)
    loop: asyncio.AbstractEventLoop = field(compare=False)
    enqueued: float = field(compare=False)


@dataclass
class RunnerStats:
    """Counters a runner keeps for Prometheus and for admission control."""

    batches: int = 0
    items: int = 0
    dropped_stale: int = 0
    failed: int = 0
    last_batch_size: int = 0


BatchObserver = Callable[[int, float, float], None]
"""Called after each batch with (batch size, batch cost, seconds)."""


class ModelRunner:
    """Owns ``replicas`` loaded copies of one model, each served by its own thread.

    Args:
        name: model id, used for thread names and metrics.
        factory: builds one replica; called in the replica's own thread so that slow
            loads never block the event loop.
        replicas: copies run side by side (CPU models); a GPU model uses one.
        max_pending: bound on queued items; :meth:`submit` raises :class:`RunnerFull`
            past it instead of letting a queue grow without limit.
        meter: records CPU seconds per unit of work for admission control.
        device_meter: on an accelerator, records the seconds the device is busy per unit
            (a batch's wall time: this runner keeps one batch at a time on its device).
        capacity_stages: the meters' stage names, which sessions using this runner list
            so admission prices them (default ``<name>:infer``).
        checkpoint: the request-chosen weights this runner serves ("" for the model's
            configured ones); caches of model-specific work key on it.
    """

    def __init__(
        self,
        name: str,
        factory: Callable[[], BatchModel[Any, Any]],
        *,
        replicas: int = 1,
        max_pending: int = 1024,
        meter: CapacityMeter | None = None,
        on_batch: BatchObserver | None = None,
        checkpoint: str = "",
        device_meter: CapacityMeter | None = None,
        capacity_stages: list[str] | None = None,
    ) -> None:
        self.name = name
        self.device_meter = device_meter
        self.capacity_stages = list(capacity_stages or [f"{name}:infer"])
        self.checkpoint = checkpoint
        #: ``time.monotonic()`` of the last submit (or of creation): the engine unloads
        #: request-chosen weights nobody has used for a while.
        self.last_used = time.monotonic()
        self.replicas = max(1, replicas)
        self.max_pending = max_pending
        self.meter = meter
        self.stats = RunnerStats()
        self._factory = factory
        self._on_batch = on_batch
        self._heap: list[_Item] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._models: list[BatchModel[Any, Any]] = []
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._loaded_count = 0

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the replica threads; each loads its model before taking work."""
        for index in range(self.replicas):
            thread = threading.Thread(
                target=self._serve, name=f"runner-{self.name}-{index}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait (without blocking the loop) until every replica has loaded its model."""
        ok = await asyncio.to_thread(self._ready.wait, timeout)
        if self._load_error is not None:
            raise self._load_error
        if not ok:
            raise TimeoutError(f"model {self.name} did not load in {timeout}s")

    @property
    def ready(self) -> bool:
        """True once every replica has loaded."""
        return self._ready.is_set() and self._load_error is None

    def model_info(self) -> dict[str, Any]:
        """What the first loaded replica says about how it runs (``info()``), if anything.

        Models that adapt at run time (a GPU model that fell back from CUDA graphs, split
        a batch after running out of memory) report it here for ``/readyz``.
        """
        models = list(self._models)
        info = getattr(models[0], "info", None) if models else None
        if not callable(info):
            return {}
        try:
            value = info()
        except Exception as exc:  # a broken report must not break readiness
            return {"info_error": f"{type(exc).__name__}: {exc}"}
        return dict(value) if isinstance(value, dict) else {}

    @property
    def failed(self) -> bool:
        """True once loading has failed (every submit then raises the load error)."""
        return self._ready.is_set() and self._load_error is not None

    @property
    def pending(self) -> int:
        """Items waiting to run."""
        return len(self._heap)

    def close(self) -> None:
        """Stop taking work, fail what is queued, and let the threads exit."""
        with self._cond:
            self._closed = True
            items, self._heap = self._heap, []
            self._cond.notify_all()
        for item in items:
            self._resolve(item, exc=RunnerClosed(f"runner {self.name} closed"))
        for thread in self._threads:
            thread.join(timeout=5)
        for model in self._models:
            try:
                model.close()
            except Exception:  # pragma: no cover - best effort
                log.exception("closing model %s failed", self.name)

    # -- submitting ----------------------------------------------------------------

    def submit(
        self,
        payload: Any,
        *,
        priority: Priority = Priority.REALTIME,
        deadline: float | None = None,
        is_stale: Callable[[], bool] = lambda: False,
        cost: float | None = None,
        key: Hashable = None,
    ) -> asyncio.Future[WorkResult[Any]]:
        """Queue one item and return a future resolved on the calling loop.

        Cancelling the returned future abandons the item: a runner that has not started
        it yet skips it. ``deadline`` is a ``time.monotonic()`` value; items with the
        same priority run earliest deadline first. ``cost`` and ``key`` default to the
        model's own :meth:`~BatchModel.cost` and :meth:`~BatchModel.batch_key`.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[WorkResult[Any]] = loop.create_future()
        now = time.monotonic()
        item = _Item(
            sort_key=(int(priority), deadline if deadline is not None else now, next(self._seq)),
            payload=payload,
            cost=cost,
            key=_ASK_MODEL if key is None else key,
            is_stale=is_stale,
            future=future,
            loop=loop,
            enqueued=now,
        )
        with self._cond:
            if self._closed:
                raise RunnerClosed(f"runner {self.name} is closed")
            if self._load_error is not None:
                raise RuntimeError(f"model {self.name} failed to load: {self._load_error}")
            if len(self._heap) >= self.max_pending:
                raise RunnerFull(f"runner {self.name} has {len(self._heap)} items queued")
            heapq.heappush(self._heap, item)
            self.last_used = now
            self._cond.notify()
        return future

    # -- the replica thread --------------------------------------------------------

    def _serve(self) -> None:
        try:
            model = self._factory()
        except BaseException as exc:
            log.exception("loading model %s failed", self.name)
            with self._cond:
                self._load_error = exc
                failed, self._heap = self._heap, []
            self._ready.set()
            for item in failed:
                self._resolve(item, exc=RuntimeError(f"model {self.name} failed to load: {exc}"))
            return
        with self._cond:
            self._models.append(model)
            self._loaded_count += 1
            if self._loaded_count == self.replicas:
                self._ready.set()
        while True:
            batch = self._next_batch(model)
            if batch is None:
                return
            self._run(model, batch)

    def _next_batch(self, model: BatchModel[Any, Any]) -> list[_Item] | None:
        """Pop the most urgent live item and the items that can share its batch."""
        with self._cond:
            while True:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                first = heapq.heappop(self._heap)
                if self._drop_if_stale(first):
                    continue
                first.cost = self._cost(model, first)
                batch = [first]
                total = first.cost
                keep: list[_Item] = []
                while self._heap and total < model.max_batch_cost:
                    candidate = heapq.heappop(self._heap)
                    if self._drop_if_stale(candidate):
                        continue
                    candidate.cost = self._cost(model, candidate)
                    # Offline work never rides along ahead of queued realtime work, and
                    # only compatible payloads share a model call.
                    if (
                        candidate.key != first.key
                        or candidate.sort_key[0] != first.sort_key[0]
                        or total + candidate.cost > model.max_batch_cost
                    ):
                        keep.append(candidate)
                        if len(keep) > 64:
                            break
                        continue
                    batch.append(candidate)
                    total += candidate.cost
                for item in keep:
                    heapq.heappush(self._heap, item)
                if model.batch_linger_s > 0 and total < model.max_batch_cost:
                    self._linger(model, batch, total)
                return batch

    def _linger(self, model: BatchModel[Any, Any], batch: list[_Item], total: float) -> None:
        """Hold the batch open (lock held, released while waiting) for expected peers.

        Only items with the first item's key and priority class join; the wait ends at
        ``batch_linger_s``, when the model's expected count is reached, or when the batch
        is full, so a lone request pays at most the linger per step.
        """
        first = batch[0]
        deadline = time.monotonic() + model.batch_linger_s
        while len(batch) < model.expected_batch(first.key) and total < model.max_batch_cost:
            left = deadline - time.monotonic()
            if left <= 0 or self._closed:
                return
            self._cond.wait(left)
            for candidate in list(self._heap):
                if self._drop_if_stale(candidate):
                    self._heap.remove(candidate)
                    continue
                cost = self._cost(model, candidate)
                if (
                    candidate.key == first.key
                    and candidate.sort_key[0] == first.sort_key[0]
                    and total + cost <= model.max_batch_cost
                ):
                    self._heap.remove(candidate)
                    batch.append(candidate)
                    total += cost
            heapq.heapify(self._heap)

    @staticmethod
    def _cost(model: BatchModel[Any, Any], item: _Item) -> float:
        """Resolve the item's cost and batch key from the model the first time it is seen."""
        if item.key is _ASK_MODEL:
            item.key = model.batch_key(item.payload)
        if item.cost is None:
            item.cost = model.cost(item.payload)
        return item.cost

    def _drop_if_stale(self, item: _Item) -> bool:
        # A cancelled future means its caller went away (reading its state from this
        # thread is a plain attribute read; the worst race is running one extra item).
        stale = item.future.done()
        if not stale:
            try:
                stale = item.is_stale()
            except Exception:
                stale = True
        if stale:
            self.stats.dropped_stale += 1
            self._resolve(item, exc=StaleWork("dropped: session cancelled or interrupted"))
        return stale

    def _run(self, model: BatchModel[Any, Any], batch: list[_Item]) -> None:
        started = time.monotonic()
        cpu_started = time.thread_time()
        try:
            results = model.run_batch([item.payload for item in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"model {self.name} returned {len(results)} results for {len(batch)} items"
                )
        except Exception as exc:
            log.exception("batch of %d on %s failed", len(batch), self.name)
            self.stats.failed += len(batch)
            for item in batch:
                self._resolve(item, exc=exc)
            return
        elapsed = time.monotonic() - started
        cpu = time.thread_time() - cpu_started
        cost = sum(item.cost or 0.0 for item in batch)
        self.stats.batches += 1
        self.stats.items += len(batch)
        self.stats.last_batch_size = len(batch)
        if self.meter is not None:
            threads = max(1, model.cpu_threads)
            self.meter.record(cpu if threads == 1 else max(cpu, elapsed * threads), cost)
        if self.device_meter is not None:
            self.device_meter.record(elapsed, cost)
        if self._on_batch is not None:
            self._on_batch(len(batch), cost, elapsed)
        for item, value in zip(batch, results, strict=True):
            if isinstance(value, BaseException):
                self._resolve(item, exc=value)
                continue
            result = WorkResult(
                value=value,
                queue_ms=(started - item.enqueued) * 1000.0,
                infer_ms=elapsed * 1000.0,
                batch_size=len(batch),
                batch_cost=cost,
            )
            self._resolve(item, value=result)

    @staticmethod
    def _resolve(item: _Item, value: Any = None, exc: BaseException | None = None) -> None:
        def _set() -> None:
            if item.future.done():
                return
            if exc is not None:
                item.future.set_exception(exc)
            else:
                item.future.set_result(value)

        try:
            item.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass
