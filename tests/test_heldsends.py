"""Sends held until the loop turn ends (forkproxy/worker/heldsends.py): upstream request
heads and whole keep-alive responses to clients.

Real socket pairs in this process's gevent hub: what is held reaches no peer until the
hub runs the turn's callbacks, then every head arrives, in the order held; an upstream
connection whose send falls short or fails is shut down (its exchange reads an EOF),
and the rest still go out; a client connection whose held response falls short sends
the rest from its own greenlet before it reads again. End to end, through a real proxy,
the held path serves concurrent keep-alive requests on pooled connections, pipelined
responses to a client that reads late arrive whole and in order, and the stale pooled
connection test (tests/test_proxy_basic.py) retries through it.
"""

from __future__ import annotations

import json
import socket as pysocket
import threading

import gevent
import pytest
from fp import connect, free_port, recv_response, request
from gevent import socket

from forkproxy import config as config_mod
from forkproxy.worker.client import ClientConnection
from forkproxy.worker.heldsends import HOLD_COUNT, HOLD_MAX, HeldSends
from forkproxy.worker.process import WorkerSpec
from forkproxy.worker.state import ListenerRuntime, WorkerState
from forkproxy.worker.upconn import UpstreamConn


def pairs(n):
    out = []
    for _ in range(n):
        a, b = socket.socketpair()
        out.append((UpstreamConn(a, None), b))
    return out


def nothing_to_read(peer) -> bool:
    peer.setblocking(False)
    try:
        peer._sock.recv(1)
    except BlockingIOError:
        return True
    finally:
        peer.setblocking(True)
    return False


def close_all(ps):
    for conn, peer in ps:
        conn.sock.close()
        peer.close()


def test_held_heads_go_out_together_when_the_turn_ends():
    held = HeldSends(gevent.get_hub().loop)
    ps = pairs(3)
    try:
        for i, (conn, _) in enumerate(ps):
            assert held.hold(conn, b"GET /%d HTTP/1.1\r\n\r\n" % i)
        assert all(nothing_to_read(peer) for _, peer in ps)  # held, not sent
        assert held.conns == [c for c, _ in ps]
        gevent.sleep(0)  # the hub runs the turn's callbacks
        for i, (conn, peer) in enumerate(ps):
            want = b"GET /%d HTTP/1.1\r\n\r\n" % i
            assert peer.recv(100) == want
            assert conn.held is None
        assert held.conns == []
    finally:
        close_all(ps)


def test_a_busy_turn_sends_every_hold_count_heads_at_once():
    """A turn with hundreds of ready connections does not hold its first heads to its end."""
    held = HeldSends(gevent.get_hub().loop)
    ps = pairs(HOLD_COUNT + 1)
    try:
        for i, (conn, _) in enumerate(ps[:-1]):
            assert held.hold(conn, b"GET /%d HTTP/1.1\r\n\r\n" % i)
        # the HOLD_COUNT-th hold sent them all, before the turn ends: readable at once,
        # without yielding to the hub (a gevent recv would let the turn end)
        for i, (conn, peer) in enumerate(ps[:-1]):
            peer.setblocking(False)
            assert peer._sock.recv(100) == b"GET /%d HTTP/1.1\r\n\r\n" % i
            assert conn.held is None
        last_conn, last_peer = ps[-1]
        assert held.hold(last_conn, b"GET /last HTTP/1.1\r\n\r\n")
        assert nothing_to_read(last_peer)  # one held again: waits for the turn's end
        gevent.sleep(0)
        assert last_peer.recv(100) == b"GET /last HTTP/1.1\r\n\r\n"
        assert held.conns == []
    finally:
        close_all(ps)


def test_not_held_without_a_loop_for_tls_or_too_large():
    ps = pairs(1)
    conn, _ = ps[0]
    try:
        assert not HeldSends(None).hold(conn, b"GET / HTTP/1.1\r\n\r\n")
        held = HeldSends(gevent.get_hub().loop)
        assert not held.hold(conn, b"x" * (HOLD_MAX + 1))
        conn.raw = None  # what a TLS connection has: bytes go through OpenSSL
        assert not held.hold(conn, b"GET / HTTP/1.1\r\n\r\n")
        assert held.conns == []
    finally:
        close_all(ps)


def test_a_short_or_failed_send_shuts_the_connection_down_and_the_rest_go_out():
    held = HeldSends(gevent.get_hub().loop)
    ps = pairs(3)
    full, closed, fine = (c for c, _ in ps)
    try:
        full.raw.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_SNDBUF, 4096)
        full.raw.setblocking(False)
        while True:  # fill its send buffer (the peer does not read)
            try:
                full.raw.send(b"f" * 4096)
            except BlockingIOError:
                break
        assert held.hold(full, b"GET /full HTTP/1.1\r\n\r\n")
        assert held.hold(closed, b"GET /closed HTTP/1.1\r\n\r\n")
        closed.sock.close()  # its exchange gave up meanwhile: EBADF at the flush
        assert held.hold(fine, b"GET /fine HTTP/1.1\r\n\r\n")
        gevent.sleep(0)
        assert ps[2][1].recv(100) == b"GET /fine HTTP/1.1\r\n\r\n"
        # the exchange waiting on the full one reads an EOF: retried on a fresh connection
        assert full.raw.recv(10) == b""
    finally:
        close_all(ps)


