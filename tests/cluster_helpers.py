"""A real cluster on loopback for tests and the bench: redis-server, omnistream nodes, HAProxy.

Every piece is the real program started as its own process on free ports; nothing is
faked. Tests skip when ``redis-server`` or ``haproxy`` is not installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.server import free_port

NODE_START_TIMEOUT_S = 90.0
SECRET = "test-cluster-secret"


def binaries_missing() -> str | None:
    """Why the cluster cannot run here (``None`` when it can)."""
    for name in ("redis-server", "haproxy"):
        if shutil.which(name) is None:
            return f"{name} is not installed (apt-get install redis-server haproxy)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis package is not installed (pip install 'omnistream[cluster]')"
    return None


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until ``url`` answers 200 (or fail when the process died)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")
        time.sleep(0.1)


@dataclass
class Node:
    """One ``omnistream serve`` process of the cluster."""

    node_id: str
    port: int
    agent_port: int
    artifacts: Path
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def launch(self, redis_url: str) -> None:
        """Start the process (returns at once; see :meth:`wait_ready`)."""
        cmd = [
            sys.executable, "-m", "omnistream.cli", "serve",
            "--port", str(self.port),
            "--redis-url", redis_url,
            "--node-id", self.node_id,
            "--agent-port", str(self.agent_port),
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=os.environ | self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self) -> None:
        wait_http(f"{self.http}/healthz", NODE_START_TIMEOUT_S, self.proc)

    def kill(self) -> None:
        """SIGKILL: the node dies mid-whatever, as a crashed machine would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self) -> None:
        """SIGTERM: the node drains and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


@dataclass
class Cluster:
    """Redis (AOF on), N nodes and HAProxy in front of them."""

    tmp: Path
    redis_port: int
    nodes: list[Node]
    haproxy_port: int
    redis_proc: subprocess.Popen[bytes] | None = None
    haproxy_proc: subprocess.Popen[bytes] | None = None
    haproxy_cfg: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def lb(self) -> str:
        return f"http://127.0.0.1:{self.haproxy_port}"

    @property
    def lb_ws(self) -> str:
        return f"ws://127.0.0.1:{self.haproxy_port}"

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.node_id == node_id)

    def start_redis(self) -> None:
        self.redis_proc = subprocess.Popen(
            [
                "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                "--dir", str(self.tmp), "--daemonize", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.redis_port).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop_redis(self) -> None:
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.terminate()
            self.redis_proc.wait(timeout=10)

    def start_nodes(self, nodes: list[Node] | None = None) -> None:
        chosen = nodes or self.nodes
        for node in chosen:
            node.launch(self.redis_url)
        for node in chosen:
            node.wait_ready()

    def start_haproxy(self) -> None:
        from omnistream.cluster.haproxy import render, targets

        text = render(
            targets([n.http for n in self.nodes], maxconn=None, agent_port=None),
            port=self.haproxy_port,
            bind="127.0.0.1",
        )
        self.haproxy_cfg = self.tmp / "haproxy.cfg"
        self.haproxy_cfg.write_text(text)
        with open(self.tmp / "haproxy.log", "ab") as log:
            self.haproxy_proc = subprocess.Popen(
                ["haproxy", "-f", str(self.haproxy_cfg), "-db"],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        wait_http(f"{self.lb}/healthz", 20, self.haproxy_proc)

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        if self.haproxy_proc is not None and self.haproxy_proc.poll() is None:
            self.haproxy_proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.haproxy_proc.wait(timeout=10)
        self.stop_redis()
        shutil.rmtree(self.tmp, ignore_errors=True)


def make_cluster(n: int = 2, **settings: str) -> Cluster:
    """Start Redis, ``n`` nodes and HAProxy (``settings``: extra OMNISTREAM_* variables)."""
    tmp = Path(tempfile.mkdtemp(prefix="omnicluster-"))
    nodes = []
    for index in range(n):
        name = "ab"[index] if n <= 2 else str(index)
        env = {
            "OMNISTREAM_LOG_LEVEL": "warning",
            "OMNISTREAM_CLUSTER_SECRET": SECRET,
            "OMNISTREAM_ARTIFACTS_DIR": str(tmp / f"artifacts-{name}"),
            "OMNISTREAM_CLUSTER_LEASE_S": "2.5",
            "OMNISTREAM_CLUSTER_NODE_TTL_S": "10",
            "OMNISTREAM_MAX_SESSIONS": "2",
            "OMNISTREAM_MAX_RUNNING_JOBS": "1",
            "OMNISTREAM_DRAIN_GRACE_S": "30",
            "HF_HUB_OFFLINE": "1",
        } | settings
        nodes.append(
            Node(f"node-{name}", free_port(), free_port(), tmp / f"artifacts-{name}", env,
                 tmp / f"node-{name}.log")
        )
    cluster = Cluster(tmp, free_port(), nodes, free_port())
    try:
        cluster.start_redis()
        cluster.start_nodes()
        cluster.start_haproxy()
    except BaseException:
        cluster.close()
        raise
    return cluster
