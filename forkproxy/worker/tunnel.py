"""Upgraded connections: ``Connection: Upgrade`` requests (WebSocket, h2c, ...) tunnelled.

The request parser stops at a GET carrying ``Connection: Upgrade`` and ``Upgrade`` and
keeps the bytes the client sent after the head (``RequestParser.upgrade_req`` and
``leftover``). The connection hands such a request to :func:`tunnel`, which:

1. picks a server like any request (connect failures are retried on another server;
   nothing else is: an upgrade is not idempotent once sent);
2. sends the head with ``Connection: Upgrade`` and ``Upgrade`` kept (they are stripped
   from every other request), followed by the leftover bytes;
3. relays the answer through the normal response path; a 101 interrupts it with
   :class:`Upgraded`, anything else is relayed as a plain response and the connection
   closes (the client asked for an upgrade: nothing else follows on it);
4. after a 101, copies bytes both ways (this greenlet: upstream to client; a helper
   greenlet: client to upstream) until either side closes or errs, or nothing moved in
   either direction for ``tunnel_timeout`` (the worker's deadline sweeper wakes this
   greenlet; no timer per tunnel).

A tunnel is one request context with ``tunnel = True`` (status 101, bytes each way),
recorded when it closes; ``Server.tunnels`` counts the open ones (worker gauges).
"""

from __future__ import annotations

import socket as pysocket
import time

import gevent
from gevent import socket

from forkproxy.context import T_CONNECT_START, T_CONNECTED, T_END
from forkproxy.worker.upstream import PoolTimeout

_timeout = socket.timeout
_monotonic = time.monotonic
BUFSIZE = 65536

#: response headers never copied into the client's 101 (Connection/Upgrade are rebuilt)
_DROP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                   b"transfer-encoding", b"upgrade", b"content-length"})


class Upgraded(Exception):
    """The upstream answered 101: raised out of the response relay before anything was
    sent to the client. ``head``: the raw 101 head; ``extra``: bytes read after it."""

    def __init__(self, head: bytes, extra: bytes):
        super().__init__("upgraded")
        self.head = head
        self.extra = extra


def client_head(raw: bytes) -> bytes:
    """The 101 head for the client: the upstream's end-to-end headers, Connection and
    Upgrade rebuilt (the upstream's Upgrade value: the protocol it switched to)."""
    lines = raw.split(b"\r\n")
    out = [b"HTTP/1.1 101 Switching Protocols\r\n"]
    proto = b""
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        lname = name.strip().lower()
        if lname == b"upgrade":
            proto = value.strip()
        elif lname not in _DROP:
            out += (name, b":", value, b"\r\n")
    out += (b"Connection: Upgrade\r\n", b"Upgrade: ", proto or b"websocket", b"\r\n\r\n")
    return b"".join(out)


def _peer_closed(sock) -> bool:
    try:
        sock._sock.recv(1, pysocket.MSG_PEEK | pysocket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True  # EOF, or bytes nobody asked for: either way not usable


def tunnel(c, req, upstream, head: bytes, times) -> bool:
    """Serve an upgrade request on connection ``c``; always False (close afterwards)."""
    from forkproxy.worker.connection import UpstreamFailed

    c.closing = True  # the parser stopped at the upgrade: nothing follows on this connection
    head = (head[:-2] + b"Connection: Upgrade\r\nUpgrade: " + req.upgrade + b"\r\n\r\n"
            + c.parser.leftover)
    key = upstream.keyspec.key(req, c.remote) if upstream.keyspec is not None else None
    tries = upstream.retries
    exclude = None
    last = None
    while True:
        server = upstream.pick(key, exclude)
        if server is None:
            if last is not None:
                return c._fail(req, last[0], times, last[2], last[1])
            return c._fail(req, 503, times, None, "no server available")
        times[T_CONNECT_START] = _monotonic()
        try:
            conn = server.acquire()
        except PoolTimeout as e:
            return c._fail(req, 503, times, server, f"upstream queue: {e}")
        except (OSError, _timeout) as e:
            if isinstance(e, _timeout):
                status, detail = 504, "upstream connect timeout"
            else:
                status, detail = 502, f"upstream connect: {e.strerror or e}"
            now = _monotonic()
            server.failed(now)
            if tries and upstream.retry_connect and upstream.budget.allow(now):
                tries -= 1
                exclude = c._retry(server, exclude)
                last = (status, detail, server)
                continue
            return c._fail(req, status, times, server, detail)
        if conn.reused and _peer_closed(conn.sock):
            server.release(conn, False)
            server.close_idle()
            continue
        break
    times[T_CONNECTED] = _monotonic()
    c.retry_statuses = None
    server.tunnels += 1
    try:
        return c._exchange(req, head, conn, times)  # not upgraded: relayed, then closed
    except Upgraded as u:
        return _relay_both_ways(c, req, server, conn, u, times)
    except UpstreamFailed as e:
        if e.kind:
            server.failed(_monotonic())
        return c._fail(req, e.status, times, server, str(e))
    finally:
        server.tunnels -= 1
        server.release(conn, False)


def _relay_both_ways(c, req, server, conn, u: Upgraded, times) -> bool:
    from forkproxy.worker.connection import ClientGone, send_all

    ws = c.ws
    csock = c.sock
    usock = conn.sock
    idle_limit = server.upstream.tunnel_timeout
    state = {"last": _monotonic(), "in": len(c.parser.leftover)}
    reason = ""
    out = client_head(u.head)
    try:
        send_all(csock, out + u.extra if u.extra else out)
    except ClientGone:
        times[T_END] = _monotonic()
        ws.record(c, req, 101, 0, server, conn, 0, times, "client gone", tunnel=True)
        return False
    bytes_out = len(u.extra)

    def client_to_upstream():
        buf = bytearray(BUFSIZE)
        view = memoryview(buf)
        try:
            while True:
                n = csock.recv_into(buf)
                if not n:
                    break
                usock.sendall(view[:n])
                state["in"] += n
                state["last"] = _monotonic()
        except (OSError, _timeout, ValueError):
            pass
        finally:
            # either side closing ends the tunnel: wake the other direction
            try:
                usock.shutdown(pysocket.SHUT_RDWR)
            except OSError:
                pass

    helper = gevent.spawn(client_to_upstream)
    buf = ws.get_buffer()
    view = memoryview(buf)
    try:
        while True:
            c.deadline = state["last"] + idle_limit
            try:
                n = usock.recv_into(buf)
            except _timeout:
                if _monotonic() - state["last"] < idle_limit:
                    continue  # the other direction was busy
                reason = "tunnel idle timeout"
                break
            except OSError:
                break
            if not n:
                break
            c.deadline = _monotonic() + ws.send_timeout
            try:
                send_all(csock, view[:n])
            except ClientGone:
                break
            bytes_out += n
            state["last"] = _monotonic()
    finally:
        c.deadline = 0.0
        ws.put_buffer(buf)
        try:
            usock.shutdown(pysocket.SHUT_RDWR)
        except OSError:
            pass
        helper.kill()  # interrupts its read from the client (TLS close_notify stays possible)
    times[T_END] = _monotonic()
    ws.record(c, req, 101, bytes_out, server, conn, state["in"], times, reason, tunnel=True)
    return False
