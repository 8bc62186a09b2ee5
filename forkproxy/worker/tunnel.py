"""Upgraded connections: ``Connection: Upgrade`` requests (WebSocket, ...) tunnelled.

The request parser stops at a GET carrying ``Connection: Upgrade`` and ``Upgrade`` and
keeps the bytes the client sent after the head (``RequestParser.upgrade_req`` and
``leftover``). The HTTP/1.1 connection hands such a request to :func:`tunnel`, which:

1. connects through the request's exchange like any request (connect failures are
   retried on another server; nothing else is: an upgrade is not idempotent once sent);
2. sends the head with ``Connection: Upgrade`` and ``Upgrade`` kept (they are stripped
   from every other request), followed by the leftover bytes;
3. relays the answer through the exchange; a 101 interrupts it with
   :class:`~forkproxy.worker.exchange.Upgraded`, anything else is relayed as a plain
   response and the connection closes (nothing else follows an upgrade request);
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

from forkproxy.context import T_END
from forkproxy.http.forward import switching_protocols_head, upgrade_head, upstream_head
from forkproxy.worker.exchange import Exchange, Upgraded, UpstreamFailed
from forkproxy.worker.front import ClientGone
from forkproxy.worker.sockio import send_all
from forkproxy.worker.tracing import start_span

_timeout = socket.timeout
_monotonic = time.monotonic
BUFSIZE = 65536


def tunnel(c, ex: Exchange, upstream) -> bool:
    """Serve the upgrade request started on ``ex`` for HTTP/1.1 connection ``c``;
    always False (the connection closes afterwards)."""
    req = ex.req
    c.closing = True  # the parser stopped at the upgrade: nothing follows on this connection
    if upstream.relay is not Exchange.send_and_relay:  # an HTTP/2 upstream (RFC 8441's
        ex.reject = "upgrade"  # extended CONNECT is not implemented): refused, said so
        return ex.fail(501, None, "upgrade to an HTTP/2 upstream is not supported")
    if c.remote_b is None:
        c.remote_b = c.remote.encode()
    head = upgrade_head(upstream_head(req, req.request_id, c.remote_b, c.listener.scheme,
                                      c.listener.host_fallback, start_span(req, c.ws)),
                        req.upgrade, c.parser.leftover)
    key = upstream.keyspec.key(req, c.remote) if upstream.keyspec is not None else None
    ex.tries = upstream.retries
    ex.upgrade = True
    ex.retry_statuses = None  # an upgrade is never retried on the upstream's status
    conn = ex.connect(upstream, key, True)
    if conn is None:
        return False
    server = conn.server
    server.tunnels += 1
    try:
        return ex.send_and_relay(head, conn)  # not upgraded: relayed, then closed
    except Upgraded as u:
        return _relay_both_ways(c, ex, conn, u)
    except UpstreamFailed as e:
        if e.kind:
            server.failed(_monotonic())
        return ex.fail(e.status, server, str(e))
    finally:
        server.tunnels -= 1
        server.release(conn, False)


def _shutdown(sock) -> None:
    try:
        sock.shutdown(pysocket.SHUT_RDWR)
    except OSError:
        pass


def _relay_both_ways(c, ex: Exchange, conn, u: Upgraded) -> bool:
    ws = c.ws
    csock = c.sock
    usock = conn.sock
    idle_limit = conn.server.upstream.tunnel_timeout
    state = {"last": _monotonic(), "in": len(c.parser.leftover)}
    reason = ""
    ex.server = conn.server
    ex.conn = conn
    ex.tunnel = True
    out = switching_protocols_head(u.head)
    try:
        if c.held is not None:  # a pipelined request's response before the upgrade
            c.settle()
        send_all(csock, out + u.extra if u.extra else out)
    except ClientGone:
        ex.times[T_END] = _monotonic()
        ex.record(101, 0, "client gone")
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
            _shutdown(usock)  # either side closing ends the tunnel: wake the other one

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
        _shutdown(usock)
        helper.kill()  # interrupts its read from the client (TLS close_notify stays possible)
    ex.times[T_END] = _monotonic()
    ex.bytes_in = state["in"]
    ex.record(101, bytes_out, reason)
    return False
