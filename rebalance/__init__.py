"""Shard rebalancing for shardmq: the pure planner that moves the current Assignment towards the ShardMap target.

Rules: pure (no I/O, clocks, threads or randomness); imports only ``shardmq.ring`` of shardmq.
"""

from .coordinator import Commit, Coordinator, Member, StartHandoff, target_table
from .planner import Move, PlanSummary, apply_flip, next_batch, plan, start_state, summarize

__all__ = [
    "Commit",
    "Coordinator",
    "Member",
    "StartHandoff",
    "target_table",
    "Move", "PlanSummary", "apply_flip", "next_batch", "plan", "start_state", "summarize"]
