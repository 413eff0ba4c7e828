"""A TCP proxy on loopback that a test can cut and heal, to isolate one node from etcd and from its peers.

It forwards every accepted connection to ``target``. ``cut()`` closes every open connection and makes new ones
close at once (a partition as seen by TCP); ``heal()`` lets connections through again. Threads are daemons and
``close()`` stops them; nothing outside 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    def __init__(self, target_port: int, record: bool = False) -> None:
        self.target = ("127.0.0.1", target_port)
        # Every byte it forwarded, both directions, when ``record``: what a wiretap on the link would see.
        self.recorded: bytearray | None = bytearray() if record else None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.blocked = threading.Event()
        self.closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.blocked.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            # The 2 s bound is for connecting only: left on, an idle etcd watch stream would be cut every 2 s.
            upstream.settimeout(None)
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self.blocked.is_set():
                    break
                if self.recorded is not None:
                    with self._lock:
                        self.recorded += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)

    def cut(self) -> None:
        self.blocked.set()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def heal(self) -> None:
        self.blocked.clear()

    def close(self) -> None:
        self.closed.set()
        self.cut()
        self.listener.close()
