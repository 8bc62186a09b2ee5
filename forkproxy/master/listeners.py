"""Listening sockets, owned by the master: one SO_REUSEPORT socket per listener address
and worker slot.

Why per slot: with one inherited socket, gevent's accept loop lets one worker take a
whole burst (measured 100/0, docs/ARCHITECTURE.md); a reuseport socket per worker lets the kernel
spread connections. Why owned by the master: a new-generation worker on reload takes over
the very same socket as the old worker of its slot, so the accept queue is never closed
and no connection is refused during a reload (closing a reuseport socket drops its queue
unless net.ipv4.tcp_migrate_req is on; the master turns it on when it can).
"""

from __future__ import annotations

import os
import socket

from forkproxy.config import parse_listen
from forkproxy.netif import BindError, resolve


def _bind_one(fam: int, sa: tuple, backlog: int) -> socket.socket:
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if fam == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sa)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise BindError(f"cannot listen on {_fmt(sa)}: {e.strerror}")
    return sock


def _fmt(sa: tuple) -> str:
    return f"[{sa[0]}]:{sa[1]}" if ":" in sa[0] else f"{sa[0]}:{sa[1]}"


class BoundListener:
    """The sockets of one `listen` value: sockets[slot] is a list, one per address."""

    def __init__(self, text: str, backlog: int):
        self.text = text
        self.key = parse_listen(text)
        self.backlog = backlog
        self.addrs = resolve(self.key)
        self.sockets: list[list[socket.socket]] = []

    @property
    def port(self) -> int:
        if self.sockets:
            return self.sockets[0][0].getsockname()[1]
        return self.key.port

    def ensure_slots(self, n: int) -> None:
        while len(self.sockets) < n:
            socks = []
            try:
                for fam, sa in self.addrs:
                    if sa[1] == 0 and self.sockets:
                        # port 0: every slot must share the port the first one got
                        sa = (sa[0], self.port) + tuple(sa[2:])
                    s = _bind_one(fam, sa, self.backlog)
                    if sa[1] == 0:
                        port = s.getsockname()[1]
                        self.addrs = [(f, (a[0], port) + tuple(a[2:])) for f, a in self.addrs]
                    socks.append(s)
            except BindError:
                for s in socks:
                    s.close()
                raise
            self.sockets.append(socks)

    def trim_slots(self, n: int) -> None:
        while len(self.sockets) > n:
            for s in self.sockets.pop():
                s.close()

    def close(self) -> None:
        self.trim_slots(0)

    def fds(self) -> list[list[int]]:
        return [[s.fileno() for s in socks] for socks in self.sockets]

    @classmethod
    def from_fds(cls, text: str, backlog: int, fds: list[list[int]]) -> BoundListener:
        """Adopt sockets inherited from a previous master (binary upgrade)."""
        self = cls.__new__(cls)
        self.text = text
        self.key = parse_listen(text)
        self.backlog = backlog
        self.sockets = [[socket.socket(fileno=fd) for fd in slot] for slot in fds]
        for slot in self.sockets:
            for s in slot:
                s.setblocking(False)
                os.set_inheritable(s.fileno(), False)
        self.addrs = [(s.family, s.getsockname()) for s in self.sockets[0]] if self.sockets else resolve(self.key)
        return self


def enable_migrate_req() -> bool:
    """Let the kernel move queued connections of a closed reuseport socket to its
    siblings (Linux >= 5.14), so removing a worker slot refuses nothing."""
    path = "/proc/sys/net/ipv4/tcp_migrate_req"
    try:
        with open(path) as f:
            if f.read().strip() == "1":
                return True
        with open(path, "w") as f:
            f.write("1")
        return True
    except OSError:
        return False
