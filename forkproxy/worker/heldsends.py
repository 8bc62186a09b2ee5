"""Upstream request heads held until the end of the loop turn, then sent back to back.

Why: a send to an upstream that sleeps wakes it, and waking a process on another CPU
costs the sender an inter-processor interrupt in the kernel's wake-up path (on the
2-vCPU VM of docs/BENCHMARKS.md, ~10-20 µs of the worker's system time each). A
saturated worker handles ~20 requests per loop turn, ~35-50 µs apart; sent one by one,
each head woke an upstream that had answered the previous one and gone back to sleep:
~0.5 IPIs per request against nginx's ~0.1, and the more the worker lagged, the more
the upstream slept between its sends, which is the feedback behind the worker's slow
rounds at ``wrk -c64``. Held until the turn's callbacks run (gevent runs them just before
the loop polls again), the turn's heads go out together and the upstream wakes about
once per turn. A head waits at most for the rest of the current turn; an idle worker's
turn holds one request, so it goes out at once. A busy turn (1,000 connections: hundreds
of ready events) would hold its first heads for the whole turn, so at most ``HOLD_COUNT``
are held: the one that makes them ``HOLD_COUNT`` sends them all at once. That bounds the
wait to ~``HOLD_COUNT`` requests' work and still wakes the upstream once per
``HOLD_COUNT`` requests.

Only a head on a reused plain connection is held, and only one that fits the send
buffer of a connection with nothing in flight (its last response was read to its end):
the kernel takes all of it. If it takes less, or the send fails, the connection is shut
down; the exchange, waiting for the response, reads the EOF of a reused connection and
retries a replayable request on a fresh connection, as when an upstream closed a pooled
connection while it was idle.
"""

from __future__ import annotations

from socket import SHUT_RDWR

#: the largest head held: tcp_wmem's default send buffer (16 KiB) takes it whole
HOLD_MAX = 16384
#: the most heads held at once (the one that reaches it sends them all)
HOLD_COUNT = 32


class HeldSends:
    """The heads held in one worker's current loop turn (``loop`` None: never held)."""

    __slots__ = ("loop", "conns")

    def __init__(self, loop):
        self.loop = loop
        self.conns: list = []

    def hold(self, conn, head: bytes) -> bool:
        """Hold ``head`` for ``conn`` (sent at the end of the turn): True; False when it
        must be sent now (TLS, too large, no loop)."""
        if conn.raw is None or len(head) > HOLD_MAX or self.loop is None:
            return False
        conn.held = head
        conns = self.conns
        if not conns:
            self.loop.run_callback(self.flush)
        conns.append(conn)
        if len(conns) >= HOLD_COUNT:
            self.flush()  # the turn's callback finds nothing left, or the next heads
        return True

    def flush(self) -> None:
        """Send every held head (in the order held); a connection whose send failed or
        fell short is shut down, so its exchange reads an EOF."""
        conns = self.conns
        self.conns = []
        for conn in conns:
            head = conn.held
            conn.held = None
            try:
                sent = conn.raw.send(head)
            except OSError:  # reset, or closed by its exchange meanwhile (EBADF)
                sent = -1
            if sent != len(head):
                try:
                    conn.raw.shutdown(SHUT_RDWR)
                except OSError:
                    pass
