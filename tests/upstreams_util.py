"""Helpers for the upstream tests (issue 6): a proxy with a hand-written upstream/route
section, raw in-process origins with scripted misbehaviour, a WebSocket echo origin, a
pipelining client, the access log, and TCP socket counts from /proc/net/tcp."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import textwrap
import threading
import time

from fp import Client, Proxy, recv_response, request, wait_for


class UProxy(Proxy):
    """A Proxy whose [upstream.*] and [[route]] sections are given verbatim (``body``);
    the listener's default upstream is ``default``."""

    def __init__(self, tmp_path, body: str, *, default: str = "app", **kw):
        self.body = textwrap.dedent(body)
        self.default = default
        super().__init__(tmp_path, {default: []}, **kw)

    def config_text(self) -> str:
        admin = f'listen = "127.0.0.1:{self.admin_port}"' if self.admin_port else 'listen = ""'
        return textwrap.dedent(f"""\
            [server]
            workers = {self.workers}
            pidfile = "{self.pidfile}"
            graceful_timeout = "5s"
            {self.server_extra}

            [log]
            format = "json"
            level = "info"
            error_log = "{self.errlog}"
            access_log = "{self.access_log}"

            [admin]
            {admin}

            [[listener]]
            listen = "127.0.0.1:{self.port}"
            upstream = "{self.default}"

            """) + self.body

    def status(self) -> dict:
        return json.loads(request(self.admin_port, "GET", "/status")[2])

    def metrics(self) -> str:
        return request(self.admin_port, "GET", "/metrics")[2].decode()

    def server_status(self, upstream: str, address: str) -> dict:
        for s in self.status()["upstreams"][upstream]["servers"]:
            if s["address"] == address:
                return s
        raise KeyError(address)

    def reload(self, body: str) -> None:
        """Rewrite the upstream section, HUP, wait until the new generation serves."""
        import signal

        self.body = textwrap.dedent(body)
        self.write_config()
        gen = len([e for e in self.log_events() if e.get("event") == "reload complete"])
        self.send(signal.SIGHUP)
        wait_for(lambda: len([e for e in self.log_events()
                              if e.get("event") == "reload complete"]) > gen,
                 timeout=20, what="reload complete")
        wait_for(lambda: len(self.workers_pids()) == self.workers, timeout=10,
                 what="old workers gone")


def metric_value(text: str, name: str, **labels) -> float:
    total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else float("nan")


# -- clients -------------------------------------------------------------------------


def get(path: str, host: str = "t", headers: dict | None = None, rid: str = "") -> bytes:
    h = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
    if rid:
        h += f"X-Request-Id: {rid}\r\n"
    for k, v in (headers or {}).items():
        h += f"{k}: {v}\r\n"
    return (h + "\r\n").encode()


def pipelined(port: int, reqs: list[bytes], conns: int = 4, batch: int = 64,
              timeout: float = 30.0) -> list[tuple[int, bytes]]:
    """Send the requests over ``conns`` keep-alive connections, ``batch`` at a time;
    returns [(status, body)] in request order."""
    out: list = [None] * len(reqs)
    errors: list = []

    def run(indexes):
        try:
            c = Client(port, timeout=timeout)
            for start in range(0, len(indexes), batch):
                chunk = indexes[start:start + batch]
                c.sendall(b"".join(reqs[i] for i in chunk))
                for i in chunk:
                    status, _, body, _ = recv_response(c)
                    out[i] = (status, body)
            c.close()
        except Exception as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=run, args=(list(range(k, len(reqs), conns)),))
               for k in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    if errors:
        raise errors[0]
    return out


def access_entries(p: Proxy, count: int | None = None, timeout: float = 10.0) -> list[dict]:
    """The access log's entries (waits until there are at least ``count``)."""
    def read():
        try:
            with open(p.access_log) as f:
                lines = [json.loads(line) for line in f if line.strip()]
        except OSError:
            return []
        return lines if count is None or len(lines) >= count else []
    if count is None:
        return read()
    return wait_for(read, timeout=timeout, what=f"{count} access log lines")


# -- sockets -------------------------------------------------------------------------

ESTABLISHED, CLOSE_WAIT = "01", "08"


