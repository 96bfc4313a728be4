"""Two omnistream nodes sharing Redis behind HAProxy: real processes on loopback ports.

One cluster per module (nodes are slow to start on 2 cores); tests run in file order and
the destructive ones (SIGKILL, restart of every node, drain) come last.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import signal
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets
import websockets.sync.client as ws_client

from tests.cluster_helpers import SECRET, Cluster, binaries_missing, make_cluster
from tests.jobs_helpers import sse_events
from tests.server import free_port

missing = binaries_missing()

SHORT = "Good morning."
LONG = "This sentence is here to keep the node busy for a little while. " * 55


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if missing is not None:
        pytest.skip(missing)
    c = make_cluster()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def lb(cluster: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.lb, timeout=60) as client:
        yield client


def submit(client: httpx.Client, text: str = SHORT) -> str:
    r = client.post(
        "/v1/generate",
        json={"task": "text2audio", "inputs": {"prompt": text}, "async_run": True},
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def wait_state(client: httpx.Client, job_id: str, *, timeout: float = 60) -> dict[str, Any]:
    """Poll until the job ends (any node may answer)."""
    deadline = time.monotonic() + timeout
    while True:
        record: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if record["state"] in ("succeeded", "failed", "cancelled"):
            return record
        assert time.monotonic() < deadline, f"job {job_id} still {record['state']}"
        time.sleep(0.1)


def wait_started(client: httpx.Client, job_id: str, timeout: float = 30) -> str:
    """Wait for job_started; returns the node running the job."""
    for name, _ in sse_events(client, f"/v1/jobs/{job_id}/events", timeout=timeout):
        if name == "job_started":
            return str(client.get(f"/v1/jobs/{job_id}").json()["node"])
    raise AssertionError("the job ended without starting")


async def aget(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(url)


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes() / w.getframerate()


def other(cluster: Cluster, node_id: str) -> str:
    return next(n.node_id for n in cluster.nodes if n.node_id != node_id)


# -- jobs and placement ---------------------------------------------------------------


def test_jobs_through_haproxy_run_on_both_nodes(cluster: Cluster, lb: httpx.Client) -> None:
    ids = [submit(lb) for _ in range(4)]
    records = [wait_state(lb, i) for i in ids]
    assert all(r["state"] == "succeeded" for r in records), [r["error"] for r in records]
    assert {r["node"] for r in records} == {"node-a", "node-b"}
    for record in records:
        report = record["result"]["metadata"]
        assert report["worker_id"] == record["node"]
    listed = {j["id"]: j for j in lb.get("/v1/jobs").json()["data"]}
    assert all(listed[i]["node"] in ("node-a", "node-b") for i in ids)
    assert all(listed[i]["request"]["inputs"]["prompt"] == SHORT for i in ids)
    nodes = lb.get("/v1/cluster/nodes").json()["data"]
    assert sorted(n["node_id"] for n in nodes) == ["node-a", "node-b"]
    for entry in nodes:
        assert entry["session_slots"] == 2 and entry["job_slots"] == 1
        assert entry["draining"] is False and entry["url"].startswith("http://127.0.0.1:")
    from omnistream.cluster.agent import ask_agent

    for node in cluster.nodes:  # what HAProxy's agent check reads
        assert asyncio.run(ask_agent("127.0.0.1", node.agent_port)) == "ready maxconn:2"


def test_any_node_answers_for_a_job_on_another(cluster: Cluster, lb: httpx.Client) -> None:
    job_id = submit(lb)
    record = wait_state(lb, job_id)
    runner = record["node"]
    with httpx.Client(base_url=cluster.node(other(cluster, runner)).http, timeout=30) as b:
        got = b.get(f"/v1/jobs/{job_id}").json()
        assert got["state"] == "succeeded" and got["node"] == runner
        events = list(sse_events(b, f"/v1/jobs/{job_id}/events"))
        assert [d["seq"] for _, d in events] == list(range(len(events)))
        assert events[0][0] == "job_enqueued" and events[-1][0] == "job_finished"
        resumed = list(sse_events(b, f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "1"}))
        assert [d["seq"] for _, d in resumed] == list(range(2, len(events)))
        trace = b.get(f"/v1/jobs/{job_id}/trace").json()
        assert trace["job_id"] == job_id and trace["spans"][0]["status"] == "ok"
        ws_url = cluster.node(other(cluster, runner)).ws + f"/v1/jobs/{job_id}/stream"
        with ws_client.connect(ws_url, open_timeout=10) as ws:
            messages = []
            while True:
                try:
                    messages.append(json.loads(ws.recv(timeout=10)))
                except websockets.exceptions.ConnectionClosedOK:
                    break
        assert [m["seq"] for m in messages if m["type"] == "event"] == list(range(len(events)))
        assert messages[-1]["type"] == "end" and messages[-1]["job"]["state"] == "succeeded"
        # A finished job cannot be cancelled, from any node.
        r = b.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"


def test_sync_call_and_files_from_either_node(cluster: Cluster, lb: httpx.Client) -> None:
    r = lb.post("/v1/generate", json={"task": "text2audio", "inputs": {"prompt": SHORT}})
    assert r.status_code == 200, r.text
    assert r.json()["metadata"]["worker_id"] in ("node-a", "node-b")
    url = r.json()["outputs"][0]["url"]
    bodies = []
    for node in cluster.nodes:
        r = httpx.get(node.http + url, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        bodies.append(r.content)
    assert bodies[0] == bodies[1] and wav_seconds(bodies[0]) > 0.3
    assert httpx.get(cluster.nodes[0].http + "/v1/files/file_nope").status_code == 404


def test_internal_route_needs_the_cluster_secret(cluster: Cluster, lb: httpx.Client) -> None:
    from omnistream.cluster.files import AUTH_HEADER, sign

    job_id = submit(lb)
    record = wait_state(lb, job_id)
    file_id = record["result"]["outputs"][0]["id"]
    holder = cluster.node(record["node"])
    path = f"/internal/cluster/files/{file_id}"
    forged = [
        {},
        {AUTH_HEADER: sign("not-the-secret", path)},
        {AUTH_HEADER: sign(SECRET, path, now=time.time() - 3600)},  # replayed later
        {AUTH_HEADER: sign(SECRET, "/internal/cluster/files/file_other")},  # another path
        {AUTH_HEADER: "garbage"},
    ]
    for headers in forged:
        r = httpx.get(holder.http + path, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "cluster_auth_required"
    good = httpx.get(holder.http + path, headers={AUTH_HEADER: sign(SECRET, path)})
    assert good.status_code == 200 and good.content[:4] == b"RIFF"


def test_cancel_from_another_node_stops_the_run(cluster: Cluster, lb: httpx.Client) -> None:
    job_id = submit(lb, LONG)
    runner = wait_started(lb, job_id)
    with httpx.Client(base_url=cluster.node(other(cluster, runner)).http, timeout=30) as b:
        r = b.delete(f"/v1/jobs/{job_id}")
        assert r.status_code in (200, 202), r.text
        record = wait_state(b, job_id, timeout=10)
    assert record["state"] == "cancelled" and record["result"] is None
    assert record["events"][-1]["event"] == "job_cancelled"


def test_four_sessions_land_two_and_two_then_refusal(cluster: Cluster) -> None:
    from tests.avatar_client import connect, flashtalk_init

    async def scenario() -> None:
        sockets = []
        try:
            for _ in range(4):
                ws = await connect(cluster.lb_ws + "/")
                reply = await flashtalk_init(ws)
                assert reply["type"] == "init_ok", reply
                sockets.append(ws)
            live = [(await aget(n.http + "/healthz")).json() for n in cluster.nodes]
            assert [h["live_sessions"] for h in live] == [2, 2]
            # Both nodes full: the next handshake is refused cleanly, not queued forever.
            with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
                await connect(cluster.lb_ws + "/")
            assert refused.value.response.status_code == 503
            for node in cluster.nodes:
                ready = await aget(node.http + "/readyz")
                assert ready.status_code == 503 and "full" in ready.json()["reasons"][0]
        finally:
            for ws in sockets:
                await ws.close()

    asyncio.run(scenario())
    deadline = time.monotonic() + 10
    while any(httpx.get(n.http + "/readyz").status_code != 200 for n in cluster.nodes):
        assert time.monotonic() < deadline, "nodes should be ready again once sessions end"
        time.sleep(0.1)


def test_cancel_of_a_queued_job_from_any_node(cluster: Cluster, lb: httpx.Client) -> None:
    busy = [submit(lb, LONG) for _ in range(2)]  # one job slot per node: both busy
    for job_id in busy:
        wait_started(lb, job_id)
    queued = submit(lb)
    for node in cluster.nodes:  # the queued job is visible, queued, on every node
        assert httpx.get(f"{node.http}/v1/jobs/{queued}").json()["state"] == "queued"
    r = httpx.delete(f"{cluster.nodes[1].http}/v1/jobs/{queued}", timeout=10)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    for job_id in busy:
        lb.delete(f"/v1/jobs/{job_id}")
    record = wait_state(lb, queued)
    assert record["state"] == "cancelled" and record["node"] is None
    assert [e["event"] for e in record["events"]] == ["job_enqueued", "job_cancelled"]


def test_unreadable_payload_fails_with_a_reason(cluster: Cluster, lb: httpx.Client) -> None:
    import redis

    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    job_id = "job_" + "0" * 20
    r.hset(
        f"omnistream:job:{job_id}",
        mapping={
            "id": job_id, "trace_id": "trace_x", "model": "hibari", "task": "text2audio",
            "mode": "async", "state": "queued", "attempt": "0", "request": "{not json",
            "enqueued_at_ms": str(time.time() * 1000),
        },
    )  # fmt: skip
    r.xadd("omnistream:q:batch", {"nonsense": "entry"})  # no job id: skipped
    r.xadd("omnistream:q:batch", {"job": job_id})
    record = wait_state(lb, job_id)
    assert record["state"] == "failed" and record["error"]["code"] == "invalid_payload"
    # A job whose runs keep dying stops at cluster_max_deliveries (3) with a reason.
    doomed = "job_" + "1" * 20
    request = {"task": "text2audio", "inputs": {"prompt": SHORT}, "async_run": True}
    r.hset(
        f"omnistream:job:{doomed}",
        mapping={
            "id": doomed, "trace_id": "trace_y", "model": "hibari", "task": "text2audio",
            "mode": "async", "state": "queued", "attempt": "3", "node": "node-gone",
            "request": json.dumps(request), "enqueued_at_ms": str(time.time() * 1000),
        },
    )  # fmt: skip
    r.xadd("omnistream:q:batch", {"job": doomed})
    deadline = time.monotonic() + 30
    while (record := lb.get(f"/v1/jobs/{doomed}").json())["state"] != "failed":
        assert time.monotonic() < deadline, record["state"]
        time.sleep(0.1)
    assert record["error"]["code"] == "max_deliveries", record["error"]
    assert submit(lb) and wait_state(lb, submit(lb))["state"] == "succeeded"  # still working


def test_queue_and_capacity_are_exported_to_prometheus(cluster: Cluster) -> None:
    text = httpx.get(cluster.nodes[0].http + "/metrics").text
    for name in (
        'omnistream_cluster_queue_depth{class="batch"}',
        'omnistream_cluster_queue_pending{class="interactive"}',
        "omnistream_cluster_reclaims_total",
        'omnistream_cluster_slots{kind="session",state="free"}',
        'omnistream_cluster_slots{kind="job",state="used"}',
        "omnistream_cluster_draining 0.0",
    ):
        assert name in text, name


def test_redis_down_then_back(cluster: Cluster, lb: httpx.Client) -> None:
    cluster.stop_redis()
    try:
        r = httpx.post(
            cluster.nodes[0].http + "/v1/generate",
            json={"task": "text2audio", "inputs": {"prompt": SHORT}, "async_run": True},
            timeout=30,
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "cluster_unavailable"
        assert httpx.get(cluster.nodes[0].http + "/healthz").status_code == 200
    finally:
        cluster.start_redis()
    deadline = time.monotonic() + 20  # the nodes recover by themselves
    while True:
        r = lb.post(
            "/v1/generate",
            json={"task": "text2audio", "inputs": {"prompt": SHORT}, "async_run": True},
        )
        if r.status_code == 200:
            break
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    assert wait_state(lb, r.json()["id"])["state"] == "succeeded"


# -- faults ----------------------------------------------------------------------------


def test_a_hung_node_loses_its_job_and_cannot_write_into_it(
    cluster: Cluster, lb: httpx.Client
) -> None:
    job_id = submit(lb, LONG)
    hung = cluster.node(wait_started(lb, job_id))
    assert hung.proc is not None
    hung.proc.send_signal(signal.SIGSTOP)  # alive, but renews nothing
    try:
        survivor = cluster.node(other(cluster, hung.node_id))
        with httpx.Client(base_url=survivor.http, timeout=60) as b:
            record = wait_state(b, job_id, timeout=60)
    finally:
        hung.proc.send_signal(signal.SIGCONT)
    assert record["state"] == "succeeded" and record["node"] == survivor.node_id
    time.sleep(1.5)  # the woken node notices it lost the job; its writes are fenced off
    again = httpx.get(f"{survivor.http}/v1/jobs/{job_id}").json()
    assert again["state"] == "succeeded" and again["node"] == survivor.node_id
    assert [e["seq"] for e in again["events"]] == list(range(len(again["events"])))
    assert again["events"][-1]["event"] == "job_finished"
    assert submit(lb) and wait_state(lb, submit(lb))["state"] == "succeeded"


def test_sigkill_mid_job_finishes_on_the_other_node(cluster: Cluster, lb: httpx.Client) -> None:
    job_id = submit(lb, LONG)
    victim = wait_started(lb, job_id)
    cluster.node(victim).kill()
    survivor = other(cluster, victim)
    with httpx.Client(base_url=cluster.node(survivor).http, timeout=60) as b:
        record = wait_state(b, job_id, timeout=60)
        assert record["state"] == "succeeded", record["error"]
        assert record["node"] == survivor
        names = [e["event"] for e in record["events"]]
        assert "job_requeued" in names
        started = [e for e in record["events"] if e["event"] == "job_started"]
        assert len(started) == 2 and started[-1]["data"]["attempt"] >= 2
        requeued = next(e for e in record["events"] if e["event"] == "job_requeued")
        assert requeued["data"]["previous_node"] == victim
        assert [e["seq"] for e in record["events"]] == list(range(len(names)))
        audio = b.get(record["result"]["outputs"][0]["url"]).content
        assert wav_seconds(audio) > 20, "the retried run wrote the whole speech"
    # The victim stays down: the next test restarts every node.


def test_every_node_restarted_with_jobs_queued_all_finish(
    cluster: Cluster, lb: httpx.Client
) -> None:
    # One node is down since the previous test: HAProxy sends everything to the other.
    ids = [submit(lb) for _ in range(4)]
    for node in cluster.nodes:
        node.kill()
    # Redis restarts too: the queue comes back from its append-only file.
    cluster.stop_redis()
    cluster.start_redis()
    cluster.start_nodes()
    with httpx.Client(base_url=cluster.nodes[0].http, timeout=60) as a:
        records = [wait_state(a, i, timeout=60) for i in ids]
    assert [r["state"] for r in records] == ["succeeded"] * len(ids), [r["error"] for r in records]


def test_draining_node_takes_no_new_session_while_its_live_one_finishes(
    cluster: Cluster,
) -> None:
    from tests.avatar_client import connect, flashtalk_init, speech_like

    a, b = cluster.nodes

    async def scenario() -> None:
        live = await connect(a.ws + "/")
        assert (await flashtalk_init(live))["type"] == "init_ok"
        a.terminate()  # SIGTERM: drain
        deadline = time.monotonic() + 5
        while (await aget(a.http + "/readyz")).status_code != 503:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        from omnistream.cluster.agent import ask_agent

        assert await ask_agent("127.0.0.1", a.agent_port) == "drain"
        # A new session through HAProxy lands on the other node.
        fresh = await connect(cluster.lb_ws + "/")
        assert (await flashtalk_init(fresh))["type"] == "init_ok"
        assert (await aget(b.http + "/healthz")).json()["live_sessions"] == 1
        assert (await aget(a.http + "/healthz")).json()["live_sessions"] == 1
        async with httpx.AsyncClient(timeout=10) as client:  # nor a WebRTC session
            offer = await client.post(a.http + "/v1/webrtc/offer", json={"sdp": "x"})
            assert offer.status_code == 503
        # Directly at the draining node, a handshake is refused for capacity.
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await connect(a.ws + "/")
        assert refused.value.response.status_code == 503
        # The live session on the draining node still works.
        await live.send(b"AUDI" + speech_like(17920))
        reply = await asyncio.wait_for(live.recv(), 30)
        assert isinstance(reply, bytes) and len(reply) > 1000
        assert a.proc is not None and a.proc.poll() is None, "no exit while a session lives"
        await live.close()
        await fresh.close()

    asyncio.run(scenario())
    assert a.proc is not None
    a.proc.wait(timeout=20)  # drained: the node exits on its own


def test_redis_down_at_start_is_a_clear_error() -> None:
    port = free_port()  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-m", "omnistream.cli", "serve", "--port", str(free_port()),
         "--redis-url", f"redis://127.0.0.1:{port}/0"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert ("Redis at redis://127.0.0.1" in result.stderr and "not reachable" in result.stderr) or (
        "needs the 'cluster' extra" in result.stderr
    )


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_haproxy_config_is_valid(tmp_path: Any) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "omnistream.cli", "cluster", "haproxy-config",
         "--node", "http://10.0.0.5:8000", "--node", "10.0.0.6:8000", "--port", "8080",
         "--maxconn", "12", "--agent-port", "8100", "--no-probe"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    text = result.stdout
    for needle in (
        "balance leastconn",
        "timeout tunnel 1h",
        "option httpchk GET /readyz",
        "retry-on conn-failure empty-response 503",
        "option redispatch",
        "10.0.0.5:8000 maxconn 12",
        "agent-check agent-port 8100",
    ):
        assert needle in text, needle
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_embedded_mode_never_imports_redis() -> None:
    code = (
        "import sys\n"
        "import omnistream.cli, omnistream.transports.app, omnistream.jobs.service\n"
        "from omnistream.transports.app import create_app\n"
        "omnistream.cli.build_parser(); create_app()\n"
        "print('redis' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"


def test_keys_and_ownership_hold_across_nodes(tmp_path: Any) -> None:
    """With API keys on, a job and its files stay its owner's on every node."""
    if missing is not None:
        pytest.skip(missing)
    keys = {"admin": "admin-key-0123456789ab", "alice": "alice-key-0123456789ab",
            "bob": "bob-key-0123456789abcd"}  # fmt: skip
    key_file = tmp_path / "keys.yaml"
    key_file.write_text(
        "keys:\n"
        f"  - {{name: admin, key: {keys['admin']}}}\n"
        f"  - {{name: alice, key: {keys['alice']}, scopes: [generate, tts]}}\n"
        f"  - {{name: bob, key: {keys['bob']}, scopes: [generate, tts]}}\n"
    )
    c = make_cluster(OMNISTREAM_API_KEY_FILE=str(key_file))
    try:
        auth = {who: {"Authorization": f"Bearer {key}"} for who, key in keys.items()}
        a, b = c.nodes
        r = httpx.post(
            a.http + "/v1/generate",
            json={"task": "text2audio", "inputs": {"prompt": SHORT}, "async_run": True},
            headers=auth["alice"],
        )
        job_id = r.json()["id"]
        with httpx.Client(base_url=b.http, headers=auth["alice"], timeout=60) as alice:
            record = wait_state(alice, job_id)
        url = record["result"]["outputs"][0]["url"]
        for node in c.nodes:  # wherever it ran, every node answers alike
            job_url = f"{node.http}/v1/jobs/{job_id}"
            assert httpx.get(job_url, headers=auth["bob"]).status_code == 404
            assert httpx.get(node.http + url, headers=auth["alice"]).status_code == 200
            assert httpx.get(node.http + url, headers=auth["bob"]).status_code == 404
            assert httpx.get(node.http + url, headers=auth["admin"]).status_code == 200
        assert httpx.get(a.http + "/v1/cluster/nodes").status_code == 401
        assert httpx.get(a.http + "/v1/cluster/nodes", headers=auth["admin"]).status_code == 200
    finally:
        c.close()
