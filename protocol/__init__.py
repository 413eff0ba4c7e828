"""The node's protocol as plain objects: frames, timers and views in, effects out (see ``node.py``).

Rules of this package:
- No sockets, threads, clocks or etcd: the shell (``shardmq.shard``) and the simulation
  (``shardmq.testing.simulation``) drive the same ``NodeCore`` and carry out its ``Effects``.
- Imports ``shardmq.ring``, ``shardmq.router`` and ``shardmq.rebalance`` of shardmq, nothing else.
"""

from .config import ProtocolConfig
from .effects import Effects
from .node import NodeCore
from .view import ClusterView, MemberInfo, SessionView

__all__ = ["ClusterView", "Effects", "MemberInfo", "NodeCore", "ProtocolConfig", "SessionView"]
