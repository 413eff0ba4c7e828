"""Pure shard placement for shardmq: stable key hashing, the immutable ShardMap (target placement) and the
versioned Assignment (current ownership).

Rules: no I/O, clocks, threads or randomness; nothing imported from the rest of
shardmq. Every result is a deterministic function of its arguments.
"""

from .assignment import Assignment, ShardState, promote_survivors
from .hashing import shard_for_key, stable_hash64
from .shard_map import DEFAULT_REPLICATION, DEFAULT_SHARD_COUNT, ShardMap

__all__ = [
    "DEFAULT_REPLICATION",
    "DEFAULT_SHARD_COUNT",
    "Assignment",
    "ShardMap",
    "ShardState",
    "promote_survivors",
    "shard_for_key",
    "stable_hash64",
]
