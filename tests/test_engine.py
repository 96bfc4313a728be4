"""The scheduler: priority, deadlines, batching across sessions, stale work, failures."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Hashable, Sequence

import pytest

from omnistream.engine.capacity import CapacityPlanner
from omnistream.engine.runner import ModelRunner, Priority, RunnerFull, StaleWork
from omnistream.models.base import BatchModel


class Recorder(BatchModel[tuple[str, int], str]):
    """A fake model that records its batches and can be held at a gate."""

    max_batch_cost = 4.0

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.gate = threading.Event()
        self.gate.set()

    def batch_key(self, payload: tuple[str, int]) -> Hashable:
        return payload[0].split(":")[0]  # e.g. voice "a:..." and "b:..." never mix

    def run_batch(self, payloads: Sequence[tuple[str, int]]) -> list[str]:
        self.gate.wait(5)
        self.batches.append(list(payloads))
        return [f"{p[0]}#{p[1]}" if p[1] >= 0 else ValueError("bad item") for p in payloads]  # type: ignore[misc]


async def started(model: Recorder, **kwargs: object) -> ModelRunner:
    runner = ModelRunner("fake", lambda: model, **kwargs)  # type: ignore[arg-type]
    runner.start()
    await runner.wait_ready(5)
    return runner


async def test_realtime_first_then_deadline_and_batches_share_keys() -> None:
    model = Recorder()
    runner = await started(model)
    model.gate.clear()
    blocker = runner.submit(("a:block", 0))
    await asyncio.sleep(0.05)  # the runner is now holding the blocker at the gate
    futures = [
        runner.submit(("a:offline", 1), priority=Priority.OFFLINE, deadline=0),
        runner.submit(("a:late", 2), deadline=100.0),
        runner.submit(("a:soon", 3), deadline=1.0),
        runner.submit(("b:other", 4), deadline=2.0),
    ]
    model.gate.set()
    await asyncio.gather(blocker, *futures)
    order = [[p[0] for p in batch] for batch in model.batches]
    assert order[0] == ["a:block"]
    # Realtime "a" items batch together in deadline order; "b" never shares with "a";
    # offline work runs last although its deadline is earliest.
    assert order[1] == ["a:soon", "a:late"]
    assert order[2] == ["b:other"]
    assert order[3] == ["a:offline"]
    result = await futures[2]
    assert result.value == "a:soon#3" and result.batch_size == 2
    runner.close()


async def test_stale_and_abandoned_items_are_dropped_before_running() -> None:
    model = Recorder()
    runner = await started(model)
    model.gate.clear()
    blocker = runner.submit(("a:block", 0))
    await asyncio.sleep(0.05)
    epoch = {"value": 0}
    stale = runner.submit(("a:stale", 1), is_stale=lambda: epoch["value"] != 0)
    abandoned = runner.submit(("a:gone", 2))
    kept = runner.submit(("a:kept", 3))
    epoch["value"] = 1  # the session was interrupted
    abandoned.cancel()  # its caller went away
    model.gate.set()
    await blocker
    assert (await kept).value == "a:kept#3"
    with pytest.raises(StaleWork):
        await stale
    ran = [p[0] for batch in model.batches for p in batch]
    assert "a:stale" not in ran and "a:gone" not in ran
    assert runner.stats.dropped_stale == 2
    runner.close()


async def test_item_failure_is_isolated_and_queue_is_bounded() -> None:
    model = Recorder()
    runner = await started(model, max_pending=2)
    good, bad = runner.submit(("a:x", 1)), runner.submit(("a:y", -1))
    assert (await good).value == "a:x#1"
    with pytest.raises(ValueError, match="bad item"):
        await bad
    model.gate.clear()
    holding = runner.submit(("a:hold", 0))
    await asyncio.sleep(0.05)
    queued = [runner.submit(("a:q", i)) for i in range(2)]
    with pytest.raises(RunnerFull):
        runner.submit(("a:overflow", 9))
    model.gate.set()
    await asyncio.gather(holding, *queued)
    runner.close()


async def test_load_failure_is_reported_not_hung() -> None:
    def broken() -> BatchModel[object, object]:
        raise RuntimeError("weights missing")

    runner = ModelRunner("broken", broken)
    runner.start()
    with pytest.raises(RuntimeError, match="weights missing"):
        await runner.wait_ready(5)
    with pytest.raises(RuntimeError, match="failed to load"):
        runner.submit("x")
    runner.close()


async def test_replicas_run_side_by_side() -> None:
    inside = threading.Semaphore(0)
    both = threading.Event()
    count = {"n": 0}
    lock = threading.Lock()

    class Parallel(BatchModel[int, int]):
        def run_batch(self, payloads: Sequence[int]) -> list[int]:
            with lock:
                count["n"] += 1
                if count["n"] == 2:
                    both.set()
            inside.release()
            both.wait(5)
            return list(payloads)

    runner = ModelRunner("par", Parallel, replicas=2)
    runner.start()
    await runner.wait_ready(5)
    results = await asyncio.gather(runner.submit(1), runner.submit(2))
    assert both.is_set() and [r.value for r in results] == [1, 2]
    runner.close()


def test_capacity_planner_prices_sessions_in_cores() -> None:
    planner = CapacityPlanner(cores=2, target_utilisation=0.5)
    stages = ["m:infer", "jpeg"]
    assert planner.demand(stages, 25) is None  # nothing measured yet
    planner.meter("m:infer").record(0.5, 1)  # the first samples pay one-off costs
    planner.meter("jpeg").record(0.5, 1)
    planner.meter("m:infer").record(0.5, 1)
    planner.meter("jpeg").record(0.5, 1)
    assert planner.demand(stages, 25) is None
    for _ in range(5):
        planner.meter("m:infer").record(0.004, 1)  # 4 ms CPU per frame
        planner.meter("jpeg").record(0.001, 1)
    assert planner.seconds_per_unit(stages) == pytest.approx(0.005)
    assert planner.max_units_per_second(stages) == pytest.approx(200)
    assert planner.demand(stages, 25) == pytest.approx(0.125)
    assert planner.budget_cores == pytest.approx(1.0)


def test_sessions_of_different_pipelines_share_one_cpu_budget() -> None:
    from dataclasses import dataclass

    from omnistream.metrics import Metrics
    from omnistream.sessions.manager import CapacityExceeded, SessionManager

    @dataclass
    class Fake:
        id: str
        kind: str
        stages: list[str]
        units: float
        last_activity: float = 0.0

        @property
        def units_per_second(self) -> float:
            return self.units

        @property
        def capacity_stages(self) -> list[str]:
            return self.stages

        async def expire(self, reason: str) -> None:
            return None

    planner = CapacityPlanner(cores=1, target_utilisation=1.0)
    for _ in range(3):
        planner.meter("avatar").record(0.01, 1)  # 10 ms per frame: 25 fps = 0.25 core
        planner.meter("webrtc").record(0.02, 1)  # 20 ms per frame: 25 fps = 0.5 core
    manager = SessionManager(planner, Metrics(), max_sessions=10, idle_timeout_s=60)
    manager.admit(Fake("a", "avatar", ["avatar"], 25))
    manager.admit(Fake("w", "webrtc", ["webrtc"], 25))
    assert manager.load_cores() == pytest.approx(0.75)
    # A second WebRTC session would need 0.5 core more than the 0.25 left, although no
    # other WebRTC-priced session alone would say so.
    with pytest.raises(CapacityExceeded):
        manager.admit(Fake("w2", "webrtc", ["webrtc"], 25))
    manager.admit(Fake("a2", "avatar", ["avatar"], 25))
    assert len(manager.live()) == 3


async def test_a_device_runner_meters_device_time_and_cpu_apart() -> None:
    """A GPU model mostly waits on its device: busy time is priced apart from cores."""
    import time

    class Waits(BatchModel[int, int]):
        def run_batch(self, payloads: Sequence[int]) -> list[int]:
            time.sleep(0.02 * len(payloads))  # the "device" works; this thread idles
            return list(payloads)

    planner = CapacityPlanner(cores=4, target_utilisation=0.8)
    stages = ["w:infer@cuda", "w:busy@cuda"]
    runner = ModelRunner(
        "w", Waits, meter=planner.meter(stages[0]),
        device_meter=planner.meter(stages[1], resource="cuda"), capacity_stages=stages,
    )
    runner.start()
    await runner.wait_ready(5)
    for i in range(5):
        await runner.submit(i, cost=1.0)
    runner.close()
    demands = planner.demands(runner.capacity_stages, 25)
    assert demands is not None
    assert demands["cuda"] == pytest.approx(0.5, rel=0.5)  # 20 ms of device per frame
    assert demands["cpu"] < 0.1  # a sleeping thread burns next to no CPU
    assert planner.budget("cuda") == pytest.approx(0.8)
    assert planner.budget("cpu") == pytest.approx(3.2)


def test_device_time_is_a_budget_of_its_own() -> None:
    from dataclasses import dataclass

    from omnistream.metrics import Metrics
    from omnistream.sessions.manager import CapacityExceeded, SessionManager

    @dataclass
    class Fake:
        id: str
        stages: list[str]
        kind: str = "avatar"
        last_activity: float = 0.0

        @property
        def units_per_second(self) -> float:
            return 25.0

        @property
        def capacity_stages(self) -> list[str]:
            return self.stages

        async def expire(self, reason: str) -> None:
            return None

    planner = CapacityPlanner(cores=8, target_utilisation=0.8)
    gpu = ["m:infer@cuda", "m:busy@cuda", "jpeg"]
    for _ in range(3):
        planner.meter(gpu[0]).record(0.001, 1)  # 1 ms of CPU per frame
        planner.meter(gpu[1], resource="cuda").record(0.01, 1)  # 10 ms of device per frame
        planner.meter(gpu[2]).record(0.001, 1)
    manager = SessionManager(planner, Metrics(), max_sessions=100, idle_timeout_s=60)
    for i in range(3):  # 3 × 0.25 of the device fits under 0.8
        manager.admit(Fake(f"g{i}", gpu))
    assert manager.load()["cuda"] == pytest.approx(0.75)
    assert manager.load_cores() == pytest.approx(0.15)  # the CPU is nearly idle...
    with pytest.raises(CapacityExceeded, match="cuda device's time"):
        manager.admit(Fake("g3", gpu))  # ...but the device is not
    manager.admit(Fake("c0", ["jpeg"]))  # a CPU-only session still fits
