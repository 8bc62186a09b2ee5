"""Side-by-side benchmark of forkproxy, nginx and HAProxy (and optionally proxy.py).

Used by ``scripts/bench`` and ``scripts/memprobe``. Standard library only: the proxies
under test are separate processes, measured from the outside through /proc.

Method (docs/BENCHMARKS.md has the long form):

* one nginx origin (1 worker) serves /tiny (2 bytes), /static/1k and /static/1m;
* every proxy runs with the same worker count, pinned to the "proxy" CPUs; the origin,
  the load generator (wrk, openssl s_time) and this driver are pinned to the others;
* per scenario the proxies are measured interleaved (A B C A B C ...), R rounds each,
  after one unrecorded warm-up run per proxy;
* proxy CPU per request = utime+stime (/proc/PID/stat) of all the proxy's processes
  (master, workers, helpers; threads included) after the run minus before, over the
  requests wrk completed. It is the figure that survives a noisy shared machine;
* PSS = sum of Pss in /proc/PID/smaps_rollup over the proxy's processes, sampled in the
  middle of each run (and once at idle after start-up);
* "other CPU" = CPU time used during the run by processes outside the benchmark (from
  /proc/stat minus proxy, origin and load generator), in % of one core: the noise.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "scripts", "bench-configs")
VENV_PY = os.path.join(ROOT, ".venv", "bin", "python")
#: the interpreter forkproxy itself runs under (memprobe: a venv of its runtime
#: dependencies alone, scripts/memlib.py)
PROXY_PY = VENV_PY
RESULTS = os.path.join(ROOT, "bench-results")
DOCS = os.path.join(ROOT, "docs", "BENCHMARKS.md")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXYPY_VENV = "/tmp/fp-bench-proxypy-venv"
PYSPY_VENV = "/tmp/pyspy-venv"

#: exit status when prerequisites cannot be installed (not root): tests skip on it
EXIT_SKIP = 77

#: Debian packages providing the tools
PACKAGES = {"wrk": "wrk", "nginx": "nginx-light", "haproxy": "haproxy", "openssl": "openssl",
            "taskset": "util-linux", "h2load": "nghttp2-client"}

WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max))
end
"""


class Scenario:
    def __init__(self, name, title, *, kind="wrk", path="/tiny", close=False, tls=False,
                 stime_mode="", tls_version="", unit="req", upstream_tls=False, grpc=False):
        self.name = name
        self.title = title
        self.kind = kind  # "wrk", "stime" or "h2load"
        self.path = path
        self.close = close
        self.tls = tls
        self.stime_mode = stime_mode
        self.tls_version = tls_version
        self.unit = unit
        self.upstream_tls = upstream_tls  # the proxy talks TLS to a TLS origin
        self.grpc = grpc  # gRPC unary calls, h2c from the client and to the origin

    def in_flight(self, args) -> int:
        """Requests the load generator keeps in flight at once: what an idle upstream
        pool must hold for a saturated worker to stop opening connections."""
        if self.kind == "h2load":
            return H2LOAD_CLIENTS * H2LOAD_STREAMS
        if self.kind == "wrk":
            return args.connections
        return 1  # openssl s_time: one connection at a time


#: h2load's clients and streams per client (-c, -m) in the HTTP/2 and gRPC scenarios
H2LOAD_CLIENTS = 32
H2LOAD_STREAMS = 10
#: the bench's idle upstream pool when no scenario needs more (both proxies' keepalive)
KEEPALIVE_MIN = 64


#: the gRPC scenario's method, and its message (the same both ways), length-prefixed
GRPC_PATH = "/bench.Echo/Unary"
GRPC_MESSAGE = b"x" * 32
GRPC_FRAMED = b"\x00" + len(GRPC_MESSAGE).to_bytes(4, "big") + GRPC_MESSAGE
GRPC_HEADERS = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
#: one real gRPC call through a proxy (grpcio, a test dependency, in the project venv):
#: the reply's bytes and the status from the trailers, which h2load does not read
GRPC_CHECK = """
import sys, grpc
with grpc.insecure_channel(sys.argv[1]) as ch:
    reply, call = ch.unary_unary(sys.argv[2]).with_call(sys.argv[3].encode(), timeout=10)
print(call.code().name, reply.decode())
"""


SCENARIOS = {s.name: s for s in [
    Scenario("tiny", "tiny body (2 B), keep-alive", path="/tiny"),
    Scenario("1k", "1 KiB body, keep-alive", path="/static/1k"),
    Scenario("1m", "1 MiB body, keep-alive", path="/static/1m"),
    Scenario("close", "tiny body, `Connection: close` (new TCP connection per request)",
             close=True),
    Scenario("tls", "TLS keep-alive, tiny body", tls=True),
    Scenario("tls-close", "TLS, new connection per request (full handshake each, wrk)",
             tls=True, close=True),
    Scenario("tls-upstream", "HTTPS to the origin (verified, keep-alive, sessions reused), "
             "plain keep-alive client, tiny body", upstream_tls=True),
    Scenario("tls12-new", "TLS 1.2 full handshakes, no request (openssl s_time -new)",
             kind="stime", tls=True, stime_mode="-new", tls_version="-tls1_2", unit="conn",
             path=""),
    Scenario("tls12-resume", "TLS 1.2 resumed handshakes (session ticket), no request "
             "(openssl s_time -reuse)", kind="stime", tls=True, stime_mode="-reuse",
             tls_version="-tls1_2", unit="conn", path=""),
    Scenario("tls12-new-req", "TLS 1.2 full handshake + GET /tiny (HTTP/1.0) per connection "
             "(s_time -new -www)", kind="stime", tls=True, stime_mode="-new",
             tls_version="-tls1_2", unit="conn"),
    Scenario("tls12-resume-req", "TLS 1.2 resumed handshake + GET /tiny (HTTP/1.0) per "
             "connection (s_time -reuse -www)", kind="stime", tls=True, stime_mode="-reuse",
             tls_version="-tls1_2", unit="conn"),
    Scenario("tls13-new", "TLS 1.3 full handshakes, no request (openssl s_time -new)",
             kind="stime", tls=True, stime_mode="-new", tls_version="-tls1_3", unit="conn",
             path=""),
    Scenario("tls13-resume", "TLS 1.3 resumed handshakes, no request (openssl s_time -reuse)",
             kind="stime", tls=True, stime_mode="-reuse", tls_version="-tls1_3", unit="conn",
             path=""),
    Scenario("h2", "HTTP/2 over TLS (ALPN h2), 2 KiB body, h2load -c 32 -m 10",
             kind="h2load", tls=True, path="/static/2k"),
    Scenario("grpc", "gRPC unary calls, 32-byte message each way, h2c from the client and to "
             "the origin (nginx answering with grpc-status trailers), h2load -c 32 -m 10",
             kind="h2load", path=GRPC_PATH, grpc=True),
]}
DEFAULT_SCENARIOS = ["tiny", "1k", "1m", "close", "tls", "tls-close", "tls12-new",
                     "tls12-resume"]

#: issue 7's targets: (scenario, metric, proxy compared with, comparison, bound, text)
TARGETS = [
    ("tiny", "cpu", "nginx", "<=", 2.5, "tiny keep-alive: CPU/request <= 2.5x nginx"),
    ("tiny", "rps", "nginx", ">=", 0.5, "tiny keep-alive: req/s >= 0.5x nginx"),
    ("close", "cpu", "nginx", "<=", 3.0, "tiny Connection: close: CPU/request <= 3x nginx"),
    ("1m", "rps", "nginx", ">=", 0.8, "1 MiB keep-alive: req/s >= 0.8x nginx"),
    ("tls", "cpu", "nginx", "<=", 3.0, "TLS keep-alive: CPU/request <= 3x nginx"),
    ("tls-upstream", "cpu", "nginx", "<=", 2.0,
     "HTTPS upstream keep-alive: CPU/request <= 2x nginx (proxy_ssl)"),
    ("tls12-resume", "rps", "tls12-new", ">=", 3.0,
     "TLS 1.2 resumed handshakes/s >= 3x full handshakes/s (forkproxy's own)"),
    ("tiny", "rps", "proxy.py", ">=", 5.0, "tiny keep-alive: req/s >= 5x proxy.py"),
    # issue 14's
    ("h2", "cpu", "nginx", "<=", 2.0, "HTTP/2 (TLS, 2 KiB): CPU/request <= 2x nginx"),
    ("h2", "rps", "nginx", ">=", 0.5, "HTTP/2 (TLS, 2 KiB): req/s >= 0.5x nginx"),
    # issue 15's
    ("grpc", "cpu", "nginx", "<=", 2.0, "gRPC unary (h2c): CPU/call <= 2x nginx (grpc_pass)"),
]


# -- small helpers -----------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_list(cpus) -> str:
    return ",".join(str(c) for c in cpus)


