"""Collector shards: more processes for the rings when one core cannot drain them all.

Measured with ``scripts/replay-bench`` (docs/BENCHMARKS.md, "The manager's record
path"): one process drains, counts and logs ~1M request records per second with the
JSON access log on through the compiled record path (125-200k as plain Python); 32 busy
workers make about 800k. With ``[server] collectors = K`` (``auto``: one per 16 workers,
one per 4 as plain Python), the manager keeps the rings whose index
``i`` has ``i % K == 0`` and forks K - 1 shard processes (``fp-collector-k``); shard k
drains the rings with ``i % K == k`` into its own Metrics and the same access log file
(O_APPEND, and every flush is one ``write`` of whole lines, so lines of two shards never
mix within a line). When /metrics or /status asks, the manager adds each shard's
counters to its own (one request over a socketpair per shard); it forwards USR1
(reopen) and HUP (the log's path and format) to the shards, and stops them (each drains
its rings and flushes) before it drains its own.

Shards are forked by the manager before its hub runs anything, and live as long as it:
a shard that exits makes the manager stop (the master then starts a fresh manager with
fresh shards; counters start from zero, as after any manager restart), and a manager
that dies takes its shards along (PR_SET_PDEATHSIG, and EOF on the socketpair).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys

import gevent
import msgspec
from gevent import socket as gsocket
from gevent.lock import Semaphore

from forkproxy import log as log_mod
from forkproxy.config import TracingConfig
from forkproxy.manager.accesslog import WRITE_BEHIND, AccessLog
from forkproxy.manager.collector import Collector
from forkproxy.manager.errorlog import TLSFailureLog
from forkproxy.manager.metrics import Metrics, MetricsState
from forkproxy.manager.records import RecordSink
from forkproxy.manager.tracing import Tracer, TracerCounts
from forkproxy.osutil import drop_privileges, set_pdeathsig
from forkproxy.proctitle import set_name

FLUSH_INTERVAL = 0.5
FORGET_INTERVAL = 5.0
CALL_TIMEOUT = 5.0
STOP_TIMEOUT = 30.0
_FRAME = struct.Struct("!I")


class ShardState(msgspec.Struct, array_like=True, gc=False):
    """What a shard reports: its counters and its access log's."""

    metrics: MetricsState
    log_lines: int
    log_errors: int


_state_decoder = msgspec.msgpack.Decoder(ShardState)
_counts_decoder = msgspec.msgpack.Decoder(TracerCounts)


def my_rings(rings: dict, index: int, count: int) -> dict:
    """The rings collector ``index`` of ``count`` drains (the manager is index 0)."""
    return {i: r for i, r in rings.items() if i % count == index}


def _send(sock, payload: bytes) -> None:
    sock.sendall(_FRAME.pack(len(payload)) + payload)


def _recv(sock) -> bytes | None:
    """One frame, or None at EOF."""
    head = _recv_exact(sock, _FRAME.size)
    if head is None:
        return None
    body = _recv_exact(sock, _FRAME.unpack(head)[0])
    if body is None:
        raise EOFError("collector shard: connection closed mid-frame")
    return body


