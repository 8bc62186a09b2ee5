"""The per-connection path of a worker: accept, socket options, close, and what a closed
connection leaves behind."""

from __future__ import annotations

import socket as pysocket
import subprocess
import sys

import gevent
from gevent import socket

from forkproxy.worker.runners import Runners
from forkproxy.worker.sockio import close_plain, nodelay_for_accepted


def _listener():
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    return lsock


def test_accepted_sockets_inherit_nodelay_from_the_listener():
    """The worker sets TCP_NODELAY once, on its listening socket, and none per connection:
    that relies on the kernel copying it into accepted sockets."""
    lsock = _listener()
    try:
        plain = socket.create_connection(lsock.getsockname())
        before, _ = lsock.accept()
        nodelay_for_accepted(lsock)
        client = socket.create_connection(lsock.getsockname())
        after, _ = lsock.accept()
        assert before.getsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY) == 0
        assert after.getsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY) != 0
        for s in (plain, before, client, after):
            s.close()
    finally:
        lsock.close()


def test_close_plain_closes_at_once_and_wakes_a_waiting_greenlet():
    lsock = _listener()
    try:
        client = socket.create_connection(lsock.getsockname())
        server, _ = lsock.accept()
        close_plain(server)  # nobody waits: the fd is closed now
        assert client.recv(10) == b""
        assert server.fileno() == -1
        client.close()

        client = socket.create_connection(lsock.getsockname())
        server, _ = lsock.accept()
        waiter = gevent.spawn(server.recv, 10)
        gevent.sleep(0.01)  # parked on the socket's gevent read watcher
        close_plain(server)  # gevent's close: the waiter is told, not left hanging
        waiter.join(5)
        assert waiter.ready() and isinstance(waiter.exception, OSError)
        assert client.recv(10) == b""
        client.close()
    finally:
        lsock.close()


_NO_CYCLES = r'''
import gc, time, gevent
from gevent import socket
from forkproxy import config
from forkproxy.shm.ring import Ring
from forkproxy.worker.process import Worker, WorkerSpec
from forkproxy.worker.runners import Runners
from forkproxy.worker.state import ListenerRuntime, WorkerState

def listen():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(64); return s

def origin(lsock):
    while True:
        c, _ = lsock.accept()
        gevent.spawn(serve_origin, c)

def serve_origin(c):
    while True:
        data = c.recv(65536)
        if not data:
            return
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" * data.count(b"\r\n\r\n"))

up = listen()
gevent.spawn(origin, up)
cfg = config.loads(f"""
[[listener]]
listen = "127.0.0.1:1"
upstream = "app"
[upstream.app]
servers = [{{ address = "127.0.0.1:{up.getsockname()[1]}" }}]
""", check_files=False)
ring = Ring.create(1 << 16)
spec = WorkerSpec(cfg=cfg, slot=0, index=0, generation=1, cpu=None, sockets=[], ready_fd=-1,
                  lifeline_fd=-1, ring=ring)
worker = Worker(spec)
worker.hub = gevent.get_hub()
worker.runners = Runners(worker.hub)
worker.ws = ws = WorkerState(spec, worker.hub, worker.unpark)
front = listen()
gevent.spawn(worker.accept_loop, front, ListenerRuntime("t", ws.upstreams["app"], b"http"))
gc.collect()
gc.disable()
for _ in range(50):
    c = socket.create_connection(front.getsockname())
    c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    got = b""
    while True:
        data = c.recv(65536)
        if not data:
            break
        got += data
    assert got.endswith(b"\r\n\r\nok"), got
    c.close()
deadline = time.monotonic() + 10
while ws.connections and time.monotonic() < deadline:
    gevent.sleep(0.01)
assert not ws.connections
gc.set_debug(gc.DEBUG_SAVEALL)
gc.collect()
print(sum(type(o).__name__ == "Http1Connection" for o in gc.garbage))
'''


def test_a_closed_connection_is_freed_without_the_collector():
    """50 requests on new connections through the worker's own accept loop and
    connection class leave no Http1Connection in a garbage cycle (with cycles, ~19
    objects per connection waited for the collector: ~6 µs each, docs/BENCHMARKS.md)."""
    out = subprocess.run([sys.executable, "-c", _NO_CYCLES], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0"]


def test_runners_reuse_their_greenlets_and_keep_only_so_many():
    hub = gevent.get_hub()
    runners = Runners(hub, kept=2)
    seen = []

    def serve(conn):
        seen.append((conn, gevent.getcurrent()))
        gevent.sleep(0.001 * conn)  # a blocking step: the runners overlap

    for conn in range(3):  # three at once: three greenlets
        runners.run(serve, conn)
    gevent.sleep(0.05)
    first = {g for _, g in seen}
    assert len(first) == 3 and len(runners.idle) == 2  # the third ended: 2 kept
    seen.clear()
    runners.run(serve, 10)
    runners.run(serve, 11)
    gevent.sleep(0.05)
    assert [c for c, _ in seen] == [10, 11]
    assert {g for _, g in seen} <= first  # served by waiting runners, none spawned
    waiting = list(runners.idle)
    runners.clear()
    gevent.sleep(0.01)
    assert runners.idle == [] and all(g.dead for g in waiting)


def test_a_runner_thrown_into_while_waiting_ends_and_is_not_reused():
    hub = gevent.get_hub()
    runners = Runners(hub)
    runners.run(lambda conn: None, 1)
    gevent.sleep(0.01)
    (g,) = runners.idle
    hub.loop.run_callback(g.throw, RuntimeError("stray"))
    gevent.sleep(0.01)
    assert g.dead and runners.idle == []
