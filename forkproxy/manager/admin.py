"""The admin endpoint: a tiny HTTP/1.1 server in the manager.

Routes (GET and HEAD only):

  /metrics                  Prometheus text exposition (metrics.py)
  /status                   JSON: master_pid, generation, config, workers [...]
  /healthz                  200 "ok" while a worker heart-beat within HEALTHY_WITHIN s
  /debug/profile?pid=P&seconds=N[&hz=H][&format=json]
                            CPU profile of worker P: collapsed stacks (profiling.py)
  /debug/greenlets?pid=P[&limit=N]
                            greenlets alive in worker P, grouped by stack (JSON)
  /debug/phases[?format=text]
                            the critical-path report per route and upstream (phases.py)

Access: when ``admin.token`` is set, every request needs ``Authorization: Bearer TOKEN``
(401 otherwise); config validation makes a token mandatory for a non-loopback
``admin.listen``, and a non-loopback admin without one refuses everything (403).

The server is deliberately small (no request bodies, 16 KiB heads, keep-alive with an
idle timeout): it runs in the manager next to the collector and must never stall it.
The request logic (:meth:`Admin.dispatch`) is separate from the socket code.
"""

from __future__ import annotations

import json
import socket as pysocket
import time

# CPython's constant-time comparison: hmac's (OpenSSL's CRYPTO_memcmp) comes with
# hashlib, which maps and initialises libcrypto in a config without TLS
from _operator import _compare_digest as compare_digest
from urllib.parse import parse_qs, urlsplit

import gevent
from gevent import socket
from gevent.server import StreamServer

from forkproxy.config import parse_listen
from forkproxy.manager import phases, profiling
from forkproxy.manager.metrics import CONTENT_TYPE as METRICS_TYPE
from forkproxy.netif import resolve
from forkproxy.osutil import is_loopback

HEALTHY_WITHIN = 5.0
MAX_HEAD = 16 * 1024
IDLE_TIMEOUT = 30.0
READ_TIMEOUT = 10.0
MAX_CONNECTIONS = 64

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
            413: "Payload Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


class Response:
    __slots__ = ("status", "body", "ctype", "headers")

    def __init__(self, status: int, body: bytes | str, ctype: str = "text/plain; charset=utf-8",
                 headers: list[tuple[str, str]] | None = None):
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.ctype = ctype
        self.headers = headers or []


def json_response(obj, status: int = 200) -> Response:
    return Response(status, json.dumps(obj, indent=1) + "\n", "application/json")


def is_loopback_listen(listen: str) -> bool:
    addr = parse_listen(listen)
    return is_loopback(addr.host, addr.iface)


