"""Admission prices the CPU the meters do not see (framing, sends, the event loop)."""

from __future__ import annotations

from omnistream.engine.capacity import MAX_OVERHEAD, CapacityPlanner


def _metered_window(planner: CapacityPlanner, process_s: float, metered_s: float,
                    start: float) -> float:
    meter = planner.meter("render")
    for _ in range(4):  # the same 2 ms a frame as the warm-up measured
        meter.record(metered_s / 4, metered_s / 4 / 0.002)
    return planner.calibrate(process_cpu_s=start + process_s)


def test_unmetered_cpu_raises_what_a_session_costs() -> None:
    planner = CapacityPlanner(cores=2, target_utilisation=0.85)
    planner.calibrate(process_cpu_s=100.0)  # opens the window
    for _ in range(3):
        planner.meter("render").record(0.002 * 25, 25)  # warm-up and a per-frame estimate
    planner.calibrate(process_cpu_s=100.0)  # the warm-up's seconds close no window yet
    before = planner.demand(["render"], 25.0)
    assert before is not None
    # The process burned twice what the meters saw: sessions cost about twice as much.
    factor = 1.0
    process = 100.0
    for _ in range(8):
        factor = _metered_window(planner, 1.0, 0.5, process)
        process += 1.0
    assert 1.9 < factor <= 2.0
    after = planner.demand(["render"], 25.0)
    assert after is not None and 1.9 * before < after <= 2.0 * before
    # And admission has room for about half as many sessions.
    assert planner.budget_cores / after < 0.55 * planner.budget_cores / before


def test_overhead_is_bounded_and_ignores_idle_windows() -> None:
    planner = CapacityPlanner(cores=2)
    planner.calibrate(process_cpu_s=0.0)
    # A tiny metered amount (an idle server) closes no window: the factor holds.
    planner.meter("render").record(0.01, 1)
    assert planner.calibrate(process_cpu_s=50.0) == 1.0
    # Other work of the process (an offline job's own threads) cannot push it past the cap.
    process = 50.0
    for _ in range(20):
        factor = _metered_window(planner, 30.0, 0.5, process)
        process += 30.0
    assert factor <= MAX_OVERHEAD
    # Less process CPU than metered (clock skew between threads) never lowers it below 1.
    fresh = CapacityPlanner(cores=2)
    fresh.calibrate(process_cpu_s=0.0)
    assert _metered_window(fresh, 0.1, 1.0, 0.0) == 1.0
