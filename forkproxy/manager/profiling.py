"""Worker introspection on demand (the pprof of forkproxy), and the worker's gauges record.

Nothing here runs per request, and nothing runs at all until the admin endpoint asks:

* The worker calls :func:`install_worker_hook` once at start-up. It registers a gevent
  (libev) handler for ``DEBUG_SIGNAL`` (a realtime signal) and does nothing else: no
  thread, no timer, no file descriptor.
* ``GET /debug/profile?pid=P&seconds=N`` or ``/debug/greenlets?pid=P`` in the manager
  (:func:`ask_worker`) binds an abstract Unix socket named after the master and the
  worker pid, checks in /proc that the worker catches ``DEBUG_SIGNAL`` (a realtime
  signal's default action would kill it), and sends the signal.
* The worker's handler spawns a greenlet that connects to that socket, checks with
  SO_PEERCRED that the peer is a sibling (same parent, same uid or root) — the manager
  checks that the peer is the worker it signalled — reads one JSON command line, runs it,
  writes a JSON answer and closes. One command at a time per worker.

Commands:

* ``profile``: CPU sampling for N seconds. ``setitimer(ITIMER_PROF)`` delivers SIGPROF
  every 1/hz seconds of CPU time (user + system) of the worker; the Python handler walks
  the interrupted frame's stack (that is the greenlet on the CPU) and counts the
  collapsed stack. An idle worker yields few samples: this is a CPU profile, not wall
  time. About 10-30 us per sample: 0.1-0.3% of a core at the default 100 Hz, only while
  profiling. The answer renders as "frame;frame;frame count" lines (flamegraph.pl,
  inferno, speedscope take them).
* ``greenlets``: every greenlet object alive (a gc walk), grouped by identical stack,
  biggest group first: the leak finder.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket as pysocket
import struct
import time

from forkproxy.context import UpstreamGauge, WorkerGauges, encoder

DEBUG_SIGNAL = signal.SIGRTMIN + 6
MAX_SECONDS = 120.0
MAX_HZ = 1000
CONNECT_TIMEOUT = 2.0

#: greenlet counting walks the gc lists; keep it under this share of the worker's time
GREENLET_COUNT_BUDGET = 0.001
GREENLET_COUNT_MIN_INTERVAL = 5.0


def socket_name(master_pid: int, worker_pid: int) -> bytes:
    """Abstract Unix socket name (nothing in the file system, gone with the socket)."""
    return b"\0forkproxy-debug-%d-%d" % (master_pid, worker_pid)


# -- worker side: gauges --------------------------------------------------------------------

_greenlets = {"count": -1, "next": 0.0}


def count_greenlets() -> int:
    """Greenlet objects alive in this process (a walk over the gc-tracked objects).

    Objects frozen by the master's gc.freeze() are not walked (they are in the permanent
    generation), so this only touches the worker's own objects.
    """
    from greenlet import greenlet

    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet))


def gauges(ws, now: float | None = None) -> WorkerGauges:
    """The gauges record of a worker (forkproxy.worker.process.WorkerState).

    Greenlets are counted at most every GREENLET_COUNT_MIN_INTERVAL seconds, and less
    often when the walk is slow (it stays under GREENLET_COUNT_BUDGET of the time); in
    between, the last count is repeated.
    """
    now = time.monotonic() if now is None else now
    state = _greenlets
    if now >= state["next"]:
        t0 = time.perf_counter()
        state["count"] = count_greenlets()
        cost = time.perf_counter() - t0
        state["next"] = now + max(GREENLET_COUNT_MIN_INTERVAL, cost / GREENLET_COUNT_BUDGET)
    # worker.upstream.Server.gauge(): pool, state, counters (plain stand-ins: the 4 basics)
    ups = [s.gauge() if hasattr(s, "gauge") else
           UpstreamGauge(up.name, s.address, s.active, len(s.idle))
           for up in ws.upstreams.values() for s in up.servers]
    return WorkerGauges(ws.pid, now, state["count"], len(ws.connections), ups,
                        dict(getattr(ws, "client_conns", {})),
                        dict(getattr(ws, "http2_errors", {})),
                        getattr(ws, "h2_connections", 0), len(getattr(ws, "streams", ())))


def push_gauges(ws) -> bool:
    """Push the gauges record into the worker's ring (never blocks; False if dropped)."""
    ring = ws.ring
    if ring is None:
        return False
    return ring.push(encoder.encode(gauges(ws)))


# -- worker side: the debug hook ------------------------------------------------------------

_busy = {"on": False}


def install_worker_hook(logger=None) -> None:
    """Call once in the worker after gevent.reinit(): catches DEBUG_SIGNAL."""
    import gevent

    def on_signal():
        if _busy["on"]:
            return
        _busy["on"] = True
        gevent.spawn(_serve_one, logger)

    gevent.signal_handler(DEBUG_SIGNAL, on_signal)


