"""Beyond one machine: N omnistream nodes share jobs through Redis, HAProxy places sessions.

``omnistream serve --redis-url redis://HOST:PORT/DB`` turns a node into a cluster member:

* :mod:`.jobs` — the job backend on Redis: one stream per priority class read by one
  consumer group, job state and events in Redis (any node answers for any job), cancel
  over pub/sub, leases renewed with ``XCLAIM … JUSTID`` and reclaimed with ``XAUTOCLAIM``;
* :mod:`.registry` — every node publishes its capacity with a TTL;
* :mod:`.agent` — the HAProxy agent-check port (``ready maxconn:N`` / ``drain``);
* :mod:`.node` — wiring at start-up, the session gate, drain on SIGTERM, the cluster
  routes and their Prometheus metrics;
* :mod:`.files` — artifacts fetched from the node that wrote them, over an internal route
  signed with ``OMNISTREAM_CLUSTER_SECRET``;
* :mod:`.haproxy` — ``omnistream cluster haproxy-config``.

Without ``--redis-url`` none of this is imported and omnistream runs embedded. Only
:mod:`.jobs`, :mod:`.registry` and :mod:`.node` import ``redis`` (the ``cluster`` extra).
"""
