"""The worker process: a gevent hub pinned to one CPU, accepting on its own
SO_REUSEPORT sockets, one greenlet per client connection.

Runs in the child right after fork(). Everything it needs was imported by the master
before fork (shared copy-on-write pages, see gc.freeze() in the arbiter).
"""

from __future__ import annotations

import errno
import gc
import os
import signal
import socket as pysocket
import sys
import time

import gevent
from gevent import socket
from gevent.event import Event

from forkproxy.context import RequestContext, encoder
from forkproxy.http.proxy_protocol import ProxyProtocolError, recv_header
from forkproxy.http.request import Limits
from forkproxy.manager import profiling
from forkproxy.shm.limitzone import ClientLimits
from forkproxy.worker import tls as worker_tls
from forkproxy.worker.connection import Connection, Deadline
from forkproxy.worker.router import Router
from forkproxy.worker.splice import PipePool
from forkproxy.worker.upstream import build_upstreams

#: how often connection deadlines are checked (timeouts are this coarse)
SWEEP_INTERVAL = 0.1
#: during a graceful stop, idle keep-alive connections are closed after this long idle
DRAIN_IDLE = 0.5
#: gc.collect() + malloc_trim(0) once the connection count fell by TRIM_MIN_DROP and to half of
#: its high-water mark, checked at most every TRIM_INTERVAL seconds (see HeapTrimmer)
TRIM_INTERVAL = 5.0
TRIM_MIN_DROP = 500
#: fault injection for tests ("startup": crash at start-up; "request": a request whose
#: path starts with /__fault__ raises inside the worker, see _inject_request_fault)
FAULT = os.environ.get("FORKPROXY_FAULT", "")


class HeapTrimmer:
    """Hands freed heap memory back to the OS after many connections are gone.

    Closed connections leave garbage cycles (a request parser and its callbacks) that
    only a full collection frees, and glibc's malloc keeps freed memory unless asked:
    ``gc.collect()`` then ``malloc_trim(0)`` (which releases the free pages of every
    malloc arena). Together they take a few ms to a few tens of ms, so the sweeper calls
    :meth:`check` and they run only when the count fell well below its high-water mark,
    at most once every TRIM_INTERVAL seconds; never on a request's path. What pymalloc
    holds in partly used arenas stays resident (CPython does not give free pools back).
    Without glibc's malloc_trim, nothing is done.
    """

    __slots__ = ("peak", "next_check", "trims", "_trim")

    def __init__(self):
        self.peak = 0
        self.next_check = 0.0
        self.trims = 0
        try:
            import ctypes

            self._trim = ctypes.CDLL(None).malloc_trim
            self._trim.argtypes = [ctypes.c_size_t]
            self._trim.restype = ctypes.c_int
        except (OSError, AttributeError):
            self._trim = None

    def check(self, connections: int, now: float) -> bool:
        """Track the high-water mark; trim if due. True if it trimmed."""
        if connections > self.peak:
            self.peak = connections
        if now < self.next_check or self._trim is None:
            return False
        self.next_check = now + TRIM_INTERVAL
        if self.peak - connections < TRIM_MIN_DROP or connections > self.peak // 2:
            return False
        gc.collect()
        self._trim(0)
        self.peak = connections
        self.trims += 1
        return True


class ListenerRuntime:
    """What a connection needs to know about the listener it came in on."""

    __slots__ = ("name", "default_upstream", "scheme", "host_fallback", "tls_context",
                 "proxy_protocol")

    def __init__(self, name: str, default_upstream, scheme: bytes, tls_context=None,
                 proxy_protocol: bool = False):
        self.name = name
        self.default_upstream = default_upstream
        self.scheme = scheme
        self.host_fallback = name.encode()
        self.tls_context = tls_context
        self.proxy_protocol = proxy_protocol


class WorkerSpec:
    """Everything the master hands a worker at fork (documented fork-shared state)."""

    def __init__(self, *, cfg, slot: int, index: int, generation: int, cpu: int | None,
                 sockets: list, ready_fd: int, lifeline_fd: int, ring=None, table=None,
                 keystore=None, logger=None, uid=None, gid=None, groups=None,
                 limit_zone=None, health=None):
        self.cfg = cfg
        self.slot = slot
        self.index = index  # worker-table entry / ring number
        self.generation = generation
        self.cpu = cpu
        self.sockets = sockets  # [(listener_index, socket)] for this slot
        self.ready_fd = ready_fd
        self.lifeline_fd = lifeline_fd
        self.ring = ring
        self.table = table
        self.keystore = keystore
        self.logger = logger
        self.uid = uid
        self.gid = gid
        self.groups = groups
        self.limit_zone = limit_zone  # per-client-IP limits (forkproxy.shm.limitzone)
        self.health = health  # active health verdicts (forkproxy.shm.health), read-only


