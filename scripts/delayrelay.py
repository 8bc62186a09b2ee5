#!/usr/bin/env python3
"""A userspace TCP relay that delays every byte by a fixed one-way delay: a slow link for
scripts/pageload on kernels without qdiscs (no ``sch_netem``).

    scripts/delayrelay.py --listen 127.0.0.1:PORT --to 127.0.0.1:PORT [--delay-ms 25]
                          [--loss 0.01] [--rto-ms 200] [--mss 1448] [--seed N]

Each accepted connection gets a connection onward; each direction forwards every chunk
it reads ``delay`` after it was read, in order (a chunk never overtakes the one before
it), so a 25 ms delay each way is a 50 ms round trip.

Loss, since userspace cannot drop a TCP segment: a chunk of n bytes is counted as
ceil(n / mss) segments, and with probability 1 - (1 - loss)^segments one of them is
"lost": the chunk is delivered ``rto`` later than it would have been (a retransmission
after Linux's minimum retransmission timeout, the common case for the short flows of a
page, whose losses are tail losses that fast retransmit cannot repair). Every later
chunk of that direction waits behind it, as in-order TCP delivery makes it wait: the
head-of-line blocking one connection suffers from a loss. What this does not model:
the congestion window shrinking after the loss, and the sender's own pacing.

Half-closes are relayed (EOF after the delayed data). Runs until killed.
"""

from __future__ import annotations

import argparse
import math
import random
import time

import gevent
from gevent import socket
from gevent.queue import Queue
from gevent.server import StreamServer

CHUNK = 65536


class Link:
    """The shape of one direction: delay, loss and what a loss costs."""

    def __init__(self, delay: float, loss: float, rto: float, mss: int, rng: random.Random):
        self.delay, self.loss, self.rto, self.mss, self.rng = delay, loss, rto, mss, rng
        self.chunks = 0
        self.lost = 0

    def release_at(self, now: float, size: int, previous: float) -> float:
        """When a chunk read at ``now`` goes out: never before the previous one."""
        at = now + self.delay
        self.chunks += 1
        if self.loss:
            segments = max(1, math.ceil(size / self.mss))
            if self.rng.random() < 1.0 - (1.0 - self.loss) ** segments:
                self.lost += 1
                at += self.rto
        return max(at, previous)


def pump(src, dst, link: Link) -> None:
    """Read from src; a second greenlet writes to dst at each chunk's release time."""
    q: Queue = Queue()

    def writer():
        while True:
            at, data = q.get()
            wait = at - time.monotonic()
            if wait > 0:
                gevent.sleep(wait)
            if data is None:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    w = gevent.spawn(writer)
    last = 0.0
    while True:
        try:
            data = src.recv(CHUNK)
        except OSError:
            data = b""
        last = link.release_at(time.monotonic(), len(data), last) if data else max(
            time.monotonic() + link.delay, last)
        q.put((last, data or None))
        if not data:
            break
    w.join()


def serve(args) -> None:
    host, port = args.to.rsplit(":", 1)
    rng = random.Random(args.seed)

    def handle(client, _addr):
        try:
            upstream = socket.create_connection((host, int(port)))
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        shape = (args.delay_ms / 1000, args.loss, args.rto_ms / 1000, args.mss, rng)
        g = [gevent.spawn(pump, client, upstream, Link(*shape)),
             gevent.spawn(pump, upstream, client, Link(*shape))]
        gevent.joinall(g)
        client.close()
        upstream.close()

    lhost, lport = args.listen.rsplit(":", 1)
    server = StreamServer((lhost, int(lport)), handle, backlog=1024)
    server.serve_forever()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    ap.add_argument("--to", required=True, help="HOST:PORT to connect onward to")
    ap.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay (each direction)")
    ap.add_argument("--loss", type=float, default=0.0, help="segment loss probability (0.01 = 1%%)")
    ap.add_argument("--rto-ms", type=float, default=200.0, help="what a lost segment costs")
    ap.add_argument("--mss", type=int, default=1448, help="bytes per segment, for the loss model")
    ap.add_argument("--seed", type=int, default=None)
    serve(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
