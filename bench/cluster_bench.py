"""Cluster bench: what Redis and HAProxy cost, and how fast the cluster heals.

Measures, on one machine (every process shares its cores):

1. tiny-job round trip (POST async text2audio → ``job_finished`` over SSE), embedded
   (one node, no Redis) vs cluster (two nodes + Redis, submitted through HAProxy);
2. cancel latency across nodes: ``DELETE`` on node B for a job running on node A, to the
   ``job_cancelled`` event node A wrote (both clocks are this machine's);
3. reclaim time after SIGKILL: node A killed mid-job, to node B's ``job_requeued`` and its
   second ``job_started``, with the lease the nodes run under;
4. avatar per-chunk latency, FlashTalk session direct to a node vs through HAProxy;
5. SIGTERM → drained: an idle node, and a node finishing a running job.

Run: ``python bench/cluster_bench.py [--rounds 20] [--out bench/results/cluster.json]``.
Needs ``redis-server`` and ``haproxy`` on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.avatar_client import connect, flashtalk_init, speech_like  # noqa: E402
from tests.cluster_helpers import Cluster, make_cluster  # noqa: E402
from tests.jobs_helpers import sse_events  # noqa: E402

TINY = "Hi."
LONG = "This sentence is here to keep the node busy for a little while. " * 55
CHUNK = 17920


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median_ms": round(statistics.median(values), 2),
        "p90_ms": round(pct(values, 0.9), 2),
        "min_ms": round(min(values), 2),
        "max_ms": round(max(values), 2),
    }


def submit(client: httpx.Client, text: str) -> str:
    r = client.post(
        "/v1/generate", json={"task": "text2audio", "inputs": {"prompt": text}, "async_run": True}
    )
    r.raise_for_status()
    return str(r.json()["id"])


def round_trip(client: httpx.Client, rounds: int) -> list[float]:
    """submit → job_finished seen on the SSE stream, one job at a time (warm model)."""
    for _ in range(2):  # warm the model on every node the jobs may land on
        job = submit(client, TINY)
        for _ in sse_events(client, f"/v1/jobs/{job}/events"):
            pass
    out = []
    for _ in range(rounds):
        started = time.perf_counter()
        job = submit(client, TINY)
        for name, _ in sse_events(client, f"/v1/jobs/{job}/events"):
            if name == "job_finished":
                break
        out.append((time.perf_counter() - started) * 1000.0)
    return out


def embedded(rounds: int, cancel_rounds: int) -> tuple[list[float], dict[str, Any]]:
    """Round trips and cancel latency of one embedded server (the baseline)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from omnistream_server import omnistream_server

    with omnistream_server() as (address, _), httpx.Client(
        base_url=f"http://{address}", timeout=60
    ) as client:
        trips = round_trip(client, rounds)
        to_stop, to_answer = [], []
        for _ in range(cancel_rounds):
            job = submit(client, LONG)
            wait_started(client, job)
            time.sleep(0.3)
            sent = time.time() * 1000.0
            client.delete(f"/v1/jobs/{job}")
            to_answer.append(time.time() * 1000.0 - sent)
            record = wait_end(client, job)
            stopped = next(e for e in record["events"] if e["event"] == "job_cancelled")
            to_stop.append(stopped["timestamp_ms"] - sent)
        cancel = {
            "request_to_job_cancelled": summary(to_stop),
            "delete_answered": summary(to_answer),
        }
        return trips, cancel


def wait_started(client: httpx.Client, job: str) -> str:
    for name, _ in sse_events(client, f"/v1/jobs/{job}/events"):
        if name == "job_started":
            return str(client.get(f"/v1/jobs/{job}").json()["node"])
    raise RuntimeError("job ended before it started")


def wait_end(client: httpx.Client, job: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        record: dict[str, Any] = client.get(f"/v1/jobs/{job}").json()
        if record["state"] in ("succeeded", "failed", "cancelled"):
            return record
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job} did not end")
        time.sleep(0.05)


def cancel_latency(cluster: Cluster, lb: httpx.Client, rounds: int) -> dict[str, Any]:
    # One open connection per node, as the embedded run has: a new HTTP client costs the
    # client tens of milliseconds here, which is not the server's doing.
    clients = {n.node_id: httpx.Client(base_url=n.http, timeout=30) for n in cluster.nodes}
    for client in clients.values():
        client.get("/healthz")
    to_stop, to_answer = [], []
    for _ in range(rounds):
        job = submit(lb, LONG)
        runner = wait_started(lb, job)
        time.sleep(0.3)  # well inside the run
        other = next(n for n in cluster.nodes if n.node_id != runner)
        sent = time.time() * 1000.0
        r = clients[other.node_id].delete(f"/v1/jobs/{job}")
        answered = time.time() * 1000.0
        record = wait_end(lb, job)
        assert record["state"] == "cancelled", record
        stopped = next(e for e in record["events"] if e["event"] == "job_cancelled")
        to_stop.append(stopped["timestamp_ms"] - sent)
        to_answer.append(answered - sent)
        assert r.status_code in (200, 202)
    for client in clients.values():
        client.close()
    return {"request_to_job_cancelled": summary(to_stop), "delete_answered": summary(to_answer)}


async def chunk_latencies(url: str, chunks: int) -> list[float]:
    ws = await connect(url)
    try:
        reply = await flashtalk_init(ws)
        assert reply["type"] == "init_ok", reply
        out = []
        for i in range(chunks + 3):
            pcm = speech_like(CHUNK, seed=i)
            started = time.perf_counter()
            await ws.send(b"AUDI" + pcm)
            frame = await asyncio.wait_for(ws.recv(), 60)
            assert isinstance(frame, bytes)
            if i >= 3:  # the first chunks warm the renderer
                out.append((time.perf_counter() - started) * 1000.0)
        return out
    finally:
        await ws.close()


