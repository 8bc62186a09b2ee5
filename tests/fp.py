"""Test helpers: real forkproxy masters, real origins, raw HTTP on loopback.

Every process started here is stopped by pid; every helper can assert that nothing
(process, pidfile, /dev/shm segment) is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: the shortest deadline any wait gets. A loaded machine (CI, stress-ng in
#: scripts/test-under-load, other jobs on the same cores) can take many times longer than a
#: quiet one, and a deadline only bounds how long a broken test takes to fail: no test
#: asserts speed through wait_for.
WAIT_FLOOR = float(os.environ.get("FORKPROXY_TEST_WAIT_FLOOR", "60"))


def wait_for(cond, timeout=10.0, interval=0.02, what="condition"):
    """Poll cond() until it returns a truthy value; fail the test after
    max(timeout, WAIT_FLOOR) seconds."""
    deadline = time.monotonic() + max(timeout, WAIT_FLOOR)
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def shm_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if "forkproxy" in n}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """TERM a child we started, KILL it if it does not exit in time, and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Origin:
    """The built-in origin (`forkproxy origin`) in its own process."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [PY, "-m", "forkproxy", "origin", "--listen", f"127.0.0.1:{self.port}"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open(self.port), what=f"origin on {self.port}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stats(self) -> dict:
        status, _, body = request(self.port, "GET", "/stats")
        return json.loads(body)

    def stop(self) -> None:
        stop_process(self.proc)


class Proxy:
    """A real forkproxy master (foreground `run`) with a generated config."""

    def __init__(self, tmp_path, upstreams: dict[str, list[str]] | str, *, workers=1,
                 extra: str = "", listener_extra: str = "", upstream_extra: str = "",
                 admin: bool = False, port: int | None = None, start: bool = True,
                 listeners: list[str] | None = None, server_extra: str = ""):
        self.dir = tmp_path
        self.port = port or free_port()
        self.admin_port = free_port() if admin else None
        self.conf = os.path.join(str(tmp_path), "forkproxy.toml")
        self.pidfile = os.path.join(str(tmp_path), "forkproxy.pid")
        self.errlog = os.path.join(str(tmp_path), "error.log")
        self.access_log = os.path.join(str(tmp_path), "access.log")
        if isinstance(upstreams, str):
            upstreams = {"app": [upstreams]}
        self.upstreams = upstreams
        self.workers = workers
        self.extra = extra
        self.listener_extra = listener_extra
        self.upstream_extra = upstream_extra
        self.server_extra = server_extra
        self.listeners = listeners or [f"127.0.0.1:{self.port}"]
        self.proc: subprocess.Popen | None = None
        self.write_config()
        self.shm_before = shm_segments()
        if start:
            self.start()

    def config_text(self) -> str:
        ups = []
        for name, servers in self.upstreams.items():
            srv = ", ".join(f'{{ address = "{s}" }}' for s in servers)
            ups.append(f"[upstream.{name}]\nservers = [{srv}]\n{self.upstream_extra}\n")
        lst = "".join(
            f'[[listener]]\nlisten = "{addr}"\nupstream = "{next(iter(self.upstreams))}"\n'
            f"{self.listener_extra}\n" for addr in self.listeners)
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

            """) + lst + "".join(ups) + self.extra

    def write_config(self, text: str | None = None) -> None:
        with open(self.conf, "w") as f:
            f.write(text if text is not None else self.config_text())

    def start(self) -> None:
        self.proc = subprocess.Popen([PY, "-m", "forkproxy", "run", "-c", self.conf], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: self.ready() or self.proc.poll() is not None, timeout=20,
                 what="proxy workers ready")
        if self.proc.poll() is not None:
            raise AssertionError(f"proxy exited: {self.proc.stderr.read().decode()}\n{self.log()}")
        self.pid = self.proc.pid

    def log(self) -> str:
        try:
            with open(self.errlog) as f:
                return f.read()
        except OSError:
            return ""

    def log_events(self) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def ready(self) -> bool:
        pid = self.proc.pid
        return any(e.get("event") == "workers ready" and e.get("pid") == pid
                   for e in self.log_events())

    def workers_pids(self, master: int | None = None) -> list[int]:
        return [p for p in children_of(master or self.proc.pid) if comm(p).startswith("fp-worker")]

    def manager_pid(self, master: int | None = None) -> int | None:
        found = [p for p in children_of(master or self.proc.pid) if comm(p) == "fp-manager"]
        return found[0] if found else None

    def send(self, sig) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, sig=signal.SIGTERM, timeout=15.0) -> int:
        """Stop the master; returns its exit code; asserts nothing is left behind."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        kids = children_of(self.proc.pid)
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for k in kids:
                _kill(k)
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("master did not stop in time")
        wait_for(lambda: not any(alive(k) for k in kids), timeout=5,
                 what="children of the master to exit")
        assert not os.path.exists(self.pidfile), "pidfile left behind"
        assert shm_segments() <= self.shm_before, "shared memory segment left behind"
        return code

    def kill_all(self) -> None:
        """Last-resort cleanup (fixtures): SIGKILL the master and its children, and any
        master a binary upgrade left in the pidfiles (it is no child of ours)."""
        for path in (self.pidfile, self.pidfile + ".oldbin"):
            try:
                with open(path) as f:
                    pid = int(f.read())
            except (OSError, ValueError):
                continue
            if pid != getattr(self.proc, "pid", None) and _cmd(pid).find(self.conf) >= 0:
                for k in children_of(pid):
                    _kill(k)
                _kill(pid)
        if self.proc is None or self.proc.poll() is not None:
            return
        for k in children_of(self.proc.pid):
            _kill(k)
        self.proc.kill()
        self.proc.wait()


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- raw HTTP ------------------------------------------------------------------------


class Client:
    """A client socket with a read buffer, so pipelined responses can be split."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int = 65536) -> bytes:
        if self.buf:
            data, self.buf = self.buf, b""
            return data
        return self.sock.recv(n)

    def settimeout(self, t) -> None:
        self.sock.settimeout(t)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> Client:
    return Client(port, host, timeout)


