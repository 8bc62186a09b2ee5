"""A small load client for lifecycle tests: threads of keep-alive and Connection: close
clients against one port, counting every request's outcome and latency.

A request sent on a *reused* keep-alive connection that the server closed before any
response byte is retried once on a fresh connection, as HTTP clients do for idempotent
requests (RFC 9112 9.3.1); such retries are counted separately. A failure is a request
that got no response, a reset, or a status other than the expected one.
"""

from __future__ import annotations

import threading
import time

from fp import Client, recv_response


class LoadResult:
    def __init__(self):
        self.ok = 0
        self.failed = 0
        self.retried = 0
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.lock = threading.Lock()

    def p(self, q: float) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(len(lat) * q))] * 1000 if lat else 0.0

    def summary(self) -> str:
        return (f"sent={self.ok + self.failed} ok={self.ok} failed={self.failed} "
                f"retried={self.retried} p50={self.p(0.5):.1f}ms p99={self.p(0.99):.1f}ms")


class Load:
    """Start with .start(); .stop() joins and returns the LoadResult."""

    def __init__(self, port: int, keepalive_threads: int = 4, close_threads: int = 2,
                 path: str = "/tiny", expect: bytes = b"ok"):
        self.port = port
        self.path = path
        self.expect = expect
        self.result = LoadResult()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._keepalive, daemon=True)
                         for _ in range(keepalive_threads)]
        self._threads += [threading.Thread(target=self._close, daemon=True)
                          for _ in range(close_threads)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> LoadResult:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        return self.result

    def _record(self, ok: bool, latency: float, error: str = "") -> None:
        r = self.result
        with r.lock:
            if ok:
                r.ok += 1
                r.latencies.append(latency)
            else:
                r.failed += 1
                if len(r.errors) < 20:
                    r.errors.append(error)

    def _one(self, c: Client, close: bool) -> tuple[bool, bool, str]:
        """(answered ok, connection still usable, error)."""
        req = b"GET %s HTTP/1.1\r\nHost: load\r\n%s\r\n" % (
            self.path.encode(), b"Connection: close\r\n" if close else b"")
        c.sendall(req)
        status, headers, body, _ = recv_response(c)
        if status != 200 or body != self.expect:
            return False, False, f"status {status} body {body[:40]!r}"
        return True, headers.get("connection", "").lower() != "close", ""

    def _keepalive(self) -> None:
        c = None
        reused = False
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                if c is None:
                    c = Client(self.port, timeout=10)
                    reused = False
                try:
                    ok, usable, err = self._one(c, False)
                except (ConnectionError, OSError) as e:
                    if not reused:
                        raise
                    # the keep-alive race: retry once on a fresh connection
                    with self.result.lock:
                        self.result.retried += 1
                    c.close()
                    c = Client(self.port, timeout=10)
                    reused = False
                    ok, usable, err = self._one(c, False)
                    _ = e
                self._record(ok, time.monotonic() - t0, err)
                reused = True
                if not usable:
                    c.close()
                    c = None
            except (TimeoutError, ConnectionError, OSError) as e:
                self._record(False, 0, f"{type(e).__name__}: {e}")
                if c is not None:
                    c.close()
                c = None
        if c is not None:
            c.close()

    def _close(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                with Client(self.port, timeout=10) as c:
                    ok, _, err = self._one(c, True)
                self._record(ok, time.monotonic() - t0, err)
            except (TimeoutError, ConnectionError, OSError) as e:
                self._record(False, 0, f"{type(e).__name__}: {e}")