def avatar_ratio(cluster: Cluster, chunks: int, rounds: int = 4) -> dict[str, Any]:
    """Alternate direct and through-HAProxy sessions (the machine's load drifts)."""
    direct: list[float] = []
    via: list[float] = []
    for _ in range(rounds):
        direct += asyncio.run(chunk_latencies(cluster.nodes[0].ws + "/", chunks))
        via += asyncio.run(chunk_latencies(cluster.lb_ws + "/", chunks))
    return {
        "direct": summary(direct),
        "haproxy": summary(via),
        "ratio_median": round(statistics.median(via) / statistics.median(direct), 3),
        "ratio_min": round(min(via) / min(direct), 3),
        "added_median_ms": round(statistics.median(via) - statistics.median(direct), 2),
    }


def reclaim_after_sigkill(cluster: Cluster, lb: httpx.Client) -> dict[str, Any]:
    job = submit(lb, LONG)
    victim_id = wait_started(lb, job)
    victim = cluster.node(victim_id)
    time.sleep(0.3)
    killed = time.time() * 1000.0
    victim.kill()
    survivor = next(n for n in cluster.nodes if n.node_id != victim_id)
    with httpx.Client(base_url=survivor.http, timeout=60) as client:
        record = wait_end(client, job)
    events = record["events"]
    requeued = next(e for e in events if e["event"] == "job_requeued")
    restarted = [e for e in events if e["event"] == "job_started"][-1]
    out = {
        "lease_s": float(victim.env["OMNISTREAM_CLUSTER_LEASE_S"]),
        "kill_to_job_requeued_ms": round(requeued["timestamp_ms"] - killed, 1),
        "kill_to_second_job_started_ms": round(restarted["timestamp_ms"] - killed, 1),
        "kill_to_job_finished_ms": round(record["finished_at_ms"] - killed, 1),
        "final_state": record["state"],
        "attempt": restarted["data"].get("attempt"),
    }
    cluster.start_nodes([victim])
    return out


def drain_times(cluster: Cluster, lb: httpx.Client) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # An idle node.
    node = cluster.nodes[0]
    assert node.proc is not None
    started = time.perf_counter()
    node.terminate()
    while True:
        try:
            if httpx.get(node.http + "/readyz", timeout=5).status_code == 503:
                break
        except httpx.ConnectError:
            break  # drained and gone before this poll
        time.sleep(0.005)
    out["idle_sigterm_to_not_ready_ms"] = round((time.perf_counter() - started) * 1000.0, 1)
    node.proc.wait(timeout=60)
    out["idle_sigterm_to_exit_ms"] = round((time.perf_counter() - started) * 1000.0, 1)
    cluster.start_nodes([node])
    # A node that runs a job: it finishes the job, then exits.
    job = submit(lb, LONG)
    runner = cluster.node(wait_started(lb, job))
    assert runner.proc is not None
    started = time.perf_counter()
    runner.terminate()
    runner.proc.wait(timeout=120)
    out["busy_sigterm_to_exit_ms"] = round((time.perf_counter() - started) * 1000.0, 1)
    other = next(n for n in cluster.nodes if n is not runner)
    with httpx.Client(base_url=other.http, timeout=60) as client:
        record = wait_end(client, job)
    out["busy_job_state"] = record["state"]
    out["busy_job_node"] = record["node"]
    out["busy_job_requeued"] = any(e["event"] == "job_requeued" for e in record["events"])
    cluster.start_nodes([runner])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cancel-rounds", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--lease", default="5")
    parser.add_argument("--out", default=str(ROOT / "bench/results/cluster.json"))
    args = parser.parse_args()

    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "note": "every process (Redis, HAProxy, both nodes, this client) shares these "
            "cores, so the cluster does not add throughput here",
        }
    }
    print("embedded round trip and cancel…", flush=True)
    trips, cancel = embedded(args.rounds, args.cancel_rounds)
    results["round_trip_embedded"] = summary(trips)
    results["cancel_embedded"] = cancel
    print(results["round_trip_embedded"], cancel, flush=True)
    cluster = make_cluster(
        OMNISTREAM_CLUSTER_LEASE_S=args.lease,
        OMNISTREAM_MAX_SESSIONS="4",
        OMNISTREAM_DRAIN_GRACE_S="60",
    )
    try:
        with httpx.Client(base_url=cluster.lb, timeout=60) as lb:
            print("cluster round trip…", flush=True)
            results["round_trip_cluster"] = summary(round_trip(lb, args.rounds))
            print(results["round_trip_cluster"], flush=True)
            print("cancel across nodes…", flush=True)
            results["cancel_across_nodes"] = cancel_latency(cluster, lb, args.cancel_rounds)
            print(results["cancel_across_nodes"], flush=True)
            print("avatar chunks direct vs HAProxy…", flush=True)
            results["avatar_chunk"] = avatar_ratio(cluster, args.chunks)
            print(results["avatar_chunk"], flush=True)
            print("reclaim after SIGKILL…", flush=True)
            results["reclaim_after_sigkill"] = reclaim_after_sigkill(cluster, lb)
            print(results["reclaim_after_sigkill"], flush=True)
            print("drain…", flush=True)
            results["drain"] = drain_times(cluster, lb)
            print(results["drain"], flush=True)
    finally:
        cluster.close()
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
