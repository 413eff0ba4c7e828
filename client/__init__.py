"""shardmq client SDK: ``from shardmq.client import Client``."""

from .client import Client, Message, ShardMQError

__all__ = ["Client", "Message", "ShardMQError"]
