"""Pure shard placement for shardmq: stable key hashing and the immutable ShardMap.

Rules: no I/O, clocks, threads or randomness; nothing imported from the rest of
shardmq. Every result is a deterministic function of its arguments.
"""

from .hashing import shard_for_key, stable_hash64
from .shard_map import DEFAULT_REPLICATION, DEFAULT_SHARD_COUNT, ShardMap

__all__ = ["DEFAULT_REPLICATION", "DEFAULT_SHARD_COUNT", "ShardMap", "shard_for_key", "stable_hash64"]
