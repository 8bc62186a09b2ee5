"""The worker process: a gevent hub pinned to one CPU, accepting on its own
SO_REUSEPORT sockets, one greenlet per client connection.

Runs in the child right after fork(). Everything it needs was imported by the master
before fork (shared copy-on-write pages, see gc.freeze() in the arbiter). The
:class:`Worker` has one method per loop: accept, sweep (deadlines, upstream health,
heap trim), heartbeat, lifeline, and the park/unpark of idle connections.
"""

from __future__ import annotations

import errno
import gc
import os
import resource
import signal
import socket as pysocket
import sys
import time

import gevent
from gevent import socket
from gevent.event import Event

from forkproxy import osutil
from forkproxy.http.proxy_protocol import ProxyProtocolError, recv_header
from forkproxy.worker import faults, frontends, profiling
from forkproxy.worker import tls as worker_tls
from forkproxy.worker.front import Deadline
from forkproxy.worker.heap import HeapTrimmer, settle_heap
from forkproxy.worker.http1 import Http1Connection
from forkproxy.worker.runners import Runners
from forkproxy.worker.sockio import nodelay_for_accepted
from forkproxy.worker.spec import WorkerSpec
from forkproxy.worker.state import ListenerRuntime, WorkerState

#: how often connection deadlines are checked (timeouts are this coarse)
SWEEP_INTERVAL = 0.1
#: during a graceful stop, idle keep-alive connections are closed after this long idle
DRAIN_IDLE = 0.5
#: signals the master handles; a worker ignores them (its own are QUIT, TERM, INT)
_IGNORED = (signal.SIGHUP, signal.SIGUSR2, signal.SIGWINCH, signal.SIGTTIN, signal.SIGTTOU,
            signal.SIGUSR1)
#: accept() errors that mean "out of a resource": back off instead of spinning
_ACCEPT_RESOURCE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _wait_read(fd: int, timeout: float) -> None:
    socket.wait_read(fd, timeout=timeout, timeout_exc=TimeoutError("PROXY header timeout"))