def _recv_exact(sock, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class Shard:
    """The manager's handle on one shard process."""

    def __init__(self, index: int, pid: int, fd: int):
        self.index = index
        self.pid = pid
        self.sock = gsocket.socket(fileno=fd)
        self.lock = Semaphore()
        self.exit_code: int | None = None

    def call(self, *msg, timeout: float = CALL_TIMEOUT) -> bytes:
        """Send a command, wait for its reply (one at a time per shard).

        A shard that does not answer in time is killed: a late reply would be taken for
        the next one, and the manager restarts (with fresh shards) once it sees it gone.
        """
        with self.lock:
            try:
                with gevent.Timeout(timeout):
                    _send(self.sock, msgspec.msgpack.encode(msg))
                    reply = _recv(self.sock)
                if reply is None:
                    raise EOFError(f"collector shard {self.index} is gone")
            except (OSError, EOFError, gevent.Timeout):
                if not self.exited():
                    os.kill(self.pid, signal.SIGKILL)
                raise
        return reply

    def state(self) -> ShardState:
        return _state_decoder.decode(self.call("state"))

    def tracing(self) -> TracerCounts:
        """The shard's span export counters."""
        return _counts_decoder.decode(self.call("trace_counts"))

    def exited(self) -> bool:
        """True once the process is gone (reaped here)."""
        if self.exit_code is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.exit_code = -1
                return True
            if pid:
                self.exit_code = os.waitstatus_to_exitcode(status)
        return self.exit_code is not None

    def stop(self) -> None:
        """Ask the shard to drain its rings, flush and exit; wait for it (kill at the end)."""
        try:
            self.call("stop", timeout=STOP_TIMEOUT)
        except (OSError, EOFError, gevent.Timeout):
            pass
        deadline = STOP_TIMEOUT
        while not self.exited() and deadline > 0:
            gevent.sleep(0.05)
            deadline -= 0.05
        if not self.exited():
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.exit_code = -signal.SIGKILL
        self.sock.close()


def fork_shards(count: int, rings: dict, *, table, log_path: str, log_format: str,
                creds: tuple, close_fds: list[int], tracing: TracingConfig | None = None,
                write_behind: int = WRITE_BEHIND) -> list[Shard]:
    """Fork collectors 1..count-1. Call before the hub runs anything (the child reinits
    it); ``close_fds`` are the manager's own descriptors (ready and lifeline pipes, its
    access log, admin sockets), which a shard must not hold."""
    shards: list[Shard] = []
    for index in range(1, count):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            parent.close()
            for fd in [*close_fds, *(s.sock.fileno() for s in shards)]:
                try:
                    os.close(fd)
                except OSError:
                    pass
            _child(index, count, rings, table, (log_path, log_format, write_behind), creds,
                   child, tracing)
        child.close()
        shards.append(Shard(index, pid, parent.detach()))
    return shards


def _child(index, count, rings, table, log_spec, creds, sock, tracing) -> None:
    """A shard's main; never returns."""
    code = 0
    try:
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)  # the manager forwards what concerns us
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        set_pdeathsig()
        gevent.reinit()
        set_name(f"fp-collector-{index}")
        logger = log_mod.rebind(f"collector-{index}")
        mine = my_rings(rings, index, count)
        for i, ring in rings.items():
            if i not in mine:
                ring.close()  # this process's mapping only
        _serve(mine, table, log_spec, creds, logger,
               gsocket.socket(fileno=sock.detach()), tracing)
    except BaseException as e:
        print(f"forkproxy collector shard {os.getpid()} crashed: {e!r}", file=sys.stderr)
        code = 3
    finally:
        os._exit(code)


def _serve(rings, table, log_spec, creds, logger, sock, tracing) -> None:
    """``log_spec``: the access log's (path, format, write-behind window)."""
    log_path, log_format, write_behind = log_spec
    try:
        log = AccessLog(log_path, log_format, logger, write_behind)
    except OSError as e:
        logger.error("cannot open the access log: this shard logs nothing", path=log_path,
                     error=e.strerror)
        log = AccessLog("off", log_format, logger)
    drop_privileges(*creds)
    logger.info("collector shard started", rings=sorted(rings), access_log=log.path)
    metrics = Metrics()
    metrics.on_error = TLSFailureLog(logger).observe
    tracer = Tracer(tracing, logger)  # its own exporter: the records of its rings
    collector = Collector(rings, RecordSink(metrics, log, tracer).on_batch, table=table,
                          logger=logger)
    collector.start()
    tracer.start()
    flusher = gevent.spawn(_flush, log, metrics, table)
    stopping = False
    while not stopping:
        frame = _recv(sock)
        if frame is None:  # the manager is gone
            break
        cmd, *args = msgspec.msgpack.decode(frame)
        reply = b""
        if cmd == "state":
            metrics.decode_errors = collector.decode_errors
            reply = msgspec.msgpack.encode(ShardState(metrics.state(), log.lines, log.errors))
        elif cmd == "reopen":
            log.reopen()
        elif cmd == "log":
            log.reconfigure(*args)
        elif cmd == "tracing":
            tracer.configure(msgspec.convert(args[0], TracingConfig,
                                             dec_hook=lambda tp, obj: tp(obj)))
        elif cmd == "trace_counts":
            reply = msgspec.msgpack.encode(tracer.counts())
        elif cmd == "stop":
            stopping = True
            collector.stop()
            flusher.kill()
            collector.drain_all()
            tracer.stop()
            log.close()
        _send(sock, reply)
    collector.stop()
    log.close()


def _flush(log: AccessLog, metrics: Metrics, table) -> None:
    """As the manager's flusher: the log at least twice a second, gone workers' gauges."""
    since_forget = 0.0
    while True:
        gevent.sleep(FLUSH_INTERVAL)
        log.flush()
        since_forget += FLUSH_INTERVAL
        if since_forget >= FORGET_INTERVAL and table is not None:
            since_forget = 0.0
            metrics.forget_workers(e["pid"] for _, e in table.live())
