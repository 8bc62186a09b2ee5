"""`forkproxy tune`: measure this host and recommend ``workers_per_core``.

It starts the built-in origin and a forkproxy in front of it (``workers = "auto"``, workers
pinned with ``cpu_affinity = "auto"`` as in production), then for ``workers_per_core`` =
1..N drives it with wrk (not pinned) and reads the proxy's CPU time from /proc. The
recommendation is the smallest count within 3% of the best throughput: more workers than
that only cost memory and upstream connections.

The origin, the proxy and the load generator share this host's CPUs, so the numbers are
about this host as a whole; run it on the machine that will serve the traffic.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

#: how to get a load generator when wrk is not on PATH
WRK_HINT = ("wrk is not installed: it is the load generator `forkproxy tune` drives. "
            "Install it (Debian/Ubuntu: apt-get install wrk; Fedora: dnf install wrk; "
            "or build it from https://github.com/wg/wrk) and run `forkproxy tune` again.")
EXIT_NO_WRK = 3
WITHIN = 0.97  # a count within 3% of the best throughput is as good

CONFIG = """\
# written by `forkproxy tune`
[server]
workers = "auto"
workers_per_core = {per_core}
cpu_affinity = "auto"
pidfile = "{run}/forkproxy.pid"
graceful_timeout = "5s"

[log]
format = "json"
error_log = "{run}/error.log"
access_log = "{run}/access.log"

[admin]
listen = ""

[[listener]]
listen = "127.0.0.1:{port}"
upstream = "origin"

[upstream.origin]
servers = [{{ address = "127.0.0.1:{origin}" }}]
"""


@dataclass
class Settings:
    max_per_core: int = 3
    duration: float = 5.0
    rounds: int = 2
    connections: int = 64
    path: str = "/tiny"

    @classmethod
    def quick(cls) -> Settings:
        """A short run (tests, a first look): 1..2 per core, 1 s, one round."""
        return cls(max_per_core=2, duration=1.0, rounds=1, connections=16)


@dataclass
class Result:
    per_core: int
    workers: int
    rps: float
    cpu_us: float  # proxy CPU (master, manager, workers) per request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: tune\r\nConnection: close\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


def _cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, ValueError, IndexError):
            continue
    return total / tick


def _wrk(wrk: str, port: int, s: Settings, seconds: float) -> float:
    """Requests per second from one wrk run."""
    threads = max(1, min(len(os.sched_getaffinity(0)), s.connections))
    out = subprocess.run([wrk, f"-t{threads}", f"-c{s.connections}", f"-d{seconds:g}s",
                          f"http://127.0.0.1:{port}{s.path}"], capture_output=True, text=True,
                         timeout=seconds + 60)
    m = re.search(r"^Requests/sec:\s+([\d.]+)", out.stdout, re.M)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed: {out.stdout}{out.stderr}")
    if "Non-2xx or 3xx responses" in out.stdout:
        raise RuntimeError(f"the proxy answered errors under load: {out.stdout}")
    return float(m.group(1))


class _Proxy:
    """One forkproxy master with a given workers_per_core, stopped by its pid."""

    def __init__(self, run: str, port: int, origin: int, per_core: int):
        self.run, self.port = run, port
        conf = os.path.join(run, f"tune-{per_core}.toml")
        with open(conf, "w") as f:
            f.write(CONFIG.format(per_core=per_core, run=run, port=port, origin=origin))
        self.proc = subprocess.Popen([sys.executable, "-m", "forkproxy", "run", "-c", conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: self._ready() or self.proc.poll() is not None, 60, "the proxy's workers")
        if self.proc.poll() is not None:
            raise RuntimeError(f"the proxy exited ({self.proc.returncode}); see {run}/error.log")

    def _ready(self) -> bool:
        try:
            with open(os.path.join(self.run, "error.log")) as f:
                lines = f.readlines()
        except OSError:
            return False
        for line in lines:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == "workers ready" and e.get("pid") == self.proc.pid:
                return True
        return False

    def workers(self) -> int:
        return len([p for p in _tree(self.proc.pid) if _comm(p).startswith("fp-worker")])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _measure(wrk: str, proxy: _Proxy, per_core: int, s: Settings) -> Result:
    _wrk(wrk, proxy.port, s, min(1.0, s.duration))  # warm-up: pools, caches
    rates, cpu = [], []
    for _ in range(s.rounds):
        pids = _tree(proxy.proc.pid)
        c0 = _cpu_seconds(pids)
        rps = _wrk(wrk, proxy.port, s, s.duration)
        rates.append(rps)
        cpu.append((_cpu_seconds(pids) - c0) / max(1.0, rps * s.duration) * 1e6)
    return Result(per_core, proxy.workers(), statistics.median(rates), statistics.median(cpu))


def recommend(results: list[Result]) -> Result:
    """The fewest workers within 3% of the best throughput."""
    best = max(r.rps for r in results)
    return min((r for r in results if r.rps >= WITHIN * best), key=lambda r: r.per_core)


def tune(s: Settings, out=sys.stdout) -> list[Result]:
    """Measure 1..s.max_per_core workers per core; print a line for each."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise FileNotFoundError(WRK_HINT)
    run = tempfile.mkdtemp(prefix="forkproxy-tune-")
    origin_port, port = _free_port(), _free_port()
    origin = subprocess.Popen([sys.executable, "-m", "forkproxy", "origin", "--listen",
                               f"127.0.0.1:{origin_port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    results: list[Result] = []
    try:
        _wait(lambda: _answers(origin_port), 60, "the built-in origin")
        cpus = len(os.sched_getaffinity(0))
        print(f"forkproxy tune: {cpus} usable CPUs; built-in origin; wrk -c{s.connections} "
              f"GET {s.path}, {s.duration:g} s x {s.rounds} per count", file=out, flush=True)
        for k in range(1, s.max_per_core + 1):
            proxy = _Proxy(run, port, origin_port, k)
            try:
                r = _measure(wrk, proxy, k, s)
            finally:
                proxy.stop()
            results.append(r)
            print(f"workers_per_core = {k}: {r.workers:3d} workers {r.rps:10.0f} req/s "
                  f"{r.cpu_us:7.1f} us proxy CPU/req", file=out, flush=True)
    finally:
        origin.send_signal(signal.SIGTERM)
        try:
            origin.wait(30)
        except subprocess.TimeoutExpired:
            origin.kill()
            origin.wait()
        shutil.rmtree(run, ignore_errors=True)
    return results


def main(s: Settings, out=sys.stdout) -> int:
    try:
        results = tune(s, out)
    except FileNotFoundError as e:
        print(f"forkproxy tune: {e}", file=sys.stderr)
        return EXIT_NO_WRK
    except RuntimeError as e:
        print(f"forkproxy tune: {e}", file=sys.stderr)
        return 1
    pick = recommend(results)
    cpus = len(os.sched_getaffinity(0))
    print(f"\nrecommended: workers_per_core = {pick.per_core} ({pick.workers} workers on {cpus} "
          f"usable CPUs: the fewest within 3% of the best throughput)\nconfig line:\n"
          f"  [server]\n  workers = \"auto\"\n  workers_per_core = {pick.per_core}",
          file=out, flush=True)
    return 0
