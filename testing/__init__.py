"""shardmq.testing: let an application test itself against shardmq (the idea of ``structlog.testing``).

What it offers:

- ``LocalCluster`` (``testing/cluster.py``): a real cluster on this machine, a private etcd and N shard node
  processes on loopback ports chosen at start, everything recorded in ``DIR/cluster.json`` and stopped by pid.
  It is what shardmq's own real-cluster tests and load tests use, and what ``shardmq cluster up|down|restart``
  drive. ``up()`` returns once every node sees every member and the assignment is balanced, ``down()`` stops
  exactly what was started; ``join``, ``leave``, ``remove``, ``stop_node`` and ``restart`` change membership
  under a test. Connect with ``shardmq.client.Client(cluster.state.client_endpoints(),
  credentials=cluster.admin_credentials)``; ``add_credentials`` makes principals with narrower ACLs.
- ``Sim`` (``testing/simulation.py``): a cluster in one process, every node the real protocol core
  (``shardmq.protocol.NodeCore``) on a simulated network, etcd and clock; the driver chooses every step (deliver a
  frame, advance the clock, crash, partition, restart, etcd down...), so a run is repeatable. ``testing/simulate.py``
  (``python -m shardmq.testing.simulate``) runs a seeded random fault schedule on it and prints what it found.

Rules of this package:

- It is a public API for users' tests: what ``__all__`` names here is kept stable; anything else (names with a
  leading underscore, helpers not listed) may change.
- Importing it has no side effects: no process, socket, thread, temp dir or logging configuration until a
  method is called. It does not import pytest, so it serves any test runner; the fixture is the user's (see
  "Testing your application against shardmq" in README.md).
- Every process a ``LocalCluster`` starts is stopped by ``down()`` (and by ``up()`` itself when it fails), by
  pid, after checking the pid still runs the recorded command line; nothing else on the machine is touched.
- ``cli/`` parses arguments and prints; ``tests/`` and ``loadtest/`` import clusters from here, never from
  ``cli``.
"""

from .cluster import (
    STATE_FILE,
    ClusterState,
    LocalCluster,
    Proc,
    Restarted,
    etcd_binary,
    free_port,
    pid_runs,
    port_free,
    stop_proc,
)
from .simulation import Sim, SimConfig

__all__ = [
    "STATE_FILE",
    "ClusterState",
    "LocalCluster",
    "Proc",
    "Restarted",
    "Sim",
    "SimConfig",
    "etcd_binary",
    "free_port",
    "pid_runs",
    "port_free",
    "stop_proc",
]
