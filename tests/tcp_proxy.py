"""The cuttable TCP proxy now lives in ``shardmq.loadtest.tcp_proxy`` (the fault-schedule checker uses it too);
tests keep importing it from here."""

from shardmq.loadtest.tcp_proxy import TcpProxy

__all__ = ["TcpProxy"]