class WorkerState:
    """Per-worker state shared by all its connections (no locks: one thread)."""

    def __init__(self, spec: WorkerSpec):
        cfg = spec.cfg
        srv = cfg.server
        self.spec = spec
        self.pid = os.getpid()
        self.limits = Limits(srv.max_request_line, srv.max_header_size, srv.max_header_count,
                             srv.max_headers_total, srv.max_body_size)
        self.keepalive_timeout = srv.keepalive_timeout
        self.header_timeout = srv.client_header_timeout
        self.body_timeout = srv.client_body_timeout
        self.send_timeout = srv.send_timeout
        self.buffer_size = srv.buffer_size
        self.upstreams = build_upstreams(cfg.upstream, spec.health)
        self.router = Router(cfg.route, self.upstreams)
        self.rbuf = bytearray(65536)
        self.rview = memoryview(self.rbuf)
        self._buffers: list[bytearray] = []
        self.draining = False
        self.connections: set[Connection] = set()
        self.requests = 0
        self.stats_errors = 0
        self._rid_prefix = b"%08x" % (int.from_bytes(os.urandom(4), "big"))
        self._rid = 0
        self.ring = spec.ring
        self.pipes = PipePool() if srv.splice else None
        self._encbuf = bytearray(512)
        self.listener_names: list[str] = []
        self.client_limits = None
        if spec.limit_zone is not None:
            spec.limit_zone.bind(spec.index)
            self.client_limits = ClientLimits(spec.limit_zone, cfg.limits)

    def new_request_id(self) -> bytes:
        self._rid += 1
        return b"%s%08x" % (self._rid_prefix, self._rid)

    def get_buffer(self) -> bytearray:
        return self._buffers.pop() if self._buffers else bytearray(self.buffer_size)

    def put_buffer(self, buf: bytearray) -> None:
        if len(self._buffers) < 64:
            self._buffers.append(buf)

    def record(self, conn, req, status, bytes_out, server, upconn, bytes_in, times,
               error: str = "", tunnel: bool = False) -> None:
        """Leave the request context in the ring (never blocks; drops when full)."""
        self.requests += 1
        retries = conn.retries
        if retries:
            conn.retries = 0
        ring = self.ring
        if ring is None:
            return
        ctx = RequestContext(
            time.time(), req.request_id.decode("latin-1"), self.pid, conn.listener.name,
            conn.remote, req.method, req.path.decode("latin-1"), status, bytes_in, bytes_out,
            server.upstream.name if server is not None else "",
            server.address if server is not None else "",
            upconn.reused if upconn is not None else False,
            conn.tls_resumed, conn.tls_version, times, error, conn.reject, retries, tunnel,
        )
        if conn.reject:
            conn.reject = ""
        buf = self._encbuf
        encoder.encode_into(ctx, buf)
        ring.push(buf)


def _wait_read(fd: int, timeout: float) -> None:
    socket.wait_read(fd, timeout=timeout, timeout_exc=TimeoutError("PROXY header timeout"))


def read_proxy_header(conn, sock) -> bool:
    """A listener behind an L4 balancer: the PROXY v1/v2 header carries the client's
    address (it then feeds X-Forwarded-For and the access log). Bad header: close."""
    try:
        hdr = recv_header(sock, conn.ws.header_timeout, wait_readable=_wait_read)
    except (ProxyProtocolError, TimeoutError, OSError):
        try:
            sock.close()
        except OSError:
            pass
        return False
    if hdr.src is not None:
        conn.remote = hdr.src[0]
    return True