def _peer_ok(sock) -> bool:
    """The peer is a sibling of this worker (the manager): same parent, same uid or root."""
    creds = sock.getsockopt(pysocket.SOL_SOCKET, pysocket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    if uid not in (0, os.getuid()):
        return False
    return _ppid(pid) == os.getppid()


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _serve_one(logger) -> None:
    from gevent import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(socket_name(os.getppid(), os.getpid()))
        if not _peer_ok(sock):
            return
        line = b""
        while not line.endswith(b"\n") and len(line) < 4096:
            chunk = sock.recv(4096)
            if not chunk:
                return
            line += chunk
        cmd = json.loads(line)
        if cmd.get("cmd") == "profile":
            seconds = min(max(float(cmd.get("seconds", 10)), 0.01), MAX_SECONDS)
            hz = min(max(int(cmd.get("hz", 100)), 1), MAX_HZ)
            answer = sample_cpu(seconds, hz)
        elif cmd.get("cmd") == "greenlets":
            answer = greenlet_report(int(cmd.get("limit", 50)))
        else:
            answer = {"error": f"unknown command {cmd.get('cmd')!r}"}
        sock.settimeout(30.0)
        sock.sendall(json.dumps(answer).encode())
    except Exception as e:  # never take the worker down for a debugging aid
        if logger is not None:
            logger.warning("debug request failed", error=str(e))
    finally:
        sock.close()
        _busy["on"] = False


def _frame_name(code, cache: dict) -> str:
    name = cache.get(code)
    if name is None:
        fn = code.co_filename
        parts = fn.rsplit("/", 3)
        short = "/".join(parts[-2:]) if len(parts) > 1 else fn
        name = f"{code.co_qualname} ({short}:{code.co_firstlineno})".replace(";", ",")
        cache[code] = name
    return name


def sample_cpu(seconds: float, hz: int = 100) -> dict:
    """Sample this process's Python stacks on CPU time for ``seconds`` (cooperatively)."""
    import gevent

    counts: dict[str, int] = {}
    names: dict = {}
    total = [0]

    def on_prof(signum, frame):
        stack = []
        f = frame
        while f is not None:
            stack.append(_frame_name(f.f_code, names))
            f = f.f_back
        key = ";".join(reversed(stack)) or "(no python frame)"
        counts[key] = counts.get(key, 0) + 1
        total[0] += 1

    interval = 1.0 / hz
    cpu0 = time.process_time()
    old = signal.signal(signal.SIGPROF, on_prof)
    signal.setitimer(signal.ITIMER_PROF, interval, interval)
    try:
        gevent.sleep(seconds)
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, old)
    return {"pid": os.getpid(), "seconds": seconds, "hz": hz, "samples": total[0],
            "cpu_seconds": round(time.process_time() - cpu0, 6), "stacks": counts}


def greenlet_report(limit: int = 50) -> dict:
    """Greenlets alive, grouped by identical stack (largest groups first)."""
    import traceback

    from greenlet import getcurrent, greenlet

    me = getcurrent()
    groups: dict[tuple, dict] = {}
    total = 0
    for g in gc.get_objects():
        if not isinstance(g, greenlet):
            continue
        total += 1
        if g is me:
            stack = ("(this debug greenlet)",)
        elif g.dead:
            stack = ("(dead)",)
        elif not g or g.gr_frame is None:
            stack = ("(not started)",)
        else:
            stack = tuple(f"{fs.filename}:{fs.lineno} in {fs.name}"
                          for fs in traceback.extract_stack(g.gr_frame, limit=40))
        grp = groups.get(stack)
        if grp is None:
            grp = groups[stack] = {"count": 0, "examples": [], "stack": list(stack)}
        grp["count"] += 1
        if len(grp["examples"]) < 3:
            grp["examples"].append(_describe(g))
    ordered = sorted(groups.values(), key=lambda x: -x["count"])
    return {"pid": os.getpid(), "total": total, "groups": ordered[:max(1, limit)]}


def _describe(g) -> str:
    try:
        name = getattr(g, "name", None) or type(g).__name__
        run = getattr(g, "_run", None) or getattr(g, "run", None)
        target = getattr(run, "__qualname__", None) or repr(run)[:80]
        return f"{name} {target}"
    except Exception:
        return type(g).__name__


# -- manager side -------------------------------------------------------------------------


class DebugError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def catches_debug_signal(pid: int) -> bool:
    """True if the process has a handler for DEBUG_SIGNAL (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (DEBUG_SIGNAL - 1) & 1)
    except (OSError, ValueError):
        return False
    return False


_asking: set[int] = set()


def ask_worker(worker_pid: int, command: dict, timeout: float) -> dict:
    """Manager side: run ``command`` in a worker and return its JSON answer (gevent)."""
    from gevent import socket

    if worker_pid in _asking:
        raise DebugError(409, f"a debug request to worker {worker_pid} is already running")
    if not catches_debug_signal(worker_pid):
        raise DebugError(501, f"worker {worker_pid} has no debug hook (or is gone)")
    _asking.add(worker_pid)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            srv.bind(socket_name(os.getppid(), worker_pid))
        except OSError as e:
            raise DebugError(409, f"debug socket for worker {worker_pid} busy: {e.strerror}")
        srv.listen(1)
        srv.settimeout(CONNECT_TIMEOUT)
        os.kill(worker_pid, DEBUG_SIGNAL)
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            raise DebugError(504, f"worker {worker_pid} did not answer the debug signal")
        with conn:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            if struct.unpack("3i", creds)[0] != worker_pid:
                raise DebugError(502, "unexpected peer on the debug socket")
            conn.settimeout(timeout)
            conn.sendall(json.dumps(command).encode() + b"\n")
            chunks = []
            while True:
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    raise DebugError(504, f"worker {worker_pid} did not finish in time")
                if not data:
                    break
                chunks.append(data)
        if not chunks:
            raise DebugError(502, f"worker {worker_pid} closed the debug socket")
        return json.loads(b"".join(chunks))
    except ProcessLookupError:
        raise DebugError(404, f"no process {worker_pid}")
    finally:
        srv.close()
        _asking.discard(worker_pid)


def collapsed(profile: dict) -> str:
    """The profile as collapsed stacks ("frame;frame count" lines, hottest first)."""
    stacks = profile.get("stacks", {})
    return "".join(f"{k} {v}\n" for k, v in sorted(stacks.items(), key=lambda kv: -kv[1]))