def test_concurrent_keepalive_requests_through_held_heads(tmp_path, origin, proxies):
    """64 clients at once, several requests each on their keep-alive connections: the
    pooled upstream connections' heads are held and all answered, each with its own."""
    p = proxies(tmp_path, origin.address)

    def client(i):
        got = []
        with socket.create_connection(("127.0.0.1", p.port), timeout=20) as s:
            for j in range(5):
                s.sendall(b"GET /headers?c=%d-%d HTTP/1.1\r\nHost: x\r\n\r\n" % (i, j))
                status, body = read_response(s)
                got.append((status, json.loads(body)["path"]))
        return got

    for _ in range(2):  # the second wave reuses the pool's connections
        jobs = [gevent.spawn(client, i) for i in range(64)]
        gevent.joinall(jobs, timeout=60, raise_error=True)
        for i, job in enumerate(jobs):
            assert [status for status, _ in job.value] == [200] * 5
            assert [path for _, path in job.value] == [f"/headers?c={i}-{j}" for j in range(5)]
    assert request(p.port, "GET", "/")[0] == 200
    p.stop()


def read_response(s) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, "connection closed before a response head"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "connection closed in a response body"
        body += chunk
    return int(head.split()[1]), body[:length]


def fill_send_buffer(raw) -> int:
    """Fill a socket's send buffer (its peer does not read); the bytes queued."""
    raw.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_SNDBUF, 4096)
    raw.setblocking(False)
    queued = 0
    while True:
        try:
            queued += raw.send(b"f" * 4096)
        except BlockingIOError:
            return queued


@pytest.fixture
def worker_state():
    cfg = config_mod.loads(f"""
        [[listener]]
        listen = "127.0.0.1:{free_port()}"
        upstream = "app"
        [upstream.app]
        servers = [{{ address = "127.0.0.1:{free_port()}" }}]
        """, check_files=False)
    spec = WorkerSpec(cfg=cfg, slot=0, index=0, generation=1, cpu=None, sockets=[],
                      ready_fd=-1, lifeline_fd=-1, ring=None)
    ws = WorkerState(spec, gevent.get_hub())
    yield ws


def test_a_client_response_the_kernel_did_not_take_whole_is_finished_before_the_next_read(
        worker_state):
    """The flush sends what the kernel takes; the connection's greenlet, waiting for the
    next request, is woken to send the rest, then reads the next request."""
    ws = worker_state
    a, b = socket.socketpair()
    conn = ClientConnection(ws, ListenerRuntime("t", None, b"http"), a, ("192.0.2.1", 1), 0.0)
    try:
        filler = fill_send_buffer(conn.raw)
        response = bytes(range(256)) * 40  # 10 KiB, under HOLD_MAX
        assert ws.held_sends.hold(conn, response)
        buf = bytearray(100)
        reader = gevent.spawn(conn.recv_by, buf, True)  # waits for the next request
        gevent.sleep(0)  # the turn ends: the flush falls short (the buffer is full)
        got = b""
        b.settimeout(20)  # without the wake-up the rest never comes
        want = filler + len(response)
        while len(got) < want:  # the client reads at last: the rest follows
            got += b.recv(65536)
        assert got[:filler] == b"f" * filler and got[filler:] == response
        assert conn.held is None and not reader.ready()  # sent, and reading again
        b.sendall(b"GET /next HTTP/1.1\r\n\r\n")
        n = reader.get(timeout=10)
        assert bytes(buf[:n]) == b"GET /next HTTP/1.1\r\n\r\n"
    finally:
        conn._unwatch()
        a.close()
        b.close()


def test_a_second_response_for_a_connection_is_not_held_over_the_first(worker_state):
    ws = worker_state
    a, b = socket.socketpair()
    conn = ClientConnection(ws, ListenerRuntime("t", None, b"http"), a, ("192.0.2.1", 1), 0.0)
    try:
        assert ws.held_sends.hold(conn, b"first")
        assert not ws.held_sends.hold(conn, b"second")  # its owner sends it: first goes first
        conn.send(b"second")
        assert conn.held is None
        got = b""
        while len(got) < 11:
            got += b.recv(100)
        assert got == b"firstsecond"
        gevent.sleep(0)  # the turn's flush finds nothing left for it
        assert nothing_to_read(b)
    finally:
        a.close()
        b.close()


def test_pipelined_responses_to_a_client_that_reads_late_arrive_whole_and_in_order(
        tmp_path, origin, proxies):
    """60 pipelined requests whose ~6 KiB responses are held, to a client with a small
    receive buffer that reads only once it sent them all: the kernel's buffers fill,
    held sends fall short, and every response still arrives whole, in order."""
    p = proxies(tmp_path, origin.address)
    pad = "x" * 6000
    with connect(p.port, timeout=30) as c:
        c.sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_RCVBUF, 4096)
        requests = b"".join(b"GET /headers?i=%d&pad=%s HTTP/1.1\r\nHost: x\r\n\r\n"
                            % (i, pad.encode()) for i in range(60))
        # sent from a thread: the proxy stops reading requests while its responses wait
        sender = threading.Thread(target=c.sendall, args=(requests,))
        sender.start()
        for i in range(60):
            status, _, body, _ = recv_response(c)
            assert status == 200
            assert json.loads(body)["path"] == f"/headers?i={i}&pad={pad}"
        sender.join(timeout=30)
    assert request(p.port, "GET", "/")[0] == 200
    p.stop()
