"""Socket steps of the hot path, shared by the client and upstream sides.

gevent's wrappers cost a Python frame and, for ``sendall``, a ``getsockopt(SO_SNDBUF)``
per call; these go to the plain socket when the kernel takes or has the bytes at once,
and fall back to gevent's waiting versions only when it does not.
"""

from __future__ import annotations

import socket as pysocket

from gevent import socket

from forkproxy.worker.front import ClientGone
from forkproxy.worker.readiness import ReadWatch

_timeout = socket.timeout


def recv_waiting(watch: ReadWatch, sock, buf) -> int:
    """recv_into for a plain gevent socket when the bytes are almost never there yet (the
    upstream's response right after the request, a keep-alive client's next request):
    wait on the socket's armed watcher first, then one recv. Trying first costs an EAGAIN
    syscall and a raised exception per request (profile in docs/BENCHMARKS.md)."""
    watch.wait()
    try:
        return sock._sock.recv_into(buf)
    except BlockingIOError:  # spurious wake-up
        return sock.recv_into(buf)


def send_all(sock, data) -> None:
    """sendall to a client without gevent's per-call getsockopt(SO_SNDBUF); any failure
    is the client's: ClientGone."""
    try:
        n = sock.send(data)
        if n == len(data):
            return
        view = memoryview(data)[n:]
        while view:
            n = sock.send(view)
            view = view[n:]
    except (OSError, _timeout) as e:
        raise ClientGone(str(e))


def nodelay_for_accepted(lsock) -> None:
    """TCP_NODELAY on a listening socket: Linux copies it into every socket accepted from
    it (tests/test_accept.py checks), so no connection needs a setsockopt of its own."""
    try:
        lsock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
    except OSError:
        pass


def close_plain(sock) -> None:
    """Close a plain gevent socket: straight to the kernel's close when no greenlet waits
    on the socket's gevent watchers (the client connection's waits use its own watcher,
    closed before this). gevent's close also detaches the wrapper, puts a closed-socket
    placeholder in and has the loop look for watchers of the fd: ~2.6 µs per
    connection. A later use of the wrapper gets EBADF either way."""
    if sock._read_event.active or sock._write_event.active:
        sock.close()  # wakes the waiter before the fd goes
    else:
        sock._sock.close()


def peer_closed(sock) -> bool:
    """True if a pooled socket is no longer usable: the peer closed it, reset it, or sent
    bytes nobody asked for. Checked before a request that must not be sent twice."""
    try:
        sock._sock.recv(1, pysocket.MSG_PEEK | pysocket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True