class Worker:
    """One worker process's life: set-up, the loops, the drain."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.cfg = spec.cfg
        self.logger = spec.logger
        self.stop = Event()  # TERM, INT or the master's death: exit now
        self.graceful = Event()  # QUIT: stop accepting, drain, exit
        self.slots_free = Event()  # below max_connections: the acceptors may go on
        self.slots_free.set()
        self.max_conns = spec.cfg.server.max_connections
        self.ws: WorkerState | None = None
        self.hub = None
        self.listeners: list[tuple[object, ListenerRuntime]] = []
        self.acceptors: list = []
        self.runners: Runners | None = None  # the connections' greenlets, made in run()
        self.trimmer = HeapTrimmer()

    # -- start-up ------------------------------------------------------------------------

    def run(self) -> None:
        """Set up, serve until told to stop, drain; raises SystemExit."""
        self._prepare_process()
        self.hub = gevent.get_hub()  # the hub and its imports exist before privileges drop
        self.runners = Runners(self.hub)
        self.ws = WorkerState(self.spec, self.hub, self.unpark)
        self._install_signals()
        self._build_listeners()
        # last step of the set-up: afterwards files under the master's home may be unreadable
        osutil.drop_privileges(self.spec.uid, self.spec.gid, self.spec.groups)
        # what the worker built at start lives as long as the worker: frozen out of the
        # collector's generations (heap.py). Greenlets are spawned after this, so the
        # gauges' greenlet count still sees them.
        settle_heap()
        self.acceptors = [gevent.spawn(self.accept_loop, lsock, lr)
                          for lsock, lr in self.listeners]
        gevent.spawn(self.sweep_loop)
        gevent.spawn(self.lifeline_loop)
        heartbeat = gevent.spawn(self.heartbeat_loop)
        self._report_ready()
        while not self.stop.is_set() and not self.graceful.is_set():
            gevent.wait([self.stop, self.graceful], count=1)
        if self.stop.is_set():
            raise SystemExit(0)
        self.drain()
        heartbeat.kill(block=False)
        self._beat()
        for up in self.ws.upstreams.values():
            up.close_idle()
        raise SystemExit(0)

    def _prepare_process(self) -> None:
        spec = self.spec
        osutil.set_pdeathsig()  # plus the lifeline pipe
        if faults.STARTUP:
            raise RuntimeError("fault injected: FORKPROXY_FAULT=startup")
        if os.getppid() == 1:
            raise SystemExit(0)
        gevent.reinit()
        # spawn() would record the spawning stack of every connection's greenlet otherwise
        gevent.config.track_greenlet_tree = False
        gc.enable()
        if spec.cpu is not None:
            try:
                os.sched_setaffinity(0, {spec.cpu})
            except OSError as e:
                self._warn("cannot pin the worker to its CPU", cpu=spec.cpu, error=e.strerror)
        nofile = spec.cfg.server.worker_rlimit_nofile
        if nofile:
            try:  # soft and hard: the hard limit only rises with privileges
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            except (ValueError, OSError) as e:
                self._warn("cannot set worker_rlimit_nofile", value=nofile, error=str(e))

    def _install_signals(self) -> None:
        gevent.signal_handler(signal.SIGQUIT, self.graceful.set)
        gevent.signal_handler(signal.SIGTERM, self.stop.set)
        gevent.signal_handler(signal.SIGINT, self.stop.set)
        for sig in _IGNORED:
            signal.signal(sig, signal.SIG_IGN)
        profiling.install_worker_hook(self.logger)
        # the master forked us with its signals blocked; our handlers are in place now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signal.valid_signals())

    def _build_listeners(self) -> None:
        spec = self.spec
        cfg = self.cfg
        keystore = spec.keystore.reader() if spec.keystore is not None else None
        for li, lsock in spec.sockets:
            lcfg = cfg.listener[li]
            default = self.ws.upstreams.get(lcfg.upstream) if lcfg.upstream else None
            tls_ctx = None
            if lcfg.tls is not None:
                tls_ctx = worker_tls.worker_tls_context(cfg, li, keystore)
            h2c = tls_ctx is None and "h2c" in worker_tls.served_protocols(lcfg)
            lr = ListenerRuntime(lcfg.listen, default, b"https" if tls_ctx else b"http",
                                 tls_ctx, lcfg.proxy_protocol, h2c)
            self.listeners.append((lsock, lr))

    def _report_ready(self) -> None:
        self._beat()
        try:
            os.write(self.spec.ready_fd, b"R")
            os.close(self.spec.ready_fd)
        except OSError:
            pass

    def _warn(self, event: str, **fields) -> None:
        if self.logger is not None:
            self.logger.warning(event, **fields)
        else:
            print(f"forkproxy worker {os.getpid()}: {event} {fields}", file=sys.stderr)

    # -- connections ---------------------------------------------------------------------

    def accept_loop(self, lsock, lr: ListenerRuntime) -> None:
        ws = self.ws
        run = self.runners.run
        gsock = socket.socket(fileno=os.dup(lsock.fileno()))
        nodelay_for_accepted(gsock)
        backoff = 0.0
        graceful = self.graceful
        try:
            while not graceful.is_set():
                if len(ws.connections) >= self.max_conns:
                    self.slots_free.clear()
                    self.slots_free.wait(1.0)
                    continue
                try:
                    sock, addr = gsock.accept()
                except OSError as e:
                    if e.errno in _ACCEPT_RESOURCE:
                        backoff = min(max(backoff * 2, 0.01), 1.0)
                        self._warn("accept failed, backing off", error=e.strerror,
                                   backoff=backoff)
                        gevent.sleep(backoff)
                        continue
                    if graceful.is_set() or e.errno == errno.EBADF:
                        return
                    continue
                backoff = 0.0
                # registered before its greenlet runs: a drain that starts in between
                # still waits for it instead of exiting with the socket unserved
                conn = Http1Connection(ws, lr, sock, addr, time.monotonic())
                ws.connections.add(conn)
                run(self.serve_connection, conn)
        finally:
            gsock.close()

    def serve_connection(self, conn: Http1Connection) -> None:
        """A new connection's greenlet: PROXY header, TLS, per-IP limit, its requests."""
        self._serve(conn, True)

    def resume(self, conn) -> None:
        """A parked connection's new greenlet: its next requests."""
        self._serve(conn, False)

    def _serve(self, conn, fresh: bool) -> None:
        parked = False
        front = conn  # the connection's front end: an HTTP/2 one may take its place
        try:
            if not fresh or self._open(conn):
                if fresh:
                    front = self._protocol(conn)
                if front is not None:
                    parked = front.serve()
        except Exception as e:  # a bug must not take the worker down with it
            if self.logger is not None:
                self.logger.exception("connection failed", remote=conn.remote, error=str(e))
            self._close_quietly(conn)
        finally:
            if not parked:
                front = conn if front is None else front
                front.greenlet = None  # the runner serves others next: no Deadline for it
                self.finish(front)

    def _open(self, conn) -> bool:
        """The steps before a new connection's first request; False = it is done."""
        if conn.listener.proxy_protocol and not self._read_proxy_header(conn):
            return False
        if conn.listener.tls_context is not None and not conn.start_tls():
            return False
        climits = self.ws.client_limits
        if climits is not None and climits.per_ip:
            if not climits.open(conn.remote):
                conn.refuse(climits.status, "conn_limit")
                return False
            conn.counted = conn.remote
        return True

    def _protocol(self, conn):
        """The front end for a new connection's protocol: HTTP/2 when ALPN chose h2,
        or, on a listener that accepts h2c, when the client starts with the HTTP/2
        preface; else the HTTP/1.1 connection itself. None: it closed meanwhile."""
        lr = conn.listener
        h2 = None
        if conn.sslobj is not None:
            if conn.sock.selected_alpn_protocol() == "h2":
                h2, label = frontends.CONNECTIONS["h2"].adopt(conn), "h2"
        elif lr.h2c:
            first = self._peek_preface(conn)
            if first is None:
                self._close_quietly(conn)
                return None
            if first == frontends.PREFACES["h2c"]:
                h2, label = frontends.CONNECTIONS["h2"].adopt(conn), "h2c"
        if h2 is None:
            self.ws.count_connection(lr.name, "http/1.1")
            return conn
        self.ws.count_connection(lr.name, label)
        self.ws.connections.discard(conn)
        self.ws.connections.add(h2)
        return h2

    def _peek_preface(self, conn) -> bytes | None:
        """The first bytes of a plain connection, left in the socket: the 24 of the
        HTTP/2 preface, or as many as show it is not one. None: closed or timed out."""
        preface = frontends.PREFACES["h2c"]
        conn.greenlet = gevent.getcurrent()  # the sweeper throws Deadline into it
        conn.deadline = time.monotonic() + self.ws.header_timeout
        try:
            while True:
                socket.wait_read(conn.sock.fileno())
                data = conn.sock.recv(len(preface), pysocket.MSG_PEEK)
                if not data:
                    return None
                if len(data) == len(preface) or not preface.startswith(data):
                    return data
                gevent.sleep(0.01)  # a prefix of the preface: wait for the rest
        except (OSError, Deadline):
            return None
        finally:
            conn.deadline = 0.0

    def _read_proxy_header(self, conn) -> bool:
        """A listener behind an L4 balancer: the PROXY v1/v2 header carries the client's
        address (it then feeds X-Forwarded-For and the access log). Bad header: close."""
        try:
            hdr = recv_header(conn.sock, self.ws.header_timeout, wait_readable=_wait_read)
        except (ProxyProtocolError, TimeoutError, OSError):
            self._close_quietly(conn)
            return False
        if hdr.src is not None:
            conn.remote = hdr.src[0]
        return True

    @staticmethod
    def _close_quietly(conn) -> None:
        try:
            conn.sock.close()
        except OSError:
            pass

    def finish(self, conn) -> None:
        """A connection is gone: per-IP count, registry, accept back-pressure."""
        ws = self.ws
        if conn.counted is not None:
            ws.client_limits.close(conn.counted)
            conn.counted = None
        ws.connections.discard(conn)
        if len(ws.connections) < self.max_conns:
            self.slots_free.set()

    def unpark(self, conn) -> None:
        """libev callback, in the hub: a parked idle connection became readable."""
        conn.unparked()
        self.runners.run(self.resume, conn)

    # -- the periodic loops --------------------------------------------------------------

    def sweep_loop(self) -> None:
        """One timer for all connections: expire the ones past their deadline; apply
        upstream health and weights; trim the heap after a fall in connections."""
        ws = self.ws
        upstreams = list(ws.upstreams.values())
        run_callback = self.hub.loop.run_callback
        expire = self.expire
        while True:
            gevent.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for up in upstreams:  # health verdicts, ejections, slow start, idle sweep
                up.refresh(now)
            if self.trimmer.check(len(ws.connections), now):
                ws.trim_buffers()
                self.runners.clear()
            for conn in ws.connections:
                d = conn.deadline
                if d and d < now:
                    run_callback(expire, conn)
            for stream in ws.streams:  # HTTP/2 streams: their exchanges' deadlines
                d = stream.deadline
                if d and d < now:
                    run_callback(expire, stream)

    def expire(self, conn) -> None:
        """In the hub: a connection past its deadline. A parked one is closed here; an
        active one gets Deadline thrown into its greenlet."""
        d = conn.deadline
        if not d or d >= time.monotonic():
            return
        conn.deadline = 0.0
        if conn.parked is not None:
            conn.unparked()  # parked past its keep-alive timeout
            self._close_quietly(conn)
            self.finish(conn)
            return
        g = conn.greenlet
        if g is not None and not g.dead:
            g.throw(Deadline("timed out"))

    def lifeline_loop(self) -> None:
        """The master's end of the lifeline pipe closes when it dies: exit then."""
        try:
            socket.wait_read(self.spec.lifeline_fd)
        except Exception:
            pass
        self.stop.set()

    def heartbeat_loop(self) -> None:
        """Once a second: the worker table's heartbeat and the gauges record."""
        while True:
            self._beat()
            profiling.push_gauges(self.ws)
            gevent.sleep(1.0)

    def _beat(self) -> None:
        table = self.spec.table
        if table is not None:
            table.beat(self.spec.index, self.ws.requests, len(self.ws.connections))

    # -- graceful stop -------------------------------------------------------------------

    def drain(self) -> None:
        """Stop accepting, let in-flight requests finish, close idle keep-alives.

        An idle keep-alive connection is closed only once it has been idle for a moment
        during the drain: a client that is using it gets its next response with
        "Connection: close" instead of racing our close with its request."""
        ws = self.ws
        ws.draining = True
        gevent.killall(self.acceptors, block=False)
        for conn in list(ws.connections):
            conn.start_drain()
        for lsock, _ in self.listeners:
            try:
                lsock.close()
            except OSError:
                pass
        deadline = time.monotonic() + self.cfg.server.graceful_timeout
        while ws.connections and time.monotonic() < deadline and not self.stop.is_set():
            now = time.monotonic()
            for conn in list(ws.connections):
                if conn.idle and now - conn.idle_since > DRAIN_IDLE:
                    conn.idle = False
                    try:
                        conn.sock.shutdown(pysocket.SHUT_RDWR)
                    except OSError:
                        pass
            gevent.sleep(0.05)


def run(spec: WorkerSpec) -> None:
    """Worker main; never returns (exits the process)."""
    code = 0
    try:
        Worker(spec).run()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    except BaseException as e:  # the master logs our exit status; say why on stderr
        try:
            if spec.logger is not None:
                spec.logger.exception("worker crashed", error=str(e))
            else:
                print(f"forkproxy worker {os.getpid()} crashed: {e!r}", file=sys.stderr)
        finally:
            code = 3
    finally:
        os._exit(code)