def tcp_sockets() -> list[tuple[int, int, str]]:
    """[(local port, remote port, state hex)] of every TCP socket on the host."""
    out = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    lport = int(parts[1].rsplit(":", 1)[1], 16)
                    rport = int(parts[2].rsplit(":", 1)[1], 16)
                    out.append((lport, rport, parts[3]))
        except OSError:
            pass
    return out


def open_to(port: int) -> int:
    """Client-side sockets connected to ``port`` (ESTABLISHED or CLOSE_WAIT)."""
    return sum(1 for _, r, st in tcp_sockets() if r == port and st in (ESTABLISHED, CLOSE_WAIT))


def open_at(port: int) -> int:
    """Server-side sockets of ``port`` (accepted connections still ESTABLISHED)."""
    return sum(1 for lp, _, st in tcp_sockets() if lp == port and st == ESTABLISHED)


# -- scripted origins ----------------------------------------------------------------


class RawOrigin:
    """A TCP origin served by threads in the test process. ``behaviour(sock, head,
    origin)`` is called for each request head; it answers (or not) and returns True
    to keep the connection."""

    def __init__(self, behaviour, port: int = 0):
        self.behaviour = behaviour
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", port))
        self.srv.listen(256)
        self.port = self.srv.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.connections = 0
        self.requests = 0
        self.lock = threading.Lock()
        self.socks: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self.socks.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = c.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                with self.lock:
                    self.requests += 1
                if not self.behaviour(c, head, self, buf):
                    return
                buf = b""
        except OSError:
            pass
        finally:
            try:
                c.close()
            except OSError:
                pass

    def stop(self):
        self.closed = True
        self.srv.close()
        with self.lock:
            for c in self.socks:
                try:
                    c.close()
                except OSError:
                    pass


def answer(status: int, body: bytes = b"x"):
    def behaviour(c, head, origin, rest):
        c.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))
        return True
    return behaviour


def truncate(c, head, origin, rest):
    """A response head promising 1000 bytes, 10 of them, then a close."""
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
    time.sleep(0.01)
    return False


def hang_up(c, head, origin, rest):
    """Read the request, close without a byte."""
    return False


# -- WebSocket -----------------------------------------------------------------------

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def ws_frame(payload: bytes, opcode: int = 1, mask: bool = True) -> bytes:
    head = bytes([0x80 | opcode])
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack(">Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def ws_read_frame(recv) -> tuple[int, bytes]:
    """(opcode, payload) using ``recv(n)`` that returns exactly n bytes."""
    b0, b1 = recv(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack(">H", recv(2))[0]
    elif n == 127:
        n = struct.unpack(">Q", recv(8))[0]
    key = recv(4) if b1 & 0x80 else None
    data = recv(n) if n else b""
    if key:
        data = bytes(b ^ key[i % 4] for i, b in enumerate(data))
    return b0 & 0x0F, data


def exact_reader(sock, initial: bytes = b""):
    buf = bytearray(initial)

    def recv(n):
        while len(buf) < n:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            buf.extend(data)
        out = bytes(buf[:n])
        del buf[:n]
        return out
    return recv


def ws_echo(c, head, origin, rest):
    """The 101 handshake, then echo every frame (unmasked) until a close frame."""
    key = b""
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"sec-websocket-key":
            key = v.strip()
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + ws_accept(key) + b"\r\n\r\n")
    recv = exact_reader(c, rest)
    while True:
        op, data = ws_read_frame(recv)
        if op == 8:
            c.sendall(ws_frame(data, 8, mask=False))
            return False
        c.sendall(ws_frame(data, op, mask=False))


def call(port: int, method: str = "GET", path: str = "/", host: str = "t", body: bytes = b"",
         timeout: float = 10.0) -> tuple[int, bytes]:
    """One request with this Host on a fresh connection (closed after): (status, body)."""
    from fp import connect

    with connect(port, timeout=timeout) as c:
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        if body:
            head += f"Content-Length: {len(body)}\r\n"
        c.sendall(head.encode() + b"\r\n" + body)
        status, _, rbody, _ = recv_response(c, method)
        return status, rbody
