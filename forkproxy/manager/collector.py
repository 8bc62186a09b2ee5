"""Drains every worker's ring in the manager and hands the decoded records on in batches.

Wake-up design: one greenlet per ring, all on the manager's single gevent hub (one
epoll set: the eventfd doorbells of all rings are registered with it, so N rings cost
no more system calls than one).

* Idle ring: :meth:`Ring.wait` arms the ring's ``waiting`` flag, re-checks ``head`` and
  sleeps on the doorbell. The producer rings the doorbell (one ``eventfd_write``) only
  when it sees the flag, then clears it: one wake-up per sleep, not one per record.
  The wait has a timeout (``WAIT_LIVE`` for an index with a live worker, ``WAIT_IDLE``
  otherwise) that bounds the rare lost wake-up x86-64's store-load reordering allows
  (see forkproxy/shm/ring.py); it is not a poll interval.
* Busy ring: after a batch that was not empty, the greenlet sleeps without arming the
  doorbell, so the producer makes no system call at all while records keep coming, and
  the next drain finds a batch instead of one record. The pause adapts to the ring's
  rate: it is scaled so that the next batch should hold ``TARGET`` of ``BATCH`` records,
  within [``COALESCE``, ``COALESCE_MAX``] (a batch has a fixed cost, ~25 µs measured in
  the replay: the wake-up, the batch's set-up, its counters into the Metrics' dicts, a
  log write). A full batch yields to the hub and continues at once, so a ring whose rate
  jumps is drained back to back and its pause shrinks again. At most 1/COALESCE
  wake-ups per second per busy ring, whatever the request rate; a 1 MiB ring holds
  ~4,500 records of ~230 bytes, which only ~110k records/s (4x a busy worker's rate)
  would fill in COALESCE_MAX.

Records are decoded straight from the mapping (msgspec copies what it keeps) inside
``Ring.drain_decoded``, with no Python call per record but the decoder's; the batch is
processed after ``drain`` returns, so ``tail`` is published and the ring space freed
before the access log and metrics work starts.

When manager/rawbatch.py is compiled and ``on_batch`` is a RecordSink's, records are not
decoded at all: ``Ring.drain_spans`` says where a batch's records stand in the ring, the
sink's ``on_raw_batch`` reads them there as C structs (docs/BENCHMARKS.md, "Round 4"),
and only then is ``tail`` published (``Ring.release``): no copy of the records, and the
producer has one batch (at most BATCH records, ~1/4 of a 1 MiB ring) less of free space
while it is processed ("Round 6").
"""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic

import gevent
import msgspec

from forkproxy.context import decoder
from forkproxy.manager.rawbatch import COMPILED as RAW_COMPILED
from forkproxy.manager.rawbatch import MAX_RECORDS as RAW_MAX_RECORDS
from forkproxy.manager.rawbatch import RawBatch

BATCH = 1024
COALESCE = 0.01
COALESCE_MAX = 0.04
#: the share of BATCH the adaptive pause aims at
TARGET = 0.75
WAIT_LIVE = 0.25
WAIT_IDLE = 1.0


def coalesce_pause(elapsed: float, n: int, target: float) -> float:
    """How long a busy ring waits for its next batch: ``target`` records at the rate of
    the last one (``n`` records in ``elapsed`` seconds), within [COALESCE, COALESCE_MAX]."""
    return min(max(elapsed * target / n, COALESCE), COALESCE_MAX)


class Collector:
    """``on_batch(records)`` gets a list of decoded records (RequestContext/WorkerGauges).

    The list is reused: ``on_batch`` must not keep a reference to it.
    """

    def __init__(self, rings: dict, on_batch: Callable[[list], None], *, table=None,
                 logger=None, batch: int = BATCH):
        self.rings = {i: r for i, r in rings.items() if r is not None}
        self.on_batch = on_batch
        self.table = table
        self.logger = logger
        self.batch = batch
        self.greenlets: list[gevent.Greenlet] = []
        self.decode_errors = 0
        self.records = 0
        self.batches = 0
        self.wakeups = 0
        #: the sink's on_raw_batch when the compiled path is there, and its one batch
        sink = getattr(on_batch, "__self__", None)
        raw_ok = RAW_COMPILED and batch <= RAW_MAX_RECORDS
        self.on_raw = getattr(sink, "on_raw_batch", None) if raw_ok else None
        self.raw = None
        if self.on_raw is not None and self.rings:
            self.raw = RawBatch(batch)

    def start(self) -> None:
        for index, ring in sorted(self.rings.items()):
            self.greenlets.append(gevent.spawn(self._loop, index, ring))

    def stop(self) -> None:
        gevent.killall(self.greenlets, block=True, timeout=1.0)
        self.greenlets = []

    def _live(self, index: int) -> bool:
        return self.table is not None and self.table.read(index) is not None

    def _drain_once(self, ring, items: list) -> int:
        raw = self.raw
        if raw is not None and not raw.busy:
            return self._drain_raw(ring, raw)
        n, bad = ring.drain_decoded(decoder.decode, items, msgspec.DecodeError, self.batch)
        self.decode_errors += bad
        if items:
            self.records += len(items)
            self.batches += 1
            try:
                self.on_batch(items)
            except Exception as e:  # a bug in processing must not stop the collection
                if self.logger is not None:
                    self.logger.exception("processing a batch of records failed", error=str(e))
            items.clear()
        return n

    def _drain_raw(self, ring, raw: RawBatch) -> int:
        """A batch, where it stands in the ring, to the sink's on_raw_batch; the ring
        space is released after it (``busy`` while it runs: another ring's greenlet
        drains the decoded way if processing ever yields)."""
        raw.busy = True
        tail = None
        try:
            n, tail = ring.drain_spans(raw.starts, raw.ends, self.batch)
            if n:
                raw.attach(ring.buffer)
                raw.n = n
                raw.bad = 0
                try:
                    self.on_raw(raw)
                except Exception as e:  # a bug in processing must not stop the collection
                    if self.logger is not None:
                        self.logger.exception("processing a batch of records failed",
                                              error=str(e))
                self.decode_errors += raw.bad
                self.records += n - raw.bad
                self.batches += 1
        finally:
            raw.detach()
            raw.busy = False
            if tail is not None:
                ring.release(tail)
        return n

    def _loop(self, index: int, ring) -> None:
        items: list = []
        target = self.batch * TARGET
        last = monotonic()  # the end of the last drain
        while True:
            n = self._drain_once(ring, items)
            now = monotonic()
            if n >= self.batch:
                gevent.sleep(0)  # more is pending: let the other rings and the admin run
            elif n:
                # busy: let a batch build up, doorbell stays unarmed; the pause from the
                # ring's rate (n records since the last drain)
                gevent.sleep(coalesce_pause(now - last, n, target))
            else:
                self.wakeups += 1
                ring.wait(WAIT_LIVE if self._live(index) else WAIT_IDLE)
                now = monotonic()
            last = now

    def drain_all(self, max_rounds: int = 64) -> int:
        """Synchronously drain every ring until empty (shutdown); returns records handled."""
        total = 0
        items: list = []
        for ring in self.rings.values():
            for _ in range(max_rounds):
                n = self._drain_once(ring, items)
                total += n
                if n < self.batch:
                    break
        return total

    @property
    def dropped(self) -> int:
        return sum(r.dropped for r in self.rings.values())

    @property
    def lost(self) -> int:
        return sum(r.lost for r in self.rings.values())
