"""The built-in origin and `forkproxy demo`.

The origin is a small gevent HTTP/1.1 server used by the demo and by the tests. Paths:

  /                 a short greeting          /tiny            "ok"
  /bytes/N          N bytes, Content-Length   /chunked/N       N bytes, chunked
  /echo             request body streamed back (chunked)
  /upload           consumes the body, answers "LENGTH SHA256"
  /headers          the request headers as JSON
  /sleep/MS         answers after MS milliseconds
  /status/CODE      answers with that status   /close          answers, then closes
  /stats            {"connections": N, "requests": M} seen by this origin
  /healthz          "ok"
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import tempfile
import time

PATTERN = bytes(range(256)) * 256  # 64 KiB of a known pattern for /bytes and /chunked


def pattern_bytes(n: int):
    """Yield n bytes of the repeating 0..255 pattern in 64 KiB pieces."""
    while n > 0:
        piece = PATTERN if n >= len(PATTERN) else PATTERN[:n]
        yield piece
        n -= len(piece)


class _OriginConnection:
    def __init__(self, sock, stats):
        import httptools

        self.sock = sock
        self.stats = stats
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers = []
        self.body_mode = None
        self.hasher = None
        self.length = 0
        self.done = False
        self.close = False

    def on_message_begin(self):
        self.url = b""
        self.headers = []
        self.body_mode = None
        self.hasher = None
        self.length = 0

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self):
        self.stats["requests"] += 1
        path = self.url.split(b"?")[0]
        if path == b"/echo":
            self.body_mode = "echo"
            self.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n")
        elif path == b"/upload":
            self.body_mode = "hash"
            self.hasher = hashlib.sha256()

    def on_body(self, body):
        self.length += len(body)
        if self.body_mode == "echo":
            self.sock.sendall(b"%x\r\n%s\r\n" % (len(body), body))
        elif self.body_mode == "hash":
            self.hasher.update(body)

    def on_message_complete(self):
        keep = self.parser.should_keep_alive()
        path = self.url.split(b"?")[0].decode("latin-1")
        method = self.parser.get_method().decode()
        if self.body_mode == "echo":
            self.sock.sendall(b"0\r\n\r\n")
        elif self.body_mode == "hash":
            self._reply(200, f"{self.length} {self.hasher.hexdigest()}\n".encode(), keep)
        else:
            self._route(method, path, keep)
        if not keep:
            self.close = True

    def _reply(self, status, body, keep, ctype=b"text/plain", extra=b"", head_only=False):
        head = (b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n"
                % (status, ctype, len(body), extra, b"" if keep else b"Connection: close\r\n"))
        self.sock.sendall(head if head_only else head + body)

    def _route(self, method, path, keep):
        head_only = method == "HEAD"
        if path == "/tiny":
            self._reply(200, b"ok", keep, head_only=head_only)
        elif path == "/" or path == "/healthz":
            self._reply(200, b"hello from the forkproxy demo origin\n" if path == "/" else b"ok",
                        keep, head_only=head_only)
        elif path.startswith("/bytes/"):
            n = int(path[7:])
            self.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                              b"Content-Length: %d\r\n\r\n" % n)
            if not head_only:
                for piece in pattern_bytes(n):
                    self.sock.sendall(piece)
        elif path.startswith("/chunked/"):
            n = int(path[9:])
            self.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n")
            for piece in pattern_bytes(n):
                self.sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.sock.sendall(b"0\r\n\r\n")
        elif path == "/headers":
            body = json.dumps({"method": method, "path": self.url.decode("latin-1"),
                               "headers": self.headers}).encode()
            self._reply(200, body, keep, b"application/json")
        elif path.startswith("/sleep/"):
            import gevent

            gevent.sleep(int(path[7:]) / 1000.0)
            self._reply(200, b"slept\n", keep)
        elif path.startswith("/slow/"):
            import gevent

            # the head at once, then 5 body bytes spread over N ms: the body phase dominates
            pause = int(path[6:]) / 5000.0
            self.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n%s\r\n"
                              % (b"" if keep else b"Connection: close\r\n"))
            for _ in range(5):
                gevent.sleep(pause)
                self.sock.sendall(b"x")
        elif path.startswith("/status/"):
            code = int(path[8:])
            if code in (204, 304):
                self.sock.sendall(b"HTTP/1.1 %d X\r\n\r\n" % code)
            else:
                self._reply(code, b"status %d\n" % code, keep)
        elif path == "/close":
            self._reply(200, b"closing\n", False)
            self.close = True
        elif path == "/stats":
            self._reply(200, json.dumps(self.stats).encode(), keep, b"application/json")
        else:
            self._reply(404, b"not found\n", keep)


def run_origin(host: str = "127.0.0.1", port: int = 9000, ready_fd: int | None = None) -> int:
    """Serve the demo origin until SIGTERM/SIGINT."""
    import gevent
    from gevent.server import StreamServer

    stats = {"connections": 0, "requests": 0}

    def handle(sock, addr):
        import httptools

        stats["connections"] += 1
        conn = _OriginConnection(sock, stats)
        try:
            while not conn.close:
                data = sock.recv(65536)
                if not data:
                    break
                conn.parser.feed_data(data)
        except (OSError, httptools.HttpParserError):
            pass
        finally:
            sock.close()

    server = StreamServer((host, port), handle, backlog=1024)
    server.start()
    if ready_fd is not None:
        os.write(ready_fd, b"%d\n" % server.server_port)
        os.close(ready_fd)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    gevent.signal_handler(signal.SIGINT, server.stop)
    server.serve_forever()
    return 0


DEMO_CONFIG = """\
# written by `forkproxy demo`
[server]
workers = 2
pidfile = "{run}/forkproxy.pid"
graceful_timeout = "5s"

[log]
format = "console"
access_log = "{run}/access.log"

[admin]
listen = "127.0.0.1:{admin}"

[[listener]]
listen = "127.0.0.1:{port}"
upstream = "demo"

[upstream.demo]
servers = [{{ address = "127.0.0.1:{origin}" }}]
"""


def run_demo(port: int, origin_port: int, admin_port: int) -> int:
    """Start the built-in origin and the proxy in front of it; stop both on Ctrl-C."""
    import subprocess

    run = tempfile.mkdtemp(prefix="forkproxy-demo-")
    cfg_path = os.path.join(run, "forkproxy.toml")
    with open(cfg_path, "w") as f:
        f.write(DEMO_CONFIG.format(run=run, port=port, origin=origin_port, admin=admin_port))
    origin = subprocess.Popen([sys.executable, "-m", "forkproxy", "origin", "--listen",
                               f"127.0.0.1:{origin_port}"])
    proxy = subprocess.Popen([sys.executable, "-m", "forkproxy", "run", "-c", cfg_path])
    print(f"""
forkproxy demo: origin on 127.0.0.1:{origin_port}, proxy on 127.0.0.1:{port}, config {cfg_path}

Try:
  curl -i http://127.0.0.1:{port}/
  curl -s http://127.0.0.1:{port}/headers
  curl -s -o /dev/null -w '%{{size_download}}\\n' http://127.0.0.1:{port}/bytes/10485760
  curl -s --data-binary @/etc/os-release http://127.0.0.1:{port}/upload
  curl -s http://127.0.0.1:{admin_port}/status
  curl -s http://127.0.0.1:{admin_port}/metrics | head -30
  tail -f {run}/access.log
Ctrl-C stops.
""", flush=True)
    try:
        while proxy.poll() is None and origin.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in (proxy, origin):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (proxy, origin):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        import shutil

        shutil.rmtree(run, ignore_errors=True)
    return 0
