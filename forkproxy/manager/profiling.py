"""Worker introspection on demand (the pprof of forkproxy): the manager's side.

Nothing here runs per request, and nothing runs at all until the admin endpoint asks:

* The worker calls ``forkproxy.worker.profiling.install_worker_hook`` once at start-up. It registers a gevent
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

import json
import os
import struct

from forkproxy.debugsock import CONNECT_TIMEOUT, DEBUG_SIGNAL, MAX_HZ, MAX_SECONDS, socket_name

__all__ = ["MAX_HZ", "MAX_SECONDS", "DebugError", "ask_worker", "catches_debug_signal",
           "collapsed"]


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