class Admin:
    """Routes admin requests to the manager (``source``) and serves them on sockets.

    ``source`` provides ``metrics_text()``, ``status()``, ``healthy()`` and
    ``worker_pids()`` (see forkproxy.manager.process.Manager).
    """

    def __init__(self, source, logger=None):
        self.source = source
        self.logger = logger
        self.token = ""
        self.open = True  # False: a non-loopback listen without a token (refuse all)
        self.listen = ""
        self.servers: list[StreamServer] = []
        self._retry: gevent.Greenlet | None = None

    # -- request logic ------------------------------------------------------------------

    def configure_access(self, listen: str, token: str) -> None:
        self.token = token
        self.open = bool(token) or not listen or is_loopback_listen(listen)

    def authorized(self, headers: dict[str, str]) -> Response | None:
        """None if the request may proceed, else the refusal."""
        if not self.open:
            return Response(403, "admin listens on a non-loopback address without a token\n")
        if not self.token:
            return None
        got = headers.get("authorization", "")
        if compare_digest(got.encode(), f"Bearer {self.token}".encode()):
            return None
        return Response(401, "unauthorized\n", headers=[("WWW-Authenticate", 'Bearer realm="forkproxy"')])

    def dispatch(self, method: str, target: str, headers: dict[str, str]) -> Response:
        refused = self.authorized(headers)
        if refused is not None:
            return refused
        if method not in ("GET", "HEAD"):
            return Response(405, "method not allowed\n", headers=[("Allow", "GET, HEAD")])
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path
        try:
            if path == "/metrics":
                return Response(200, self.source.metrics_text(), METRICS_TYPE)
            if path == "/status":
                return json_response(self.source.status())
            if path == "/healthz":
                if self.source.healthy():
                    return Response(200, "ok\n")
                return Response(503, "no worker heart-beat\n")
            if path == "/debug/profile":
                return self._profile(query)
            if path == "/debug/greenlets":
                return self._greenlets(query)
            if path == "/debug/phases":
                rep = self.source.phases_report()
                if query.get("format") == "text":
                    return Response(200, phases.render(rep))
                return json_response(rep)
            if path == "/":
                return Response(200, "forkproxy admin: /metrics /status /healthz "
                                     "/debug/profile?pid=P&seconds=N /debug/greenlets?pid=P "
                                     "/debug/phases\n")
        except profiling.DebugError as e:
            return Response(e.status, f"{e}\n")
        except (ValueError, KeyError) as e:
            return Response(400, f"bad request: {e}\n")
        return Response(404, "not found\n")

    def _target_pid(self, query: dict) -> int:
        pids = self.source.worker_pids()
        if "pid" not in query:
            if len(pids) == 1:
                return pids[0]
            raise profiling.DebugError(400, f"pid=PID required; workers: {sorted(pids)}")
        pid = int(query["pid"])
        if pid not in pids:
            raise profiling.DebugError(404, f"{pid} is not a worker; workers: {sorted(pids)}")
        return pid

    def _profile(self, query: dict) -> Response:
        pid = self._target_pid(query)
        seconds = float(query.get("seconds", "10"))
        if not 0 < seconds <= profiling.MAX_SECONDS:
            raise ValueError(f"seconds must be in (0, {profiling.MAX_SECONDS:g}]")
        hz = int(query.get("hz", "100"))
        if not 1 <= hz <= profiling.MAX_HZ:
            raise ValueError(f"hz must be in [1, {profiling.MAX_HZ}]")
        result = profiling.ask_worker(pid, {"cmd": "profile", "seconds": seconds, "hz": hz},
                                      timeout=seconds + 10.0)
        if query.get("format") == "json":
            return json_response(result)
        return Response(200, profiling.collapsed(result), headers=[
            ("X-Samples", str(result.get("samples", 0))),
            ("X-CPU-Seconds", str(result.get("cpu_seconds", 0))),
        ])

    def _greenlets(self, query: dict) -> Response:
        pid = self._target_pid(query)
        limit = int(query.get("limit", "50"))
        return json_response(profiling.ask_worker(pid, {"cmd": "greenlets", "limit": limit},
                                                  timeout=30.0))

    # -- sockets ------------------------------------------------------------------------

    @staticmethod
    def bind(listen: str) -> list:
        """Listening sockets for ``listen`` (all addresses it resolves to)."""
        addr = parse_listen(listen)
        socks = []
        try:
            for fam, sa in resolve(addr):
                s = pysocket.socket(fam, pysocket.SOCK_STREAM)
                socks.append(s)
                s.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
                if fam == pysocket.AF_INET6:
                    s.setsockopt(pysocket.IPPROTO_IPV6, pysocket.IPV6_V6ONLY, 1)
                s.bind(sa)
                s.listen(128)
                s.setblocking(False)
        except Exception:
            for s in socks:
                s.close()
            raise
        return socks

    def serve(self, listen: str, token: str, socks: list | None = None) -> bool:
        """Serve on ``listen`` (pre-bound ``socks`` if given); False if it cannot bind.

        Leaves the current servers running when the new address cannot be bound.
        """
        self.configure_access(listen, token)
        if listen == self.listen and self.servers and socks is None:
            return True
        if not listen:
            self.stop()
            self.listen = ""
            return True
        if socks is None:
            try:
                socks = self.bind(listen)
            except Exception as e:
                if self.logger is not None:
                    self.logger.error("cannot listen on the admin address, will retry",
                                      listen=listen, error=str(getattr(e, "strerror", None) or e))
                self._schedule_retry(listen, token)
                return False
        self.stop()
        self.listen = listen
        for s in socks:
            srv = StreamServer(socket.socket(fileno=s.detach()), self._handle,
                               spawn=MAX_CONNECTIONS)
            srv.start()
            self.servers.append(srv)
        if self.logger is not None:
            self.logger.info("admin listening", listen=listen,
                             addresses=[_fmt(s.address) for s in self.servers])
        return True

    def _schedule_retry(self, listen: str, token: str) -> None:
        if self._retry is not None:
            self._retry.kill(block=False)

        def retry():
            while True:
                gevent.sleep(5.0)
                try:
                    socks = self.bind(listen)
                except Exception:
                    continue
                self._retry = None
                self.serve(listen, token, socks)
                return

        self._retry = gevent.spawn(retry)

    def stop(self) -> None:
        if self._retry is not None:
            self._retry.kill(block=False)
            self._retry = None
        for srv in self.servers:
            srv.stop(timeout=0.5)
        self.servers = []

    @property
    def addresses(self) -> list[tuple]:
        return [srv.address for srv in self.servers]

    def _handle(self, sock, addr) -> None:
        buf = b""
        try:
            while True:
                sock.settimeout(IDLE_TIMEOUT if not buf else READ_TIMEOUT)
                while b"\r\n\r\n" not in buf:
                    if len(buf) > MAX_HEAD:
                        _send(sock, Response(431, "request head too large\n"), False, False)
                        return
                    data = sock.recv(16384)
                    if not data:
                        return
                    buf += data
                    sock.settimeout(READ_TIMEOUT)
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                    _send(sock, Response(400, "bad request line\n"), False, False)
                    return
                method, target, version = parts
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if not sep or not name or name != name.strip():
                        _send(sock, Response(400, "bad header\n"), False, False)
                        return
                    headers[name.lower()] = value.strip()
                if "transfer-encoding" in headers or int(headers.get("content-length", "0") or 0):
                    _send(sock, Response(413, "request bodies are not accepted\n"), False, False)
                    return
                conn_tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
                keep = ("close" not in conn_tokens if version == "HTTP/1.1"
                        else "keep-alive" in conn_tokens)
                t0 = time.monotonic()
                try:
                    resp = self.dispatch(method, target, headers)
                except Exception as e:
                    if self.logger is not None:
                        self.logger.exception("admin request failed", path=target, error=str(e))
                    resp = Response(500, "internal error\n")
                if self.logger is not None and time.monotonic() - t0 > 1.0 and \
                        not target.startswith("/debug/"):
                    self.logger.warning("slow admin request", path=target,
                                        seconds=round(time.monotonic() - t0, 3))
                _send(sock, resp, keep, method == "HEAD")
                if not keep:
                    return
        except (OSError, TimeoutError, ValueError, UnicodeError):
            return
        finally:
            sock.close()


def _send(sock, resp: Response, keep: bool, head_only: bool) -> None:
    reason = _REASONS.get(resp.status, "Unknown")
    lines = [f"HTTP/1.1 {resp.status} {reason}", f"Content-Type: {resp.ctype}",
             f"Content-Length: {len(resp.body)}", "Cache-Control: no-store"]
    lines += [f"{k}: {v}" for k, v in resp.headers]
    if not keep:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    sock.sendall(head if head_only else head + resp.body)


def _fmt(sa) -> str:
    host, port = sa[0], sa[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
