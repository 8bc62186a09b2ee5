"""Small sends held until the end of the loop turn, then sent back to back: upstream
request heads, and whole keep-alive responses to clients.

Why: a send to a peer that sleeps wakes it, and waking a process on another CPU costs
the sender an inter-processor interrupt in the kernel's wake-up path (on the 2-vCPU VM
of docs/BENCHMARKS.md, ~10-20 µs of the worker's system time each). A saturated worker
handles ~20 requests per loop turn, ~35-50 µs apart; sent one by one, each head woke an
upstream that had answered the previous one and gone back to sleep, and each response
woke a client (wrk) that had read the previous one: ~0.5 IPIs per request against
nginx's ~0.1, and the more the worker lagged, the more its peers slept between its
sends. Held until the turn's callbacks run (gevent runs them just before the loop polls
again), the turn's sends go out together and each peer wakes about once per turn. A
send waits at most for the rest of the current turn; an idle worker's turn holds one
request, so it goes out at once. A busy turn (1,000 connections: hundreds of ready
events) would hold its first sends for the whole turn, so at most ``HOLD_COUNT`` are
held: the one that makes them ``HOLD_COUNT`` sends them all at once. That bounds the
wait to ~``HOLD_COUNT`` requests' work and still wakes a peer once per ``HOLD_COUNT``
sends.

Only plain sockets, and sends of at most ``HOLD_MAX`` bytes (the default send buffer:
the kernel takes them whole unless the peer stopped reading). What happens when it does
not is the connection's ``held_short``: an upstream connection is shut down, so its
exchange reads the EOF of a reused connection and retries a replayable request on a
fresh one, as when an upstream closed a pooled connection while it was idle; a client
connection keeps the rest and sends it before anything else, from its own greenlet
(worker/client.py). A connection with a send held already is not held again: its owner
sends the held one first, then the new one, so the order on the wire is kept.
"""

from __future__ import annotations

#: the largest send held: tcp_wmem's default send buffer (16 KiB) takes it whole
HOLD_MAX = 16384
#: the most sends held at once (the one that reaches it sends them all): with heads and
#: responses both held, 16 is ~8 requests' sends. At 1,000 connections 32 made the peers'
#: bursts larger and the p99 ~20-30% longer; -c32/-c64 pay 0.7-1.4 µs per request for 16
#: (docs/BENCHMARKS.md, "The hold cap, again")
HOLD_COUNT = 16


class HeldSends:
    """The sends held in one worker's current loop turn (``loop`` None: never held)."""

    __slots__ = ("loop", "conns")

    def __init__(self, loop):
        self.loop = loop
        self.conns: list = []

    def hold(self, conn, data: bytes) -> bool:
        """Hold ``data`` for ``conn`` (sent at the end of the turn): True; False when it
        must be sent now (TLS, too large, one held already, no loop)."""
        if (conn.raw is None or len(data) > HOLD_MAX or conn.held is not None
                or self.loop is None):
            return False
        conn.held = data
        conns = self.conns
        if not conns:
            self.loop.run_callback(self.flush)
        conns.append(conn)
        if len(conns) >= HOLD_COUNT:
            self.flush()  # the turn's callback finds nothing left, or the next sends
        return True

    def flush(self) -> None:
        """Send everything held (in the order held); a send the kernel did not take
        whole goes to its connection's ``held_short``."""
        conns = self.conns
        self.conns = []
        for conn in conns:
            data = conn.held
            if data is None:  # its owner sent it meanwhile
                continue
            conn.held = None
            try:
                sent = conn.raw.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:  # reset, or closed by its owner meanwhile (EBADF)
                sent = -1
            if sent != len(data):
                conn.held_short(data, sent)