def read_stat(pid: int):
    """(ppid, utime+stime ticks, starttime, stime ticks) of a process, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if rest[0] in ("Z", "X"):
        return None
    return int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[19]), int(rest[12])


def process_table() -> dict[int, tuple]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_stat(int(entry))
            if st is not None:
                table[int(entry)] = st
    return table


def tree(pid: int, table: dict | None = None) -> list[int]:
    """pid and all its descendants (alive)."""
    table = process_table() if table is None else table
    if pid not in table:
        return []
    children: dict[int, list[int]] = {}
    for p, st in table.items():
        children.setdefault(st[0], []).append(p)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_snapshot(pids) -> dict[tuple[int, int], tuple[int, int]]:
    """{(pid, starttime): (utime+stime ticks, stime ticks)}"""
    snap = {}
    for pid in pids:
        st = read_stat(pid)
        if st is not None:
            snap[(pid, st[2])] = (st[1], st[3])
    return snap


def cpu_delta(before: dict, after: dict) -> tuple[float, float, list[str]]:
    """CPU seconds (total, system) used between two snapshots of a proxy's tree, and
    notes on processes that appeared (counted whole) or vanished (last interval lost)."""
    ticks = sys_ticks = 0
    notes = []
    for key, (t, st) in after.items():
        if key in before:
            ticks += t - before[key][0]
            sys_ticks += st - before[key][1]
        else:
            ticks += t
            sys_ticks += st
            notes.append(f"process {key[0]} appeared during the run")
    for key in before:
        if key not in after:
            notes.append(f"process {key[0]} exited during the run")
    return ticks / CLK_TCK, sys_ticks / CLK_TCK, notes


def sched_ns(pids) -> dict[tuple[int, int], int]:
    """{(pid, starttime): CPU nanoseconds of all its threads} from /proc/PID/task/*/schedstat
    (the scheduler's own count: /proc/PID/stat's 10 ms ticks are too coarse for the
    manager's few µs per request)."""
    out = {}
    for pid in pids:
        st = read_stat(pid)
        if st is None:
            continue
        ns = 0
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    ns += int(f.read().split()[0])
        out[(pid, st[2])] = ns
    return out


class IpiCount:
    """Inter-processor interrupts the proxy's processes sent during a run (perf's
    ``ipi:ipi_send_cpu`` tracepoint on their pids; None without perf or the
    tracepoint). A send that wakes a process sleeping on the other CPU costs one; on a
    VM each is ~10-20 µs of the sender's system time, and how many a proxy sends per
    request sets which mode forkproxy's worker runs in at -c64 (docs/BENCHMARKS.md,
    "The worker's two modes at -c64"). Counted whatever else runs on the machine."""

    def __init__(self, pids, path: str):
        self.path = path
        self.proc = None
        if shutil.which("perf") is None or not pids:
            return
        with contextlib.suppress(OSError):
            self.proc = subprocess.Popen(
                ["perf", "stat", "-x,", "-e", "ipi:ipi_send_cpu", "-o", path,
                 "-p", ",".join(str(p) for p in pids)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        with contextlib.suppress(OSError, ValueError), open(self.path) as f:
            for line in f:
                fields = line.split(",")
                if len(fields) > 2 and fields[2].startswith("ipi:") and fields[0].isdigit():
                    return int(fields[0])
        return None


def pss_kib(pids) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def busy_ticks() -> int:
    """All CPUs' busy time (user+nice+system+irq+softirq+steal), ticks."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    vals = [int(x) for x in parts[1:]]
    return vals[0] + vals[1] + vals[2] + vals[5] + vals[6] + vals[7]


def http_get(port: int, path: str = "/tiny", *, tls: bool = False, timeout: float = 2.0,
             host: str = "bench") -> tuple[int, int]:
    """(status, body bytes) of one GET with Connection: close; raises OSError."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            sock = ctx.wrap_socket(sock, server_hostname="localhost")
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ssl.SSLError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    if not m:
        raise OSError(f"no HTTP response from port {port} ({data[:60]!r})")
    return int(m.group(1)), len(body)


# -- processes -----------------------------------------------------------------------------


class Procs:
    """Every process the benchmark starts, stopped by pid (whole tree) on exit."""

    def __init__(self):
        self.items: list[tuple[str, subprocess.Popen, int]] = []

    def start(self, name: str, cmd: list[str], *, log_path: str | None = None,
              stop_sig: int = signal.SIGTERM, cwd: str | None = None,
              env: dict | None = None) -> subprocess.Popen:
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 cwd=cwd, env=env, process_group=0)
        finally:
            if log_path:
                out.close()
        self.items.append((name, p, stop_sig))
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 15.0) -> None:
        entry = next((it for it in self.items if it[1] is p), None)
        sig = entry[2] if entry else signal.SIGTERM
        if entry:
            self.items.remove(entry)
        if p.poll() is not None:
            return
        table = process_table()
        family = [(pid, table[pid][2]) for pid in tree(p.pid, table)]
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait(5)
        # leftovers of the tree (same pid and start time: never a recycled pid)
        deadline = time.monotonic() + 5
        for pid, start in family[1:]:
            while True:
                st = read_stat(pid)
                if st is None or st[2] != start:
                    break
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.05)

    def stop_all(self) -> None:
        for _name, p, _sig in reversed(list(self.items)):
            try:
                self.stop(p)
            except Exception as e:  # keep cleaning up the others
                log(f"cleanup of pid {p.pid} failed: {e}")


def children_cpu() -> float:
    ru = os.times()
    return ru.children_user + ru.children_system


# -- set-up --------------------------------------------------------------------------------


def ensure_tools(tools: list[str]) -> str | None:
    """Install missing tools from Debian's packages; an error text if impossible."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return None
    pkgs = sorted({PACKAGES[t] for t in missing})
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return (f"missing {', '.join(missing)}; install as root: "
                f"apt-get install -y {' '.join(pkgs)}")
    log(f"installing {' '.join(pkgs)} (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
    r = subprocess.run(["apt-get", "install", "-y", "-qq", *pkgs], env=env, check=False)
    still = [t for t in tools if shutil.which(t) is None]
    if r.returncode != 0 or still:
        return f"apt-get install {' '.join(pkgs)} failed; still missing: {', '.join(still)}"
    return None


def ensure_venv() -> None:
    if not os.path.exists(VENV_PY):
        log("no .venv: running scripts/setup")
        subprocess.run([os.path.join(ROOT, "scripts", "setup")], check=True)


def cpu_layout(workers: int, pin: bool) -> tuple[list[int], list[int]]:
    """(load CPUs for wrk + origin + driver, proxy CPUs). Proxies get the last CPUs."""
    usable = sorted(os.sched_getaffinity(0))
    if not pin or len(usable) < 2:
        return usable, usable
    nproxy = min(workers, len(usable) - 1)
    return usable[:-nproxy], usable[-nproxy:]


def make_cert(run: str) -> tuple[str, str, str]:
    """Self-signed ECDSA P-256 certificate: (cert, key, cert+key pem for HAProxy)."""
    cert, key = os.path.join(run, "cert.pem"), os.path.join(run, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "7", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    both = os.path.join(run, "cert+key.pem")
    with open(both, "w") as out:
        for p in (cert, key):
            with open(p) as f:
                out.write(f.read())
    return cert, key, both


def render(template: str, values: dict[str, str], dest: str) -> str:
    with open(os.path.join(CONFIGS, template)) as f:
        text = f.read()
    for k, v in values.items():
        text = text.replace(f"@{k}@", str(v))
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise RuntimeError(f"{template}: unreplaced {left}")
    with open(dest, "w") as f:
        f.write(text)
    return dest


def wait_ready(check, proc: subprocess.Popen | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} during start-up")
        try:
            if check():
                return
        except (OSError, ssl.SSLError) as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s ({last})")


def tail(path: str, n: int = 8) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = f.read().strip().splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


#: the OTLP/HTTP receiver of --tracing and scripts/tracecost: reads each export request
#: and answers 200 (argv[1]: the port, 0 = any, printed; argv[2]: a file it writes the
#: number of export requests to)
OTLP_RECEIVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
count = 0
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        global count
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        count += 1
        if len(sys.argv) > 2:
            with open(sys.argv[2], "w") as f:
                f.write(str(count))
    def log_message(self, *a):
        pass
s = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


class Env:
    """Scratch dir, certificates, CPU layout and the nginx origin."""

    def __init__(self, args, procs: Procs):
        self.args = args
        self.procs = procs
        self.workers = args.workers
        #: idle upstream connections both proxies keep (forkproxy's keepalive, nginx's
        #: keepalive N): the same meaning, the same number
        self.keepalive = getattr(args, "keepalive", None) or KEEPALIVE_MIN
        self.load_cpus, self.proxy_cpus = cpu_layout(args.workers, not args.no_pin)
        self.run = tempfile.mkdtemp(prefix="fp-bench-")
        os.chmod(self.run, 0o755)  # nginx workers run as nobody: they read www/
        self.cert, self.key, self.pem = make_cert(self.run)
        self.origin_port = free_port()
        self.origin_tls_port = free_port()  # the same origin through TLS (tls-upstream)
        self.origin_grpc_port = free_port()  # the same origin over h2c, answering gRPC
        self.grpc_body = os.path.join(self.run, "grpc-request.bin")  # h2load's request body
        self.origin = None
        self.otlp_url = ""  # the OTLP/HTTP receiver's (--tracing)
        self.otlp_count = ""  # the file where it counts the export requests it got

    def start_otlp_receiver(self) -> None:
        """A minimal OTLP/HTTP receiver (reads each export request, answers 200) on the
        load CPUs, for the proxies that export spans (--tracing)."""
        port = free_port()
        self.otlp_count = os.path.join(self.run, "otlp-requests")
        proc = self.procs.start("otlp receiver", [*self.taskset(self.load_cpus),
                                                  sys.executable, "-c", OTLP_RECEIVER,
                                                  str(port), self.otlp_count])

        def accepting() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return True
            return False

        wait_ready(accepting, proc, 10, "OTLP receiver")
        self.otlp_url = f"http://127.0.0.1:{port}/v1/traces"

    def taskset(self, cpus) -> list[str]:
        return ["taskset", "-c", cpu_list(cpus)]

    def start_origin(self) -> None:
        www = os.path.join(self.run, "www", "static")
        os.makedirs(www)
        with open(os.path.join(www, "1k"), "wb") as f:
            f.write(os.urandom(1024))
        with open(os.path.join(www, "2k"), "wb") as f:
            f.write(os.urandom(2048))
        with open(os.path.join(www, "1m"), "wb") as f:
            f.write(os.urandom(1024 * 1024))
        grpc_dir = os.path.join(self.run, "www", os.path.dirname(GRPC_PATH).lstrip("/"))
        os.makedirs(grpc_dir)
        for path in (os.path.join(self.run, "www", GRPC_PATH.lstrip("/")), self.grpc_body):
            with open(path, "wb") as f:
                f.write(GRPC_FRAMED)
        for d in (os.path.join(self.run, "www"), www, grpc_dir):
            os.chmod(d, 0o755)
        conf = render("origin.conf", {"RUN": self.run, "ORIGIN_PORT": self.origin_port,
                                      "ORIGIN_TLS_PORT": self.origin_tls_port,
                                      "ORIGIN_GRPC_PORT": self.origin_grpc_port,
                                      "CERT": self.cert, "KEY": self.key},
                      os.path.join(self.run, "origin.conf"))
        errlog = os.path.join(self.run, "origin-startup.log")
        self.origin = self.procs.start(
            "origin", [*self.taskset(self.load_cpus), "nginx", "-p", self.run + "/", "-e",
                       errlog, "-c", conf, "-g", "daemon off;"], log_path=errlog)
        wait_ready(lambda: http_get(self.origin_port, "/static/1k") == (200, 1024),
                   self.origin, 10, "nginx origin")

    def origin_pids(self) -> list[int]:
        return tree(self.origin.pid) if self.origin else []

    def cleanup(self) -> None:
        if self.args.keep:
            log(f"scratch dir kept: {self.run}")
        else:
            shutil.rmtree(self.run, ignore_errors=True)


# -- the proxies ---------------------------------------------------------------------------


class Proxy:
    name = "?"

    def __init__(self, env: Env):
        self.env = env
        self.port = free_port()
        self.tls_port: int | None = None
        self.up_tls_port: int | None = None  # a plain listener whose upstream is TLS
        self.grpc_port: int | None = None  # an h2c listener whose upstream speaks h2c
        self.proc: subprocess.Popen | None = None
        self.note = ""  # why TLS (or the whole proxy) is unavailable
        self.idle_pss_kib = 0

    def pids(self) -> list[int]:
        return tree(self.proc.pid) if self.proc is not None else []

    def supports(self, scn: Scenario) -> bool:
        return (self.proc is not None and (not scn.tls or self.tls_port is not None)
                and (not scn.upstream_tls or self.up_tls_port is not None)
                and (not scn.grpc or self.grpc_port is not None))

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            self.env.procs.stop(self.proc)
            self.proc = None

    def wait_up(self, timeout: float = 15.0) -> None:
        wait_ready(lambda: http_get(self.port)[0] == 200, self.proc, timeout, self.name)
        if self.tls_port is not None:
            wait_ready(lambda: http_get(self.tls_port, tls=True)[0] == 200, self.proc,
                       timeout, f"{self.name} TLS")
        if self.up_tls_port is not None:
            wait_ready(lambda: http_get(self.up_tls_port)[0] == 200, self.proc,
                       timeout, f"{self.name} to the TLS origin")
        if self.grpc_port is not None:
            wait_ready(lambda: grpc_call(self.grpc_port) == "OK " + GRPC_MESSAGE.decode(),
                       self.proc, timeout, f"{self.name} gRPC")

    def check_bodies(self) -> None:
        for path, size in (("/tiny", 2), ("/static/1k", 1024), ("/static/1m", 1024 * 1024)):
            got = http_get(self.port, path, timeout=10)
            if got != (200, size):
                raise RuntimeError(f"{self.name}: GET {path} gave {got}, expected (200, {size})")


class ForkProxy(Proxy):
    name = "forkproxy"

    def __init__(self, env: Env, access_log: bool = False, rev: str = "",
                 trace_ratio: float | None = None):
        super().__init__(env)
        self.access_log = access_log
        self.trace_ratio = trace_ratio  # None: no [tracing] endpoint (tracing off)
        self.source = ""  # another build's source tree (--ab REV), imported first
        if access_log:
            self.name = "forkproxy+log"
        if trace_ratio is not None:
            self.name = f"forkproxy+trace{trace_ratio:g}"
        if rev:
            self.name = f"forkproxy@{rev}"
            self.source = checkout(env.run, rev)
        self.tag = self.name.replace("+", "-").replace("@", "-at-").replace("/", "-")

    def config(self, tls: bool) -> str:
        env = self.env
        run = env.run
        access = os.path.join(run, f"{self.tag}-access.log") if self.access_log else "off"
        lines = [
            "[server]",
            f"workers = {env.workers}",
            f"cpu_affinity = [{', '.join(str(c) for c in env.proxy_cpus)}]",
            f'pidfile = "{run}/{self.tag}.pid"',
            "",
            "[log]",
            f'access_log = "{access}"',
            "",
            "[admin]",
            'listen = ""',
            "",
            "[[listener]]",
            f'listen = "127.0.0.1:{self.port}"',
            'upstream = "origin"',
        ]
        if self.trace_ratio is not None:  # export to the run's OTLP receiver
            lines += ["", "[tracing]", f'endpoint = "{env.otlp_url}"',
                      f"sample_ratio = {self.trace_ratio}"]
        if tls:
            lines += [
                "",
                "[[listener]]",
                f'listen = "127.0.0.1:{self.tls_port}"',
                'upstream = "origin"',
                "[listener.tls]",
                f'certificates = [{{ cert = "{env.cert}", key = "{env.key}" }}]',
                "ocsp_stapling = false",
            ]
        if self.up_tls_port is not None:
            lines += ["", "[[listener]]", f'listen = "127.0.0.1:{self.up_tls_port}"',
                      'upstream = "origin_tls"']
        if self.grpc_port is not None:
            lines += ["", "[[listener]]", f'listen = "127.0.0.1:{self.grpc_port}"',
                      'upstream = "origin_grpc"', 'protocols = ["h2c"]']
        lines += [
            "",
            "[upstream.origin]",
            f'servers = [{{ address = "127.0.0.1:{env.origin_port}" }}]',
            f"keepalive = {env.keepalive}",
        ]
        if self.up_tls_port is not None:  # verified like nginx's proxy_ssl_verify on
            lines += ["", "[upstream.origin_tls]",
                      f'servers = [{{ address = "127.0.0.1:{env.origin_tls_port}" }}]',
                      f"keepalive = {env.keepalive}",
                      f'tls = {{ ca = "{env.cert}", server_name = "localhost" }}']
        if self.grpc_port is not None:
            lines += ["", "[upstream.origin_grpc]",
                      f'servers = [{{ address = "127.0.0.1:{env.origin_grpc_port}" }}]',
                      'protocol = "h2c"']
        path = os.path.join(run, f"{self.tag}{'-tls' if tls else ''}.toml")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def _launch(self, tls: bool) -> None:
        env = self.env
        conf = self.config(tls)
        errlog = os.path.join(env.run, f"{self.tag}.stderr")
        self.errlog = errlog
        with open(errlog, "a") as f:
            f.write(f"--- start {'with' if tls else 'without'} TLS: {conf}\n")
        penv = None
        if self.source:  # the other build's package shadows the installed one
            penv = dict(os.environ, PYTHONPATH=self.source)
        self.proc = env.procs.start(
            self.name, [*env.taskset(env.proxy_cpus), PROXY_PY, "-m", "forkproxy", "run", "-c",
                        conf], log_path=errlog, cwd=self.source or ROOT, env=penv)
        self.wait_up()

    def start(self) -> None:
        if self.env.args.want_upstream_tls and not self.source:  # (older builds: no key)
            self.up_tls_port = free_port()
        if self.env.args.want_grpc and not self.source:
            self.grpc_port = free_port()
        want_tls = self.env.args.want_tls
        if want_tls:
            self.tls_port = free_port()
            try:
                self._launch(tls=True)
                return
            except RuntimeError as e:
                reason = tail(self.errlog, 3).replace("\n", " / ")
                self.note = f"TLS unavailable: {e}; stderr: {reason[-400:]}"
                log(f"{self.name}: {self.note}; starting without TLS")
                self.stop()
                self.tls_port = None
        self._launch(tls=False)


def checkout(run: str, rev: str, prefix: str = "ab-") -> str:
    """The source tree of git revision ``rev`` in the scratch directory (for --ab), with
    its compiled modules built (setup.py COMPILED, as the working tree has them; else
    they would run as plain Python) unless FORKPROXY_PURE_PYTHON is set."""
    dest = os.path.join(run, prefix + rev.replace("/", "-"))
    if not os.path.isdir(dest):
        os.makedirs(dest)
        archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "forkproxy", "setup.py"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
        if not os.environ.get("FORKPROXY_PURE_PYTHON"):
            built = subprocess.run([VENV_PY, "setup.py", "-q", "build_ext", "--inplace",
                                    "-j", "2"], cwd=dest, capture_output=True, text=True)
            if built.returncode != 0:
                print(f"# {rev}: compiled modules not built, it runs as plain Python",
                      file=sys.stderr)
    return dest


def copy_compiled(dest: str) -> list[str]:
    """Give another build's source tree the working tree's compiled modules (setup.py
    COMPILED) whose .py source it has unchanged: without them its manager and ring walk
    ran as plain Python while the working tree's ran compiled, which made every --ab look
    better for the working tree. Returns the modules copied."""
    copied = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "forkproxy")):
        for name in files:
            if not name.endswith(".so"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), ROOT)
            src_py = os.path.join(ROOT, os.path.dirname(rel), name.split(".")[0] + ".py")
            dest_py = os.path.join(dest, os.path.dirname(rel), name.split(".")[0] + ".py")
            try:
                with open(src_py, "rb") as a, open(dest_py, "rb") as b:
                    if a.read() != b.read():
                        continue
            except OSError:
                continue
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))
            copied.append(rel)
    return copied


#: nginx's access log when forkproxy's is on too (``nginx+log``): the fields of forkproxy's
#: ``json`` line that nginx has, one JSON object per request, written through a 64 KiB
#: buffer flushed every second (forkproxy's manager also writes whole batches of lines)
NGINX_JSON_LOG = (
    "log_format fp_json escape=json '{\"ts\":\"$time_iso8601\",\"request_id\":\"$request_id\","
    "\"remote\":\"$remote_addr\",\"method\":\"$request_method\",\"path\":\"$request_uri\","
    "\"status\":$status,\"bytes_in\":$request_length,\"bytes_out\":$bytes_sent,"
    "\"upstream_addr\":\"$upstream_addr\",\"request_time\":$request_time,"
    "\"upstream_connect\":\"$upstream_connect_time\",\"upstream_header\":"
    "\"$upstream_header_time\",\"upstream_response\":\"$upstream_response_time\"}';\n"
    "    access_log {path} fp_json buffer=64k flush=1s;")


class NginxProxy(Proxy):
    name = "nginx"

    def __init__(self, env: Env, access_log: bool = False):
        super().__init__(env)
        self.access_log = access_log
        if access_log:
            self.name = "nginx+log"
        self.tag = self.name.replace("+", "-")

    def start(self) -> None:
        env = self.env
        self.tls_port = free_port()
        self.up_tls_port = free_port()
        self.grpc_port = free_port()
        masks = []
        for i in range(env.workers):
            cpu = env.proxy_cpus[i % len(env.proxy_cpus)]
            masks.append("1" + "0" * cpu)
        conf = render("nginx-proxy.conf", {
            "RUN": env.run, "ORIGIN_PORT": env.origin_port, "PORT": self.port,
            "TLS_PORT": self.tls_port, "WORKERS": env.workers, "CPUS": " ".join(masks),
            "UP_TLS_PORT": self.up_tls_port, "ORIGIN_TLS_PORT": env.origin_tls_port,
            "GRPC_PORT": self.grpc_port, "ORIGIN_GRPC_PORT": env.origin_grpc_port,
            "CERT": env.cert, "KEY": env.key, "KEEPALIVE": env.keepalive},
            os.path.join(env.run, f"{self.tag}-proxy.conf"))
        if self.tag != "nginx":  # a second nginx in the run: its own pid, logs, temp paths
            with open(conf) as f:
                text = f.read()
            text = text.replace("/nginx-proxy", f"/{self.tag}-proxy").replace(
                "/np_", f"/{self.tag}_")
            if self.access_log:
                line = "    access_log off;\n"
                if line not in text:
                    raise RuntimeError("nginx-proxy.conf: access_log line not found")
                path = os.path.join(env.run, f"{self.tag}-access.log")
                text = text.replace(line, "    " + NGINX_JSON_LOG.replace("{path}", path) + "\n", 1)
            with open(conf, "w") as f:
                f.write(text)
        errlog = os.path.join(env.run, f"{self.tag}-proxy-startup.log")
        self.proc = env.procs.start(
            self.name, [*env.taskset(env.proxy_cpus), "nginx", "-p", env.run + "/", "-e",
                        errlog, "-c", conf, "-g", "daemon off;"], log_path=errlog)
        self.wait_up()


class HAProxy(Proxy):
    name = "haproxy"
    maxconn = 0  # memprobe raises the template's 8000

    def supports(self, scn: Scenario) -> bool:
        return super().supports(scn) and scn.kind != "h2load"  # its template has no h2

    def start(self) -> None:
        env = self.env
        self.tls_port = free_port()
        dest = os.path.join(env.run, "haproxy.cfg")
        render("haproxy.cfg", {"RUN": env.run, "ORIGIN_PORT": env.origin_port,
                               "PORT": self.port, "WORKERS": env.workers}, dest)
        with open(dest) as f:
            text = f.read()
        # the shared template has no TLS listener: add one with the same certificate
        bind = f"    bind 127.0.0.1:{self.port} backlog 4096\n"
        if bind not in text:
            raise RuntimeError("haproxy.cfg: bind line not found")
        text = text.replace(bind, bind + f"    bind 127.0.0.1:{self.tls_port} ssl crt "
                            f"{env.pem} backlog 4096\n")
        text = text.replace("global\n", "global\n    tune.ssl.default-dh-param 2048\n", 1)
        if self.maxconn:
            text = text.replace("maxconn 8000", f"maxconn {self.maxconn}")
        with open(dest, "w") as f:
            f.write(text)
        errlog = os.path.join(env.run, "haproxy.log")
        self.proc = env.procs.start(
            self.name, [*env.taskset(env.proxy_cpus), "haproxy", "-db", "-f", dest],
            log_path=errlog)
        self.wait_up()


PROXYPY_PLUGIN = '''
from proxy.http.server import ReverseProxyBasePlugin
from proxy.http.url import Url


class BenchReverse(ReverseProxyBasePlugin):
    """Everything to the origin, path kept (a static route would replace the path)."""

    def routes(self):
        return [r"/.*$"]

    def handle_route(self, request, pattern):
        return Url.from_bytes(b"http://127.0.0.1:@ORIGIN_PORT@" + request.path)
'''


class ProxyPy(Proxy):
    """proxy.py in reverse-proxy mode, from a throwaway venv (optional comparison)."""

    name = "proxy.py"

    def supports(self, scn: Scenario) -> bool:
        return self.proc is not None and scn.name in ("tiny", "1k", "close")

    def start(self) -> None:
        env = self.env
        exe = os.path.join(PROXYPY_VENV, "bin", "proxy")
        if not os.path.exists(exe):
            log(f"installing proxy.py into {PROXYPY_VENV}")
            subprocess.run([sys.executable, "-m", "venv", PROXYPY_VENV], check=True)
            subprocess.run([os.path.join(PROXYPY_VENV, "bin", "pip"), "install", "-q",
                            "proxy.py"], check=True)
        plugdir = os.path.join(env.run, "proxypy")
        os.makedirs(plugdir, exist_ok=True)
        with open(os.path.join(plugdir, "bench_plugin.py"), "w") as f:
            f.write(PROXYPY_PLUGIN.replace("@ORIGIN_PORT@", str(env.origin_port)))
        errlog = os.path.join(env.run, "proxypy.log")
        self.proc = env.procs.start(
            self.name, [*env.taskset(env.proxy_cpus), exe, "--hostname", "127.0.0.1",
                        "--port", str(self.port), "--num-workers", str(env.workers),
                        "--num-acceptors", str(env.workers),
                        # threadless mode (the default) crashes its loop under wrk
                        # (FileNotFoundError in selector.modify): threaded mode works
                        "--threaded", "--enable-reverse-proxy", "--plugins", "bench_plugin.BenchReverse", "--log-level", "WARNING"],
            log_path=errlog, env=dict(os.environ, PYTHONPATH=plugdir), cwd=plugdir)
        self.wait_up(30)


# -- measuring -----------------------------------------------------------------------------


def paced_lua(rate: int, connections: int) -> str:
    """wrk's ``delay`` hook for --rate: each connection waits connections/rate seconds
    after a response before its next request, so every proxy is offered about ``rate``
    requests per second (a little less: the wait comes on top of the response time). The
    same rate for every row keeps the manager's costs per wake-up (one per 10 ms batch,
    whatever the rate) the same share of each request, so that rows differ by their own
    work only."""
    if not rate:
        return ""
    return f"delay = function() return {max(1, round(1000 * connections / rate))} end\n"


def load_cmd(env: Env, proxy: Proxy, scn: Scenario, duration: float) -> list[str]:
    args = env.args
    port = (proxy.tls_port if scn.tls else proxy.up_tls_port if scn.upstream_tls
            else proxy.grpc_port if scn.grpc else proxy.port)
    if scn.kind == "stime":
        www = ["-www", scn.path] if scn.path else []
        return [*env.taskset(env.load_cpus), "openssl", "s_time", "-connect",
                f"127.0.0.1:{port}", scn.stime_mode, "-time", str(max(1, round(duration))),
                *www, scn.tls_version]
    url = f"{'https' if scn.tls else 'http'}://127.0.0.1:{port}{scn.path}"
    if scn.kind == "h2load":
        grpc = ["-d", env.grpc_body, *GRPC_HEADERS] if scn.grpc else []
        return [*env.taskset(env.load_cpus), "h2load", "-D", str(max(1, round(duration))),
                "-c", str(H2LOAD_CLIENTS), "-m", str(H2LOAD_STREAMS), "-t", "1", *grpc, url]
    cmd = [*env.taskset(env.load_cpus), "wrk", f"-t{args.threads}", f"-c{args.connections}",
           f"-d{max(1, round(duration))}s", "--latency", "--timeout", "10s", "-s", env.lua]
    if scn.close:
        cmd += ["-H", "Connection: close"]
    return [*cmd, url]


def parse_wrk(out: str) -> dict:
    m = re.search(r"^WRKJSON (\{.*\})$", out, re.M)
    if not m:
        raise RuntimeError(f"wrk printed no summary:\n{out[-800:]}")
    w = json.loads(m.group(1))
    secs = w["duration_us"] / 1e6
    return {
        "count": w["requests"], "seconds": secs, "rate": w["requests"] / secs,
        "p50_ms": w["p50_us"] / 1000, "p90_ms": w["p90_us"] / 1000,
        "p99_ms": w["p99_us"] / 1000, "mean_ms": w["mean_us"] / 1000,
        "max_ms": w["max_us"] / 1000, "bytes": w["bytes"],
        "errors": {k: w[k] for k in ("connect", "read", "write", "status", "timeout") if w[k]},
    }


def parse_h2load(out: str) -> dict:
    """h2load's summary: requests, rate, mean and max request time (no percentiles)."""
    done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    fin = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    times = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+"
                      r"([\d.]+)(us|ms|s)", out)
    proto = re.search(r"Application protocol: (\S+)", out)
    data = re.search(r"\((\d+)\) data", out)
    if not (done and fin and times and data) or not proto or proto.group(1) not in ("h2", "h2c"):
        raise RuntimeError(f"h2load printed no HTTP/2 summary:\n{out[-800:]}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    secs = float(fin.group(1)) / (1000 if fin.group(2) == "ms" else 1)
    ok = int(done.group(4))
    errors = {k: int(done.group(i)) for k, i in (("failed", 5), ("errored", 6), ("timeout", 7))
              if int(done.group(i))}
    mean = float(times.group(5)) * scale[times.group(6)]
    return {"count": ok, "seconds": secs, "rate": ok / secs if secs else 0.0,
            "p50_ms": mean, "p90_ms": None, "p99_ms": None, "mean_ms": mean,
            "max_ms": float(times.group(3)) * scale[times.group(4)],
            "bytes": int(data.group(1)), "errors": errors}


def check_grpc_replies(res: dict) -> None:
    """Every call h2load counted must have carried the reply message: h2load counts 2xx
    statuses, and a proxy's gRPC error is a 200 with a status in the trailers, no message."""
    missing = res["count"] - res["bytes"] // len(GRPC_FRAMED)
    if missing > 0:
        res["errors"]["no gRPC reply"] = missing


def grpc_call(port: int) -> str:
    """"<status> <reply>" of one real gRPC call through ``port`` (see GRPC_CHECK)."""
    r = subprocess.run([VENV_PY, "-c", GRPC_CHECK, f"127.0.0.1:{port}", GRPC_PATH,
                        GRPC_MESSAGE.decode()], capture_output=True, text=True, timeout=30)
    return r.stdout.strip() if r.returncode == 0 else r.stderr.strip()[-300:]


def parse_stime(out: str, wall: float) -> dict:
    m = re.search(r"(\d+) connections in [\d.]+s;", out)
    if not m:
        raise RuntimeError(f"s_time printed no summary:\n{out[-800:]}")
    n = int(m.group(1))
    marks = re.findall(r"^[*r]+$", out, re.M)
    marks_text = "".join(marks)
    return {"count": n, "seconds": wall, "rate": n / wall,
            "resumed": marks_text.count("r"), "new": marks_text.count("*"), "errors": {}}


def other_load(interval: float = 0.5) -> float:
    """Busy % of one core over `interval` while the benchmark's processes are idle."""
    b0, t0 = busy_ticks(), time.monotonic()
    time.sleep(interval)
    return 100 * (busy_ticks() - b0) / CLK_TCK / (time.monotonic() - t0)


def wait_quiet(threshold: float, max_wait: float) -> tuple[float, float]:
    """Wait (at most max_wait s) until other processes use less than threshold % of a
    core; (seconds waited, last load seen)."""
    if max_wait <= 0:
        return 0.0, 0.0
    t0 = time.monotonic()
    load = other_load()
    while load > threshold and time.monotonic() - t0 < max_wait:
        load = other_load(1.0)
    return time.monotonic() - t0, load


def measure(env: Env, proxy: Proxy, scn: Scenario, duration: float) -> dict:
    """One load run against one proxy; CPU, PSS and the load generator's figures."""
    cmd = load_cmd(env, proxy, scn, duration)
    pids = proxy.pids()
    origin = env.origin_pids()
    p_before = cpu_snapshot(pids)
    m_before = sched_ns(manager_pids(pids))
    o_before = cpu_snapshot(origin)
    c_before = children_cpu()
    busy_before = busy_ticks()
    ipis = IpiCount(pids, os.path.join(env.run, "ipi.csv"))
    t0 = time.monotonic()
    gen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, process_group=0)
    pss = 0
    try:
        try:
            gen.wait(duration / 2)
        except subprocess.TimeoutExpired:
            pss = pss_kib(proxy.pids())
        out, _ = gen.communicate(timeout=duration + 60)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(gen.pid, signal.SIGKILL)
        gen.wait()
        ipis.stop()
        raise
    wall = time.monotonic() - t0
    busy_after = busy_ticks()
    gen_cpu = children_cpu() - c_before  # before perf is reaped: not counted as wrk's
    ipi_count = ipis.stop()
    p_after = cpu_snapshot(proxy.pids())
    m_after = sched_ns(manager_pids(proxy.pids()))
    o_after = cpu_snapshot(env.origin_pids())
    out = out.decode(errors="replace")
    if gen.returncode != 0:
        raise RuntimeError(f"{cmd[3]} exited {gen.returncode}:\n{out[-800:]}")
    if scn.kind == "stime":
        res = parse_stime(out, wall)
    elif scn.kind == "h2load":
        res = parse_h2load(out)
        if scn.grpc:
            check_grpc_replies(res)
    else:
        res = parse_wrk(out)
    proxy_cpu, proxy_sys, notes = cpu_delta(p_before, p_after)
    # a shard that appeared during the run counts whole, one that vanished not at all
    manager_cpu = sum(ns - m_before.get(key, 0) for key, ns in m_after.items()) / 1e9
    origin_cpu, _, _ = cpu_delta(o_before, o_after)
    total = (busy_after - busy_before) / CLK_TCK
    other = max(0.0, total - proxy_cpu - origin_cpu - gen_cpu)
    res.update({
        "rps": res["rate"],  # alias
        "proxy_cpu_s": proxy_cpu,
        "cpu_us": proxy_cpu * 1e6 / res["count"] if res["count"] else None,
        # forkproxy's manager and collector shards (the ring records' consumers)
        "manager_us": (manager_cpu * 1e6 / res["count"] if res["count"] and m_before
                       else None),
        "sys_us": proxy_sys * 1e6 / res["count"] if res["count"] else None,
        "ipi_per_req": ipi_count / res["count"] if res["count"] and ipi_count is not None
        else None,
        "pss_mib": (pss or pss_kib(proxy.pids())) / 1024,
        "origin_cpu_s": origin_cpu, "loadgen_cpu_s": gen_cpu,
        "other_cpu_pct": 100 * other / wall, "wall_s": wall,
        "proxy_cpu_pct": 100 * proxy_cpu / wall,
    })
    if notes:
        res["notes"] = notes
    return res


def manager_pids(pids) -> list[int]:
    """forkproxy's manager and collector shard processes among ``pids``."""
    return [p for p in pids if _comm(p).startswith(("fp-manager", "fp-collector"))]


def tracing_table(summary: dict[str, dict], runs: dict[str, list] | None = None) -> list[str]:
    """The manager's CPU per request with tracing off, at 1% and at 100% (--tracing):
    the rows forkproxy, forkproxy+trace0.01, forkproxy+trace1 of one scenario. With the
    runs, "added" is the median of each round's difference from the tracing-off run of
    the same round (the rounds are interleaved: the pairs saw the same load), with its
    range; a difference of medians moves more with the machine's load."""
    off = summary.get("forkproxy", {}).get("manager_us")
    if off is None:
        return []
    lines = ["| forkproxy manager (+ collector shards) | CPU µs/req | added by tracing "
             "(median of the rounds' differences) | rounds' differences |",
             "|---|---:|---:|---|", f"| tracing off | {off:.2f} | | |"]
    for ratio in ("0.01", "1"):
        name = f"forkproxy+trace{ratio}"
        us = summary.get(name, {}).get("manager_us")
        if us is None:
            continue
        diffs = paired_differences(runs or {}, name)
        if diffs:
            lines.append(f"| sample_ratio = {ratio} | {us:.2f} | "
                         f"**{statistics.median(diffs):+.2f}** | "
                         f"{', '.join(f'{d:+.2f}' for d in diffs)} |")
        else:
            lines.append(f"| sample_ratio = {ratio} | {us:.2f} | **{us - off:+.2f}** | |")
    return lines if len(lines) > 3 else []


def paired_differences(runs: dict[str, list], name: str) -> list[float]:
    """Each round's manager µs/request of ``name`` minus the tracing-off run's."""
    base = {r.get("round"): r.get("manager_us") for r in runs.get("forkproxy", [])}
    out = []
    for r in runs.get(name, []):
        a, b = base.get(r.get("round")), r.get("manager_us")
        if a is not None and b is not None:
            out.append(b - a)
    return out


def summarize(runs: list[dict]) -> dict:
    def med(key):
        vals = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    rates = [r["rate"] for r in runs]
    errors: dict[str, int] = {}
    for r in runs:
        for k, v in r.get("errors", {}).items():
            errors[k] = errors.get(k, 0) + v
    s = {
        "rounds": len(runs), "rate": statistics.median(rates), "rate_min": min(rates),
        "rate_max": max(rates), "cpu_us": med("cpu_us"), "sys_us": med("sys_us"),
        "manager_us": med("manager_us"), "ipi_per_req": med("ipi_per_req"),
        "pss_mib": med("pss_mib"),
        "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"), "other_cpu_pct": med("other_cpu_pct"),
        "errors": errors,
    }
    if "resumed" in runs[0]:
        s["resumed"] = sum(r["resumed"] for r in runs)
        s["new"] = sum(r["new"] for r in runs)
    return s


# -- output --------------------------------------------------------------------------------


def _num(x, digits=0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def _ms(x) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _ratio(a, b) -> str:
    if a is None or b is None or not b:
        return "-"
    return f"{a / b:.2f}x"


def scenario_table(scn: Scenario, summary: dict[str, dict], skipped: dict[str, str]) -> list[str]:
    unit = "conn/s" if scn.unit == "conn" else "req/s"
    cpu = "CPU µs/conn" if scn.unit == "conn" else "CPU µs/req"
    head = (f"| proxy | {unit} median | min | max | p50 ms | p99 ms | {cpu} | of which sys"
            " | PSS MiB | other CPU % |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary.items():
        extra = ""
        if s["errors"]:
            extra = " (errors: " + ", ".join(f"{k} {v}" for k, v in s["errors"].items()) + ")"
        if "resumed" in s and scn.stime_mode == "-reuse":
            extra += f" (resumed {s['resumed']}/{s['resumed'] + s['new']})"
        lines.append(
            f"| {name}{extra} | {_num(s['rate'])} | {_num(s['rate_min'])} | {_num(s['rate_max'])}"
            f" | {_ms(s['p50_ms'])} | {_ms(s['p99_ms'])} | {_num(s['cpu_us'], 1)}"
            f" | {_num(s['sys_us'], 1)} | {_num(s['pss_mib'], 1)} | {_num(s['other_cpu_pct'])} |")
    pairs = [("forkproxy", "nginx"), ("forkproxy", "haproxy"), ("forkproxy+log", "forkproxy"),
             ("forkproxy+log", "nginx+log"), ("nginx+log", "nginx"),
             ("forkproxy", "proxy.py")]
    for a, b in pairs:
        if a in summary and b in summary:
            sa, sb = summary[a], summary[b]
            lines.append(
                f"| **{a} / {b}** | **{_ratio(sa['rate'], sb['rate'])}** | | | "
                f"{_ratio(sa['p50_ms'], sb['p50_ms'])} | {_ratio(sa['p99_ms'], sb['p99_ms'])} | "
                f"**{_ratio(sa['cpu_us'], sb['cpu_us'])}** | {_ratio(sa['sys_us'], sb['sys_us'])} | "
                f"{_ratio(sa['pss_mib'], sb['pss_mib'])} | |")
    for name, why in skipped.items():
        lines.append(f"| {name}: skipped ({why}) | | | | | | | | | |")
    return lines


def check_targets(results: dict) -> list[tuple[str, str, str]]:
    """[(target text, measured, verdict)] for the targets measurable from this run."""
    out = []
    scns = results["scenarios"]
    for scn, metric, other, op, bound, text in TARGETS:
        if scn not in scns:
            continue
        summ = scns[scn]["summary"]
        if "forkproxy" not in summ:
            continue
        a = summ["forkproxy"]
        if other in SCENARIOS:  # a ratio between two scenarios of forkproxy itself
            if other not in scns or "forkproxy" not in scns[other]["summary"]:
                continue
            b = scns[other]["summary"]["forkproxy"]
        else:
            if other not in summ:
                continue
            b = summ[other]
        key = "rate" if metric == "rps" else "cpu_us"
        if a.get(key) is None or not b.get(key):
            continue
        ratio = a[key] / b[key]
        ok = ratio <= bound if op == "<=" else ratio >= bound
        shown = f"{ratio:.2f}x"
        if other in SCENARIOS and a.get("cpu_us") and b.get("cpu_us"):
            # s_time is one serial client: also show the proxy's capacity ratio
            shown += f" (proxy CPU per handshake: {b['cpu_us'] / a['cpu_us']:.2f}x less)"
        out.append((text, shown, "met" if ok else "**missed**"))
    return out


def render_markdown(results: dict) -> str:
    lines = []
    m = results["machine"]
    cfg = results["config"]
    lines.append(f"Command: `{results['command']}`  ")
    lines.append(f"Run: {results['started']} ({results['elapsed_s']:.0f} s), forkproxy "
                 f"{m.get('git', '?')}  ")
    lines.append(f"Machine: {m['cpu']} x {m['ncpu']}, {m['os']}, kernel {m['kernel']}, "
                 f"{m['python']}, {m['openssl']}; {m['nginx']}, {m['haproxy']}, {m['wrk']}  ")
    lines.append(f"Layout: {cfg['workers']} worker(s) per proxy on CPU {cfg['proxy_cpus']}; "
                 f"origin (nginx, 1 worker), load generator and driver on CPU "
                 f"{cfg['load_cpus']}; wrk -t{cfg['threads']} -c{cfg['connections']}"
                 + (f" paced to ~{cfg['rate']:,} req/s" if cfg.get("rate") else "") + "; "
                 f"{cfg.get('keepalive', KEEPALIVE_MIN)} idle upstream connections kept per "
                 "worker (forkproxy and nginx `keepalive`); "
                 f"{cfg['rounds']} interleaved rounds of {cfg['duration']:g} s per proxy "
                 f"after a {cfg['warmup']:g} s warm-up; figures are medians. "
                 f"Load average at start: {m['loadavg']}; each run waited up to "
                 f"{cfg.get('quiet_wait', 0):g} s for other processes to use less than "
                 f"{cfg.get('quiet_threshold', 0):g}% of a core (\"other CPU %\" is what they "
                 "used during the run: the noise).")
    lines.append("")
    targets = check_targets(results)
    if targets:
        lines += ["#### Targets (issues 7, 14 and 15)", "", "| target | forkproxy measured | verdict |",
                  "|---|---:|---|"]
        lines += [f"| {t} | {v} | {ok} |" for t, v, ok in targets]
        lines.append("")
    for name, data in results["scenarios"].items():
        scn = SCENARIOS[name]
        lines.append(f"#### {name}: {scn.title}")
        lines.append("")
        lines += scenario_table(scn, data["summary"], data.get("skipped", {}))
        lines.append("")
        traced = tracing_table(data["summary"], data.get("runs"))
        if traced:
            lines += traced + [""]
    idle = results.get("idle_pss_mib", {})
    if idle:
        lines.append("Idle PSS after start-up (all processes of each proxy, "
                     f"{cfg['workers']} worker(s)): "
                     + ", ".join(f"{k} {v:.1f} MiB" for k, v in idle.items()) + ".")
        lines.append("")
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    if results.get("notes"):
        lines.append("")
    return "\n".join(lines)


def machine_facts() -> dict:
    def first_line(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    osname = "?"
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip().strip('"')
    with open("/proc/loadavg") as f:
        loadavg = " ".join(f.read().split()[:3])
    git = first_line(["git", "-C", ROOT, "describe", "--always", "--dirty"])
    pyver = first_line([VENV_PY, "-c", "import sys, gevent; print('CPython', "
                        "sys.version.split()[0], 'gevent', gevent.__version__)"])
    return {
        "cpu": cpu, "ncpu": os.cpu_count(), "os": osname, "kernel": platform.release(),
        "python": pyver, "openssl": first_line(["openssl", "version"]),
        "nginx": first_line(["nginx", "-v"]).replace("nginx version: ", ""),
        "haproxy": " ".join(first_line(["haproxy", "-v"]).split()[:3]),
        "wrk": " ".join(first_line(["wrk", "-v"]).split()[:2]), "git": git,
        "loadavg": loadavg,
    }


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def write_docs(section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the generated section of docs/BENCHMARKS.md (the rest is hand-written)."""
    with open(DOCS) as f:
        text = f.read()
    if begin not in text or end not in text:
        raise RuntimeError(f"{DOCS}: markers {begin} / {end} not found")
    pre, rest = text.split(begin, 1)
    _, post = rest.split(end, 1)
    with open(DOCS, "w") as f:
        f.write(pre + begin + "\n" + section.rstrip() + "\n" + end + post)


# -- profile (perf, py-spy) ----------------------------------------------------------------


def ensure_pyspy() -> str:
    exe = shutil.which("py-spy") or os.path.join(PYSPY_VENV, "bin", "py-spy")
    if not os.path.exists(exe):
        log(f"installing py-spy into {PYSPY_VENV}")
        subprocess.run([sys.executable, "-m", "venv", PYSPY_VENV], check=True)
        subprocess.run([os.path.join(PYSPY_VENV, "bin", "pip"), "install", "-q", "py-spy"],
                       check=True)
    return exe


def fold_report(raw_path: str, top: int = 25) -> str:
    """Self and inclusive sample shares from py-spy's collapsed stacks, per line and per
    function (file:line dropped), so both hot lines and hot call paths show."""
    total = 0
    tables: dict[str, dict[str, int]] = {k: {} for k in ("self", "incl", "fself", "fincl")}
    with open(raw_path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not n.isdigit():
                continue
            n = int(n)
            total += n
            frames = stack.split(";")
            funcs = [re.sub(r":\d+\)$", ")", fr) for fr in frames]
            for key, items in (("self", frames[-1:]), ("incl", set(frames)),
                               ("fself", funcs[-1:]), ("fincl", set(funcs))):
                tab = tables[key]
                for fr in items:
                    tab[fr] = tab.get(fr, 0) + n
    if not total:
        return "no samples\n"
    out = [f"{total} samples"]
    for key, title in (("fself", "self % by function"), ("fincl", "inclusive % by function"),
                       ("self", "self % by line")):
        out += ["", title]
        for fr, n in sorted(tables[key].items(), key=lambda kv: -kv[1])[:top]:
            out.append(f"{100 * n / total:6.1f}  {fr}")
    return "\n".join(out) + "\n"


PERF_SYSCALLS = ["sendto", "recvfrom", "writev", "readv", "sendfile64", "epoll_wait",
                 "epoll_ctl", "read", "write", "getsockopt", "setsockopt", "accept4", "close",
                 "mmap", "munmap", "brk", "futex", "ioctl", "fcntl", "getpid", "splice",
                 "sendmsg", "recvmsg", "poll", "shutdown", "getsockname", "getpeername",
                 "pipe2", "openat", "newfstatat", "clock_gettime", "eventfd2"]


def perf_syscalls(env: Env, proxy: Proxy, scn: Scenario, wpid: int, duration: float) -> str:
    """Syscalls and context switches per request of one worker, with perf's in-kernel
    counters (strace would slow the worker until every read finds data waiting)."""
    tracing = "/sys/kernel/tracing/events/syscalls"
    names = [n for n in PERF_SYSCALLS if os.path.isdir(f"{tracing}/sys_enter_{n}")]
    events = ["raw_syscalls:sys_enter", "context-switches", "task-clock"] + [
        f"syscalls:sys_enter_{n}" for n in names]
    out = os.path.join(env.run, "perf.txt")
    perf = subprocess.Popen([*env.taskset(env.load_cpus), "perf", "stat", "-x", ",", "-o", out,
                             "-e", ",".join(events), "-p", str(wpid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            process_group=0)
    time.sleep(0.3)
    try:
        res = measure(env, proxy, scn, duration)
    finally:
        os.kill(perf.pid, signal.SIGINT)
        perf.wait(30)
    reqs = res["count"]
    counts = {}
    with open(out) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) > 3 and parts[0].replace(".", "").isdigit():
                counts[parts[2]] = float(parts[0])
    lines = [f"{reqs} {scn.unit}s at {res['rate']:,.0f}/s, {res['cpu_us']:.1f} µs CPU each "
             "(whole proxy)"]
    total = counts.get("raw_syscalls:sys_enter")
    if total is not None:
        lines.append(f"{total / reqs:8.2f} syscalls per {scn.unit} (all)")
    listed = 0.0
    for name in names:
        n = counts.get(f"syscalls:sys_enter_{name}", 0)
        listed += n
        if n / reqs >= 0.005:
            lines.append(f"{n / reqs:8.2f} {name}")
    if total is not None and (total - listed) / reqs >= 0.005:
        lines.append(f"{(total - listed) / reqs:8.2f} others")
    if "context-switches" in counts:
        lines.append(f"{counts['context-switches'] / reqs:8.3f} context switches per {scn.unit}")
    return "\n".join(lines) + "\n"


def profile(env: Env, proxy: Proxy, scn: Scenario, duration: float, outdir: str) -> str:
    """perf syscall counts and py-spy samples of forkproxy's worker under one scenario."""
    pids = proxy.pids()
    workers = [p for p in pids if p != proxy.proc.pid and _comm(p).startswith("fp-worker")]
    if not workers:
        workers = [p for p in pids if p != proxy.proc.pid]
    wpid = workers[0]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(outdir, exist_ok=True)
    report = [f"## profile of forkproxy worker {wpid} ({_comm(wpid)}), scenario {scn.name} "
              f"({scn.title}), {duration:g} s per tool", ""]
    if shutil.which("perf"):
        report += [f"### perf stat (syscalls per {scn.unit})", "", "```",
                   perf_syscalls(env, proxy, scn, wpid, duration).rstrip(), "```", ""]
    exe = ensure_pyspy()
    for native in (False, True):
        tag = "native" if native else "python"
        raw = os.path.join(outdir, f"pyspy-{stamp}-{tag}.txt")
        cmd = [*env.taskset(env.load_cpus), exe, "record", "-p", str(wpid), "-r", "250",
               "-d", str(int(duration)), "-f", "raw", "-o", raw]
        if native:
            cmd.append("--native")
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               process_group=0)
        time.sleep(0.5)
        try:
            measure(env, proxy, scn, duration)
        finally:
            _, err = spy.communicate(timeout=duration + 60)
        if spy.returncode != 0 or not os.path.exists(raw):
            report += [f"py-spy ({tag}) failed: {err.decode(errors='replace')[-400:]}", ""]
            continue
        report += [f"### py-spy record ({tag} frames), collapsed stacks in {raw}", "", "```",
                   fold_report(raw).rstrip(), "```", ""]
    text = "\n".join(report)
    path = os.path.join(outdir, f"profile-{stamp}.md")
    with open(path, "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    log(f"profile: {path}")
    return path


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


# -- main ----------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="forkproxy vs nginx vs HAProxy, interleaved, on loopback "
                    "(see docs/BENCHMARKS.md)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny keep-alive only, 1 round of 2 s, forkproxy + nginx")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--duration", type=int, default=None, help="seconds per run (default 10)")
    p.add_argument("--warmup", type=int, default=None,
                   help="unrecorded warm-up seconds per proxy and scenario (default 2)")
    p.add_argument("--scenarios", default=None,
                   help=f"comma-separated, from {', '.join(SCENARIOS)} "
                        f"(default {','.join(DEFAULT_SCENARIOS)})")
    p.add_argument("--workers", type=int, default=1, help="workers (threads) per proxy")
    p.add_argument("--proxies", default=None,
                   help="comma-separated from forkproxy,nginx,haproxy,proxy.py "
                        "(default forkproxy,nginx,haproxy)")
    p.add_argument("--ab", default=None, metavar="REV",
                   help="also run forkproxy as built at git revision REV (row forkproxy@REV), "
                        "interleaved with the working tree's: an A/B of two builds")
    p.add_argument("--tracing", action="store_true",
                   help="also run forkproxy exporting spans to an OTLP receiver at "
                        "sample_ratio 0.01 and 1 (rows forkproxy+trace0.01, "
                        "forkproxy+trace1) and print the manager's CPU per request")
    p.add_argument("--access-log", action="store_true",
                   help="also run forkproxy and nginx with their access logs on (rows "
                        "forkproxy+log and, when nginx runs, nginx+log: JSON lines, "
                        "buffered 64 KiB / 1 s)")
    p.add_argument("--proxypy", action="store_true",
                   help="also run proxy.py (tiny and 1k scenarios; installed in a throwaway "
                        "venv)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--rate", type=int, default=0, metavar="REQ_PER_S",
                   help="pace wrk to about this many requests per second (keep-alive "
                        "scenarios; default: as fast as it goes). With --tracing: the "
                        "rows compared at the same rate")
    p.add_argument("--keepalive", type=int, default=None, metavar="N",
                   help="idle upstream connections each proxy keeps per worker (forkproxy's "
                        "keepalive, nginx's keepalive N; default: the most requests any "
                        "chosen scenario keeps in flight, at least 64: 320 with h2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-pin", action="store_true", help="do not pin CPUs")
    p.add_argument("--quiet-threshold", type=float, default=30.0,
                   help="before each run, wait until other processes use less than this %% "
                        "of one core (default 30)")
    p.add_argument("--quiet-wait", type=float, default=None,
                   help="longest wait for that, seconds (default 20; 0 with --quick)")
    p.add_argument("--json", default=None, help="where to write the JSON results "
                   "(default bench-results/bench-DATE.json)")
    p.add_argument("--write-docs", action="store_true",
                   help="replace the generated section of docs/BENCHMARKS.md")
    p.add_argument("--profile", nargs="?", const="tiny", default=None, metavar="SCENARIO",
                   help="afterwards, perf-count syscalls and py-spy forkproxy's worker under "
                        "SCENARIO (default tiny)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = args.rounds or 1
        args.duration = args.duration or 2
        args.warmup = 1 if args.warmup is None else args.warmup
        args.scenarios = args.scenarios or "tiny"
        args.proxies = args.proxies or "forkproxy,nginx"
        args.quiet_wait = 0 if args.quiet_wait is None else args.quiet_wait
    args.rounds = args.rounds or 3
    args.quiet_wait = 20.0 if args.quiet_wait is None else args.quiet_wait
    args.duration = args.duration or 10
    args.warmup = 2 if args.warmup is None else args.warmup
    args.scenarios = (args.scenarios or ",".join(DEFAULT_SCENARIOS)).split(",")
    for s in args.scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r} (known: {', '.join(SCENARIOS)})")
    proxies = (args.proxies or "forkproxy,nginx,haproxy").split(",")
    if args.access_log and "forkproxy+log" not in proxies:
        proxies.insert(proxies.index("forkproxy") + 1 if "forkproxy" in proxies else 0,
                       "forkproxy+log")
    if args.access_log and "nginx" in proxies and "nginx+log" not in proxies:
        proxies.insert(proxies.index("nginx") + 1, "nginx+log")
    if args.tracing:
        at = proxies.index("forkproxy") + 1 if "forkproxy" in proxies else 0
        if "forkproxy" not in proxies:
            proxies.insert(0, "forkproxy")  # the tracing-off reference
            at = 1
        proxies[at:at] = [n for n in ("forkproxy+trace0.01", "forkproxy+trace1")
                          if n not in proxies]
    if args.proxypy and "proxy.py" not in proxies:
        proxies.append("proxy.py")
    if args.ab:
        proxies.insert(proxies.index("forkproxy") + 1 if "forkproxy" in proxies else 0,
                       f"forkproxy@{args.ab}")
    for name in proxies:
        if name.startswith("forkproxy@"):
            continue
        if name not in ("forkproxy", "forkproxy+log", "nginx", "nginx+log", "haproxy", "proxy.py",
                        "forkproxy+trace0.01", "forkproxy+trace1"):
            p.error(f"unknown proxy {name!r}")
    args.proxies = proxies
    if args.profile and args.profile not in SCENARIOS:
        p.error(f"unknown scenario {args.profile!r} for --profile")
    if args.keepalive is None:
        args.keepalive = max([KEEPALIVE_MIN] + [SCENARIOS[s].in_flight(args)
                                                for s in args.scenarios])
    args.want_tls = any(SCENARIOS[s].tls for s in args.scenarios) or bool(
        args.profile and SCENARIOS[args.profile].tls)
    args.want_upstream_tls = any(SCENARIOS[s].upstream_tls for s in args.scenarios) or bool(
        args.profile and SCENARIOS[args.profile].upstream_tls)
    args.want_grpc = any(SCENARIOS[s].grpc for s in args.scenarios) or bool(
        args.profile and SCENARIOS[args.profile].grpc)
    return args


def _last_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " / ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else (lines[0] if lines else "?")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _install_signal_handlers() -> None:
    """TERM, HUP and INT all end the run with a full clean-up (INT too when started in
    the background by a shell, which would otherwise leave it ignored)."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _raise_interrupt)


def main_bench(argv: list[str], command: str) -> int:
    args = parse_args(argv)
    tools = ["wrk", "nginx", "openssl", "taskset"]
    if "haproxy" in args.proxies:
        tools.append("haproxy")
    if any(SCENARIOS[s].kind == "h2load" for s in args.scenarios):
        tools.append("h2load")
    err = ensure_tools(tools)
    if err:
        print(f"bench: cannot run: {err}", file=sys.stderr)
        return EXIT_SKIP
    ensure_venv()
    _install_signal_handlers()
    procs = Procs()
    env = None
    t_start = time.monotonic()
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    try:
        env = Env(args, procs)
        os.sched_setaffinity(0, set(env.load_cpus))
        env.lua = os.path.join(env.run, "report.lua")
        with open(env.lua, "w") as f:
            f.write(WRK_LUA + paced_lua(args.rate, args.connections))
        machine = machine_facts()
        log(f"scratch {env.run}; load CPUs {env.load_cpus}, proxy CPUs {env.proxy_cpus}; "
            f"load average {machine['loadavg']}")
        env.start_origin()
        if any("+trace" in n for n in args.proxies):
            env.start_otlp_receiver()
        proxies: list[Proxy] = []
        notes: list[str] = []
        any_failed = False
        for name in args.proxies:
            if name.startswith("forkproxy@"):
                px = ForkProxy(env, rev=name.partition("@")[2])
            else:
                px = {"forkproxy": lambda: ForkProxy(env),
                      "forkproxy+log": lambda: ForkProxy(env, True),
                      "forkproxy+trace0.01": lambda: ForkProxy(env, trace_ratio=0.01),
                      "forkproxy+trace1": lambda: ForkProxy(env, trace_ratio=1.0),
                      "nginx": lambda: NginxProxy(env),
                      "nginx+log": lambda: NginxProxy(env, True),
                      "haproxy": lambda: HAProxy(env),
                      "proxy.py": lambda: ProxyPy(env)}[name]()
            try:
                px.start()
                px.check_bodies()
            except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
                if name.startswith("forkproxy"):
                    raise
                notes.append(f"{name} unavailable: {e}")
                log(notes[-1])
                px.stop()
                continue
            if px.note:
                notes.append(f"{name}: {px.note}")
            time.sleep(0.5)
            px.idle_pss_kib = pss_kib(px.pids())
            log(f"{name} up: port {px.port}, TLS port {px.tls_port}, pids {px.pids()}, "
                f"idle PSS {px.idle_pss_kib / 1024:.1f} MiB")
            proxies.append(px)
        results = {
            "command": command, "started": started, "machine": machine,
            "config": {"workers": args.workers, "rounds": args.rounds,
                       "duration": args.duration, "warmup": args.warmup,
                       "connections": args.connections, "threads": args.threads,
                       "rate": args.rate,
                       "keepalive": args.keepalive,
                       "load_cpus": cpu_list(env.load_cpus),
                       "proxy_cpus": cpu_list(env.proxy_cpus),
                       "proxies": [p.name for p in proxies], "scenarios": args.scenarios,
                       "quiet_wait": args.quiet_wait, "quiet_threshold": args.quiet_threshold},
            "idle_pss_mib": {p.name: p.idle_pss_kib / 1024 for p in proxies},
            "scenarios": {}, "notes": notes,
        }
        for sname in args.scenarios:
            scn = SCENARIOS[sname]
            active = [p for p in proxies if p.supports(scn)]
            skipped = {p.name: (p.note or "not supported") for p in proxies
                       if not p.supports(scn)}
            log(f"scenario {sname}: {scn.title}; proxies {[p.name for p in active]}")
            runs: dict[str, list[dict]] = {p.name: [] for p in active}
            failed: dict[str, str] = {}
            if args.warmup > 0:
                for px in active:
                    try:
                        measure(env, px, scn, args.warmup)
                    except RuntimeError as e:
                        failed[px.name] = _last_line(e)
            for rnd in range(args.rounds):
                for px in active:
                    if px.name in failed:
                        continue
                    waited, load = wait_quiet(args.quiet_threshold, args.quiet_wait)
                    try:
                        res = measure(env, px, scn, args.duration)
                        res["waited_s"], res["load_before_pct"] = waited, load
                        res["round"] = rnd
                    except RuntimeError as e:
                        failed[px.name] = _last_line(e)
                        log(f"  {px.name}: failed: {e}")
                        continue
                    runs[px.name].append(res)
                    log(f"  round {rnd + 1} {px.name}: {res['rate']:,.0f}/s, "
                        f"CPU {res['cpu_us'] or 0:.1f} µs"
                        + (f" (manager {res['manager_us']:.2f} µs)" if res.get("manager_us")
                           else "")
                        + (f", IPIs sent {res['ipi_per_req']:.2f}/request"
                           if res.get("ipi_per_req") is not None else "")
                        + f", PSS {res['pss_mib']:.1f} MiB, "
                        f"other {res['other_cpu_pct']:.0f}%"
                        + (f", errors {res['errors']}" if res["errors"] else "")
                        + (f", {res['notes']}" if res.get("notes") else "")
                        + (f" (waited {waited:.0f} s for a quieter machine: {load:.0f}%)"
                           if waited >= 1 else ""))
            summary = {name: summarize(r) for name, r in runs.items() if r}
            skipped.update({k: f"failed: {v}" for k, v in failed.items()})
            if failed:
                any_failed = True
            results["scenarios"][sname] = {"title": scn.title, "runs": runs,
                                           "summary": summary, "skipped": skipped}
            print(f"\n#### {sname}: {scn.title}\n", file=sys.stderr)
            print("\n".join(scenario_table(scn, summary, skipped)), file=sys.stderr, flush=True)
            if tracing_table(summary, runs):
                print("\n" + "\n".join(tracing_table(summary, runs)), file=sys.stderr,
                      flush=True)
        if env.otlp_count:  # the traced rows measured nothing if no span arrived
            try:
                with open(env.otlp_count) as f:
                    exports = int(f.read() or 0)
            except OSError:
                exports = 0
            notes.append(f"OTLP receiver: {exports} export requests received")
            log(notes[-1])
            if not exports:
                any_failed = True
        fp = next((p for p in proxies if p.name == "forkproxy"), None)
        if args.profile and fp is not None and fp.supports(SCENARIOS[args.profile]):
            profile(env, fp, SCENARIOS[args.profile], args.duration, RESULTS)
        results["elapsed_s"] = time.monotonic() - t_start
        md = render_markdown(results)
        print("\n" + md)
        path = args.json or os.path.join(RESULTS, time.strftime("bench-%Y%m%d-%H%M%S.json"))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.splitext(path)[0] + ".md", "w") as f:
            f.write(md + "\n")
        log(f"results: {path}")
        if args.write_docs:
            write_docs(md)
            log(f"updated {DOCS}")
        if any_failed:
            log("some runs failed (see the tables)")
        return 1 if any_failed else 0
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        return 130
    finally:
        procs.stop_all()
        if env is not None:
            env.cleanup()


def command_line(prog: str, argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in [prog, *argv])


# -- memprobe ------------------------------------------------------------------------------


def smaps(pid: int) -> dict[str, int]:
    """Rss, Pss, Private_Dirty, Shared_Clean... of a process in KiB (smaps_rollup)."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        pass
    return out


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def open_idle(port: int, n: int, held: list) -> None:
    """Open n keep-alive connections, one GET /tiny each, and keep them open (idle)."""
    req = b"GET /tiny HTTP/1.1\r\nHost: memprobe\r\n\r\n"
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(req)
        data = b""
        while not data.endswith(b"ok"):  # /tiny's body; the head has Content-Length: 2
            chunk = s.recv(4096)
            if not chunk:
                raise OSError("proxy closed a keep-alive connection")
            data += chunk
        held.append(s)


#: memprobe's "after closing" sample: forkproxy's workers give freed heap back to the OS
#: at most every 5 s once their connection count has dropped (worker/process.py
#: HeapTrimmer), so wait past that
AFTER_CLOSE_WAIT = 7.0


PAGE = 4096
PFN_MASK = (1 << 55) - 1


def distinct_pages_mib(pids: list[int]) -> float | None:
    """MiB of distinct physical pages mapped by pids; None without page frame numbers."""
    seen: set[int] = set()
    for pid in pids:
        try:
            maps = open(f"/proc/{pid}/maps").read().splitlines()  # noqa: SIM115
            with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
                for line in maps:
                    fields = line.split()
                    if len(fields) > 5 and fields[5] == "[vsyscall]":
                        continue
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    pagemap.seek(lo // PAGE * 8)
                    data = pagemap.read((hi - lo) // PAGE * 8)
                    seen.update(e & PFN_MASK for (e,) in struct.iter_unpack("Q", data)
                                if e >> 63)
        except OSError:
            continue
    seen.discard(0)  # present pages read as frame 0 without CAP_SYS_ADMIN
    return len(seen) * PAGE / 1048576 if seen else None


def probe_proxy(px: Proxy, steps: list[int], settle: float) -> dict:
    """Idle PSS per process, then PSS as idle keep-alive connections are added."""
    master = px.proc.pid
    time.sleep(settle)
    procs = []
    for pid in px.pids():
        m = smaps(pid)
        procs.append({"pid": pid, "comm": _comm(pid), "master": pid == master,
                      "rss_kib": m.get("Rss", 0), "pss_kib": m.get("Pss", 0),
                      "private_dirty_kib": m.get("Private_Dirty", 0)})
    idle = sum(p["pss_kib"] for p in procs)
    idle_distinct = distinct_pages_mib(px.pids())
    # warm up: a few hundred requests over a few connections, then closed
    warm: list = []
    for _ in range(4):
        open_idle(px.port, 1, warm)
    for _ in range(200):
        for s in warm:
            s.sendall(b"GET /tiny HTTP/1.1\r\nHost: memprobe\r\n\r\n")
            data = b""
            while not data.endswith(b"ok"):
                data += s.recv(4096)
    for s in warm:
        s.close()
    time.sleep(settle)
    base = pss_kib(px.pids())
    pids = px.pids()
    fd_base = {pid: fd_count(pid) for pid in pids}
    held: list = []
    points = [(0, base)]
    try:
        for target in steps:
            open_idle(px.port, target - len(held), held)
            time.sleep(settle)
            points.append((len(held), pss_kib(px.pids())))
            log(f"  {px.name}: {len(held)} idle connections, PSS {points[-1][1] / 1024:.1f} MiB")
        spread = {pid: fd_count(pid) - fd_base.get(pid, 0) for pid in px.pids()}
    finally:
        for s in held:
            s.close()
    time.sleep(max(settle, AFTER_CLOSE_WAIT))
    after = pss_kib(px.pids())
    n = points[-1][0]
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs)
    return {"processes": procs, "idle_pss_kib": idle, "idle_distinct_mib": idle_distinct,
            "warm_pss_kib": base,
            "points": points, "per_conn_kib": (points[-1][1] - base) / n if n else None,
            "slope_kib": slope, "after_close_pss_kib": after,
            "fd_growth": {str(k): v for k, v in spread.items() if v}}


def render_memprobe(res: dict) -> str:
    lines = [f"Command: `{res['command']}`  ",
             f"Run: {res['started']}, forkproxy {res['machine'].get('git', '?')}, "
             f"{res['workers']} workers per proxy, {res['connections']:,} idle keep-alive "
             "connections (one GET /tiny each, then idle); forkproxy's bytecode compiled "
             "first, as `pip install` does, run in a venv of its runtime dependencies "
             "alone; load average "
             f"{res['machine'].get('loadavg', '?')}", ""]
    lines += ["| proxy | idle PSS MiB (all processes) | idle distinct pages MiB "
              "| after warm-up | N idle conns "
              "| PSS with N | KiB per idle conn | slope KiB/conn | after closing "
              "| conns per process |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in res["proxies"].items():
        lines.append(
            f"| {name} | {r['idle_pss_kib'] / 1024:.1f} | "
            f"{_num(r.get('idle_distinct_mib'), 1)} | {r['warm_pss_kib'] / 1024:.1f} | "
            f"{r['points'][-1][0]:,} | "
            f"{r['points'][-1][1] / 1024:.1f} | {_num(r['per_conn_kib'], 2)} | "
            f"{_num(r['slope_kib'], 2)} | {r['after_close_pss_kib'] / 1024:.1f} | "
            + ", ".join(str(v) for v in r["fd_growth"].values()) + " |")
    lines.append("")
    fp = res["proxies"].get("forkproxy")
    if fp:
        core = sum(p["pss_kib"] for p in fp["processes"]
                   if p["master"] or p["comm"].startswith("fp-worker")) / 1024
        total = fp["idle_pss_kib"] / 1024
        # PSS shares library pages with every other process that maps them, so it reads
        # low on a busy machine; the tree's distinct pages are its PSS on a dedicated host
        distinct = fp.get("idle_distinct_mib")
        judged = distinct if distinct is not None else total
        per = fp["per_conn_kib"] or 0
        lines += ["| target (issue 7) | forkproxy measured | verdict |", "|---|---:|---|",
                  f"| PSS at idle, master + helpers + {res['workers']} workers <= 40 MiB | "
                  f"{total:.1f} MiB PSS here (master + workers: {core:.1f} MiB); "
                  f"{_num(distinct, 1)} MiB distinct pages, its PSS on a dedicated host | "
                  f"{'met' if judged <= 40 else '**missed**'} |",
                  f"| <= 4 KiB per idle keep-alive connection | {per:.2f} KiB | "
                  f"{'met' if per <= 4 else '**missed**'} |", ""]
    for note in res.get("notes", []):
        lines += [f"- {note}", ""]
    for name, r in res["proxies"].items():
        lines.append(f"{name} at idle: " + "; ".join(
            f"{'master' if p['master'] else p['comm']} {p['pid']}: PSS {p['pss_kib'] / 1024:.1f} MiB (RSS "
            f"{p['rss_kib'] / 1024:.1f}, private dirty {p['private_dirty_kib'] / 1024:.1f})"
            for p in r["processes"]) + ".")
        lines.append("")
    return "\n".join(lines)


def precompile_package() -> None:
    """Write forkproxy's bytecode (``__pycache__``, git-ignored), as ``pip install`` does.
    An editable checkout run with PYTHONDONTWRITEBYTECODE=1 never gets any: its master
    then compiles every module at each start, which left ~1.6 MiB more in the tree at
    idle (compiler garbage and pages touched only by the master). memprobe measures the
    proxy as it is deployed."""
    compileall.compile_dir(os.path.join(ROOT, "forkproxy"), quiet=1)


def main_memprobe(argv: list[str], command: str) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/memprobe",
        description="PSS of forkproxy (master + helpers + workers) at idle and per idle "
                    "keep-alive client connection")
    p.add_argument("--connections", type=int, default=10000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--peers", action="store_true", help="also measure nginx and HAProxy")
    p.add_argument("--settle", type=float, default=1.0, help="seconds before each sample")
    p.add_argument("--json", default=None)
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    args.no_pin = True  # memory does not care; workers spread over all CPUs
    args.want_tls = False
    args.want_upstream_tls = False
    args.want_grpc = False
    err = ensure_tools(["nginx", "openssl", "taskset"] + (["haproxy"] if args.peers else []))
    if err:
        print(f"memprobe: cannot run: {err}", file=sys.stderr)
        return EXIT_SKIP
    ensure_venv()
    precompile_package()
    # this process holds the client ends; the proxies inherit the limit too
    need = args.connections + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(need, hard)))
        except (ValueError, OSError):
            if hard < need:
                print(f"memprobe: RLIMIT_NOFILE hard limit is {hard}, {need} needed "
                      "(raise it, or use fewer --connections)", file=sys.stderr)
                return 1
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    _install_signal_handlers()
    n = args.connections
    steps = sorted({max(1, n // 10), max(1, n // 4), max(1, n // 2), n})
    procs = Procs()
    env = None
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    try:
        env = Env(args, procs)
        env.start_origin()
        res = {"command": command, "started": started, "machine": machine_facts(),
               "workers": args.workers, "connections": n, "proxies": {}}
        kinds = [ForkProxy] + ([NginxProxy, HAProxy] if args.peers else [])
        for kind in kinds:
            px = kind(env)
            psteps = steps
            if isinstance(px, HAProxy):
                # HAProxy refuses to start unless ulimit-n >= 2 x maxconn + a few, and the
                # hard limit cannot be raised without CAP_SYS_RESOURCE: fewer connections
                limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                px.maxconn = min(n + 1000, (limit - 200) // 2)
                psteps = sorted({min(x, px.maxconn - 100) for x in steps})
            try:
                px.start()
                log(f"{px.name} up, pids {px.pids()}")
                res["proxies"][px.name] = probe_proxy(px, psteps, args.settle)
            except (RuntimeError, OSError) as e:
                if kind is ForkProxy:
                    raise
                log(f"{px.name} skipped: {e}")
                res.setdefault("notes", []).append(f"{px.name} skipped: {e}")
            finally:
                px.stop()
        md = render_memprobe(res)
        print(md)
        path = args.json or os.path.join(RESULTS, time.strftime("memprobe-%Y%m%d-%H%M%S.json"))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        log(f"results: {path}")
        if args.write_docs:
            write_docs(md, "<!-- memprobe:begin -->", "<!-- memprobe:end -->")
            log(f"updated {DOCS}")
        return 0
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        return 130
    finally:
        procs.stop_all()
        if env is not None:
            env.cleanup()