def recv_response(c: Client, method: str = "GET") -> tuple[int, dict, bytes, bytes]:
    """Read one HTTP/1.1 response: (status, headers, body, raw head)."""
    buf = c.buf
    c.buf = b""
    while b"\r\n\r\n" not in buf:
        data = c.sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before a full response head: {buf!r}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        key = k.decode().lower()
        headers[key] = (headers[key] + ", " if key in headers else "") + v.strip().decode()
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        c.buf = rest
        return status, headers, b"", head
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            data = c.sock.recv(max(65536, n - len(rest)))
            if not data:
                raise ConnectionError("closed mid-body")
            rest += data
        c.buf = rest[n:]
        return status, headers, rest[:n], head
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += _recv_more(c)
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                rest += _recv_more(c)
            body += rest[:size]
            rest = rest[size + 2 :]
            if size == 0:
                c.buf = rest
                return status, headers, body, head
    body = rest
    while True:
        data = c.sock.recv(65536)
        if not data:
            return status, headers, body, head
        body += data


def _recv_more(c: Client) -> bytes:
    data = c.sock.recv(65536)
    if not data:
        raise ConnectionError("closed mid-chunk")
    return data


def request(port: int, method: str = "GET", path: str = "/", headers: dict | None = None,
            body: bytes = b"", host: str = "127.0.0.1", timeout: float = 10.0):
    """One request on a fresh connection: (status, headers, body)."""
    with connect(port, host, timeout) as c:
        hdrs = {"Host": f"{host}:{port}", "Connection": "close"}
        if body:
            hdrs["Content-Length"] = str(len(body))
        hdrs.update(headers or {})
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
        c.sendall(head.encode() + b"\r\n" + body)
        status, rh, rb, _ = recv_response(c, method)
        return status, rh, rb


def is_closed(c: Client, timeout: float = 3.0) -> bool:
    """True if the peer closed the connection (EOF or reset) within timeout."""
    if c.buf:
        return False
    c.sock.settimeout(timeout)
    try:
        return c.sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
