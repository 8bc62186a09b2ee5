"""The worker's side of introspection: the gauges record it pushes into its ring about
once a second, and the debug hook that answers the manager's /debug/profile and
/debug/greenlets (the protocol is described in forkproxy/manager/profiling.py).
Nothing here runs per request."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket as pysocket
import struct
import time

from forkproxy.context import UpstreamGauge, WorkerGauges, encoder
from forkproxy.debugsock import CONNECT_TIMEOUT, DEBUG_SIGNAL, MAX_HZ, MAX_SECONDS, socket_name

#: greenlet counting walks the gc lists; keep it under this share of the worker's time
GREENLET_COUNT_BUDGET = 0.001
GREENLET_COUNT_MIN_INTERVAL = 5.0


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
    # HTTP/2 and per-protocol connection counters (plain stand-ins may lack them)
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