def _set_pdeathsig() -> None:
    """Ask the kernel to SIGTERM us when the master dies (plus the lifeline pipe)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _set_nofile(n: int, logger) -> None:
    """RLIMIT_NOFILE = n (soft and hard: the hard limit only rises with privileges)."""
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    except (ValueError, OSError) as e:
        if logger is not None:
            logger.warning("cannot set worker_rlimit_nofile", value=n, error=str(e))


def _inject_request_fault() -> None:
    """FORKPROXY_FAULT=request: paths under /__fault__ raise in the middle of handle(),
    the way a bug would (/__fault__/after-head raises once the response has started)."""
    original = Connection.handle

    def handle(self, req):
        if req.path.startswith(b"/__fault__"):
            if req.path.startswith(b"/__fault__/after-head"):
                self.resp_started = True
                from forkproxy.worker.connection import send_all

                send_all(self.sock, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            raise RuntimeError("fault injected: FORKPROXY_FAULT=request")
        return original(self, req)

    Connection.handle = handle


def run(spec: WorkerSpec) -> None:
    """Worker main; never returns (exits the process)."""
    code = 0
    try:
        _run(spec)
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


def _run(spec: WorkerSpec) -> None:
    _set_pdeathsig()
    if FAULT == "startup":
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
        except OSError as e:  # serving unpinned beats not serving; never silently
            if spec.logger is not None:
                spec.logger.warning("cpu pinning failed", cpu=spec.cpu, error=e.strerror)
    nofile = spec.cfg.server.worker_rlimit_nofile
    if nofile:
        _set_nofile(nofile, spec.logger)
    if FAULT == "request":
        _inject_request_fault()
    ws = WorkerState(spec)
    cfg = spec.cfg
    stop = Event()
    graceful = Event()
    gevent.get_hub()  # the hub and everything it imports exist before privileges drop

    def on_quit():
        graceful.set()

    def on_term():
        stop.set()

    gevent.signal_handler(signal.SIGQUIT, on_quit)
    gevent.signal_handler(signal.SIGTERM, on_term)
    gevent.signal_handler(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGWINCH, signal.SIG_IGN)
    signal.signal(signal.SIGTTIN, signal.SIG_IGN)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    profiling.install_worker_hook(spec.logger)
    # the master forked us with its signals blocked; our handlers are in place now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signal.valid_signals())

    keystore = spec.keystore.reader() if spec.keystore is not None else None
    listeners = []
    for li, lsock in spec.sockets:
        lcfg = cfg.listener[li]
        default = ws.upstreams.get(lcfg.upstream) if lcfg.upstream else None
        tls_ctx = None
        if lcfg.tls is not None:
            tls_ctx = worker_tls.worker_tls_context(cfg, li, keystore)
        lr = ListenerRuntime(lcfg.listen, default, b"https" if tls_ctx else b"http", tls_ctx,
                             lcfg.proxy_protocol)
        listeners.append((lsock, lr))

    # drop privileges last: after this, files under the master's home may be unreadable
    if spec.uid is not None:
        if spec.groups is not None:
            os.setgroups(spec.groups)
        if spec.gid is not None:
            os.setgid(spec.gid)
        os.setuid(spec.uid)

    slots_free = Event()
    slots_free.set()
    max_conns = cfg.server.max_connections

    def finish(conn):
        """A connection is gone: per-IP count, registry, accept back-pressure."""
        if conn.counted is not None:
            ws.client_limits.close(conn.counted)
            conn.counted = None
        ws.connections.discard(conn)
        if len(ws.connections) < max_conns:
            slots_free.set()

    def resume(conn):
        """A parked idle connection became readable: serve it in a new greenlet."""
        parked = False
        try:
            parked = conn.serve()
        except Exception as e:  # a bug must not take the worker down with it
            if spec.logger is not None:
                spec.logger.exception("connection failed", remote=conn.remote, error=str(e))
            try:
                conn.sock.close()
            except OSError:
                pass
        finally:
            if not parked:
                finish(conn)

    def unpark(conn):  # libev callback, in the hub
        conn.unparked()
        gevent.spawn(resume, conn)

    ws.hub = gevent.get_hub()
    ws.unpark = unpark

    def handle(conn, sock, lr):
        parked = False
        try:
            if lr.proxy_protocol and not read_proxy_header(conn, sock):
                return
            if lr.tls_context is not None and not worker_tls.handshake(conn):
                return
            climits = ws.client_limits
            if climits is not None and climits.per_ip:
                if not climits.open(conn.remote):
                    conn.refuse(climits.status, "conn_limit")
                    return
                conn.counted = conn.remote
            parked = conn.serve()
        except Exception as e:  # a bug must not take the worker down with it
            if spec.logger is not None:
                spec.logger.exception("connection failed", remote=conn.remote, error=str(e))
            try:
                sock.close()
            except OSError:
                pass
        finally:
            if not parked:
                finish(conn)

    def accept_loop(lsock, lr):
        gsock = socket.socket(fileno=os.dup(lsock.fileno()))
        backoff = 0.0
        try:
            while not graceful.is_set():
                if len(ws.connections) >= max_conns:
                    slots_free.clear()
                    slots_free.wait(1.0)
                    continue
                try:
                    sock, addr = gsock.accept()
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        backoff = min(max(backoff * 2, 0.01), 1.0)
                        if spec.logger is not None:
                            spec.logger.warning("accept failed, backing off",
                                                error=e.strerror, backoff=backoff)
                        gevent.sleep(backoff)
                        continue
                    if graceful.is_set() or e.errno == errno.EBADF:
                        return
                    continue
                backoff = 0.0
                try:
                    sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
                except OSError:
                    pass
                # registered before its greenlet runs: a drain that starts in between
                # still waits for it instead of exiting with the socket unserved
                conn = Connection(ws, lr, sock, addr, time.monotonic())
                ws.connections.add(conn)
                gevent.spawn(handle, conn, sock, lr)
        finally:
            gsock.close()

    # what the worker built at start lives as long as the worker: keep it out of the
    # collector's young generations (fewer objects scanned per collection). Greenlets are
    # spawned after this, so the gauges' greenlet count (gc.get_objects) still sees them.
    gc.freeze()
    acceptors = [gevent.spawn(accept_loop, lsock, lr) for lsock, lr in listeners]

    # one timer for all connections: expire the ones past their deadline
    hub = gevent.get_hub()

    def expire(conn):
        d = conn.deadline
        g = conn.greenlet
        if d and d < time.monotonic() and conn.parked is not None:
            conn.unparked()  # parked past its keep-alive timeout: close it here
            conn.deadline = 0.0
            try:
                conn.sock.close()
            except OSError:
                pass
            finish(conn)
        elif d and d < time.monotonic() and g is not None and not g.dead:
            conn.deadline = 0.0
            g.throw(Deadline("timed out"))

    upstreams = list(ws.upstreams.values())
    trimmer = HeapTrimmer()

    def sweeper():
        while True:
            gevent.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for up in upstreams:  # health verdicts, ejections, slow start, idle sweep
                up.refresh(now)
            trimmer.check(len(ws.connections), now)
            for conn in ws.connections:
                d = conn.deadline
                if d and d < now:
                    hub.loop.run_callback(expire, conn)

    gevent.spawn(sweeper)

    # the master's end of the lifeline closes when it dies: exit then
    def lifeline():
        try:
            socket.wait_read(spec.lifeline_fd)
        except Exception:
            pass
        stop.set()

    gevent.spawn(lifeline)

    table = spec.table

    def heartbeat():
        while True:
            if table is not None:
                table.beat(spec.index, ws.requests, len(ws.connections))
            profiling.push_gauges(ws)
            gevent.sleep(1.0)

    hb = gevent.spawn(heartbeat)
    if table is not None:
        table.beat(spec.index, 0, 0)
    try:
        os.write(spec.ready_fd, b"R")
        os.close(spec.ready_fd)
    except OSError:
        pass

    # wait for QUIT (graceful) or TERM/INT/master death (fast)
    while not stop.is_set() and not graceful.is_set():
        gevent.wait([stop, graceful], count=1)
    if stop.is_set():
        raise SystemExit(0)
    # graceful: stop accepting, let in-flight requests finish, close idle keep-alives
    ws.draining = True
    gevent.killall(acceptors, block=False)
    for lsock, _ in listeners:
        try:
            lsock.close()
        except OSError:
            pass
    # An idle keep-alive connection is closed only once it has been idle for a moment
    # during the drain: a client that is using it gets its next response with
    # "Connection: close" instead of racing our close with its request.
    deadline = time.monotonic() + cfg.server.graceful_timeout
    while ws.connections and time.monotonic() < deadline and not stop.is_set():
        now = time.monotonic()
        for conn in list(ws.connections):
            if conn.idle and now - conn.idle_since > DRAIN_IDLE:
                conn.idle = False
                try:
                    conn.sock.shutdown(pysocket.SHUT_RDWR)
                except OSError:
                    pass
        gevent.sleep(0.05)
    hb.kill(block=False)
    if table is not None:
        table.beat(spec.index, ws.requests, len(ws.connections))
    for up in ws.upstreams.values():
        up.close_idle()
    raise SystemExit(0)
