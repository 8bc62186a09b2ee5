"""Helpers for the hostile-input tests: origins that record or misbehave, raw clients.

RecordingOrigin parses what reaches it with llhttp in strict mode and records every
complete request; a request it cannot parse is recorded as an origin error, so a test
can assert both "the origin saw exactly these requests" and "forkproxy never sent it
anything malformed" (what it gets is always re-framed by the proxy).
"""

from __future__ import annotations

import socket
import threading
import time

import httptools


class Seen:
    """One request as the origin parsed it."""

    __slots__ = ("method", "path", "headers", "body", "conn")

    def __init__(self, method, path, headers, body, conn):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.conn = conn

    def header(self, name: str) -> list[str]:
        n = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.headers if k.lower() == n]

    def __repr__(self):
        return f"Seen({self.method} {self.path} body={len(self.body)}B conn={self.conn})"


class _OriginConn:
    def __init__(self, origin, sock, cid):
        self.origin = origin
        self.sock = sock
        self.cid = cid
        self.parser = httptools.HttpRequestParser(self)
        self.cur = None
        self.done: list[Seen] = []

    def on_message_begin(self):
        self.cur = {"url": b"", "headers": [], "body": b""}

    def on_url(self, url):
        self.cur["url"] += url

    def on_header(self, name, value):
        self.cur["headers"].append((name, value))

    def on_body(self, body):
        self.cur["body"] += body

    def on_message_complete(self):
        c = self.cur
        self.done.append(Seen(self.parser.get_method().decode(), c["url"].decode("latin-1"),
                              c["headers"], c["body"], self.cid))
        self.cur = None

    def run(self):
        sock = self.sock
        try:
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                try:
                    self.parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    self.origin.errors.append(f"upgrade reached the origin: {data[:200]!r}")
                    break
                except httptools.HttpParserError as e:
                    self.origin.errors.append(f"origin could not parse: {e}: {data[:200]!r}")
                    break
                for seen in self.done:
                    with self.origin.lock:
                        self.origin.seen.append(seen)
                    self.origin.respond(self, seen)
                self.done = []
            if self.cur is not None:
                with self.origin.lock:
                    self.origin.incomplete += 1
        finally:
            try:
                sock.close()
            except OSError:
                pass


class RecordingOrigin:
    """A threaded HTTP/1.1 origin that records what it receives (strictly parsed).

    Answers every request 200 with body ``<METHOD> <path> <body length>`` and keeps the
    connection alive. ``/sleep/MS`` waits first."""

    def __init__(self):
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(1024)
        self.port = self.srv.getsockname()[1]
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self.errors: list[str] = []
        self.incomplete = 0
        self.connections = 0
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self):
        while not self._stop:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                cid = self.connections
            threading.Thread(target=_OriginConn(self, c, cid).run, daemon=True).start()

    def respond(self, conn, seen: Seen):
        if seen.path.startswith("/sleep/"):
            time.sleep(int(seen.path.split("/")[2]) / 1000)
        body = f"{seen.method} {seen.path} {len(seen.body)}".encode()
        conn.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    def mark(self) -> int:
        with self.lock:
            return len(self.seen)

    def since(self, mark: int) -> list[Seen]:
        with self.lock:
            return self.seen[mark:]

    def stop(self):
        self._stop = True
        try:
            self.srv.close()
        except OSError:
            pass


class ScriptedOrigin:
    """An origin that answers ``/r/NAME`` with the raw bytes ``responses[NAME]`` (and
    anything else with a small good response), keeping every connection open. Records,
    per upstream connection, the paths it was asked for and whether the proxy closed it,
    so a test can check that a connection is never used again after a bad response."""

    def __init__(self, responses: dict[str, bytes]):
        self.responses = responses
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(256)
        self.port = self.srv.getsockname()[1]
        self.lock = threading.Lock()
        self.conns: dict[int, list[str]] = {}
        self.closed: set[int] = set()
        self._n = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            with self.lock:
                self._n += 1
                cid = self._n
                self.conns[cid] = []
            threading.Thread(target=self._serve, args=(c, cid), daemon=True).start()

    def _serve(self, c, cid):
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = c.recv(65536)
                    if not data:
                        with self.lock:
                            self.closed.add(cid)
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                with self.lock:
                    self.conns[cid].append(path)
                if path.startswith("/r/"):
                    c.sendall(self.responses[path[3:]])
                else:
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood")
        except OSError:
            with self.lock:
                self.closed.add(cid)
        finally:
            c.close()

    def stop(self):
        try:
            self.srv.close()
        except OSError:
            pass


def read_all(sock: socket.socket, timeout: float = 3.0) -> tuple[bytes, bool]:
    """Everything the peer sends until it closes (True) or goes quiet (False)."""
    sock.settimeout(timeout)
    out = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return out, True
            out += data
    except ConnectionResetError:
        return out, True
    except TimeoutError:
        return out, False


def statuses(raw: bytes) -> list[int]:
    """Status codes of the responses in a byte stream (Content-Length framed, or the
    proxy's own small error responses)."""
    out = []
    while raw.startswith(b"HTTP/1.1 "):
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            break
        out.append(int(head[9:12]))
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        if head[9:10] == b"1":
            length = 0
        raw = rest[length:]
    return out


def cpu_seconds(pid: int) -> float:
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    import os

    return len(os.listdir(f"/proc/{pid}/fd"))
