"""shardmq client SDK: ``from shardmq.client import Client``.

Flavours, all shells around one protocol core (``shardmq.client.core``): ``Client`` (blocking),
``shardmq.client.green.GreenClient`` (gevent) and ``shardmq.client.aio.AsyncClient`` (asyncio).
"""

from .client import Client, Message, ShardMQError, Will

__all__ = ["Client", "Message", "ShardMQError", "Will"]
