"""Lock-free single-producer/single-consumer ring of variable-length records in shared memory.

One ring per worker: the worker (producer) pushes one encoded request context per request,
the collector (consumer) drains batches. The producer never blocks and makes no system call
unless the consumer sleeps; a full ring drops the record and counts it.

Layout (one mapping from :mod:`forkproxy.shm.segment`, created by the master before fork)::

    0     head      u64  bytes ever committed by the producer         (producer writes)
    64    tail      u64  bytes ever released by the consumer          (consumer writes)
    72    lost      u64  invalid records skipped by a resync          (consumer writes)
    128   dropped   u64  pushes refused: ring full or record too big  (producer writes)
    192   waiting   u64  1 while the consumer sleeps on the doorbell  (both)
    256   magic, data_size
    4096  data area, a power of two; ``pos & (size - 1)`` is the offset of position ``pos``

Each counter has its own 64-byte cache line, so the two CPUs do not bounce a line on every
push. A record is a u64 header ``len | seq << 32`` and the payload padded to 8 bytes. A
record that does not fit before the end of the data area is preceded by a wrap marker
(``len == 0xFFFFFFFF``) and starts at offset 0; a record never straddles the end, so the
consumer can hand out a single contiguous memoryview.

Records longer than ``max_payload`` (half the data area minus the header) are refused like
pushes into a full ring: then a record always fits into an empty ring, whatever the offset.

``seq`` is the record's position in 8-byte units modulo 2**32. It increments by record
length rather than by one, but it needs no producer state: a restarted producer that
resumes from ``head`` computes the same numbers the consumer expects. A header left in the
slot by an earlier lap carries that lap's position (it would match only if written a
multiple of 2**35 bytes earlier), and a header read from the middle of old payload matches
with probability 2**-32, so a record whose header was not written in this lap is not
delivered: the consumer counts it in ``lost`` and resynchronises to ``head``.

Ordering. The producer writes payload, then header, then ``head`` (the commit); it never
publishes space it has not filled (reserve-then-write tore records when the producer was
SIGKILLed mid-write; commit-after-write never did). The consumer loads ``head``, then the
headers and payloads below it, then stores ``tail`` once per batch. From Python every 8-byte
access goes through ``memoryview.cast('Q')`` at an 8-byte-aligned offset, which CPython
compiles to a single ``mov``: atomic on x86-64 (measured, and re-checked by a test; a
property of the CPython build, not a language guarantee). Each access is a separate
bytecode behind opaque calls, so the C compiler cannot reorder them either. The
consumer's walk (ringwalk.py) is compiled, but it too makes each access as one call on
these memoryview objects. The producer's push, when compiled (ringpush.py), makes its
stores as C11 atomics with release order, which the C compiler keeps in this order too.

* x86-64 (TSO): stores are seen in program order and loads are not reordered with other
  loads or with later stores. Hence payload/header stores are visible before ``head``
  (release for free), the consumer's loads of a record follow its load of ``head``
  (acquire for free), and its reads of a record complete before its ``tail`` store frees
  the space. The one reordering TSO allows is a load passing an earlier store, which is
  the sleep handshake: consumer ``waiting = 1; load head`` against producer ``store head;
  load waiting`` can miss each other (Dekker needs ``mfence``/``xchg`` on both sides,
  which Python cannot emit). The rare lost wake-up is bounded by the ``wait`` timeout.
* aarch64 and other weakly ordered CPUs: none of the above holds. ``head`` needs a
  store-release (``stlr``) and the consumer's read of it a load-acquire (``ldar``); the
  same for ``tail`` in the other direction; the sleep handshake needs ``dmb ish``. This
  takes a small C helper with ``__atomic_store_n(p, v, __ATOMIC_RELEASE)``,
  ``__atomic_load_n(p, __ATOMIC_ACQUIRE)`` and ``__atomic_thread_fence(__ATOMIC_SEQ_CST)``
  (about 40 ns per call; the PyPI ``atomics`` package costs 100x that). ``seq`` catches a
  stale header but not a stale payload under a fresh header, so :func:`check_atomic_layout`
  refuses to create rings there instead of corrupting records.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable

from gevent.socket import wait_read

from forkproxy.shm.ringpush import COMPILED as PUSH_COMPILED
from forkproxy.shm.ringpush import Producer
from forkproxy.shm.ringwalk import (  # noqa: F401 (HEADER_SIZE: re-exported)
    _DATA,
    _HEAD,
    _HI,
    _LOST,
    _TAIL,
    HEADER_SIZE,
    WRAP,
    walk,
)
from forkproxy.shm.segment import create_mapping

Payload = bytes | bytearray | memoryview

MAGIC = 0x31474E4952504B46  # "FKPRING1"
MIN_DATA_SIZE = 64
MAX_DATA_SIZE = 1 << 32

# Indexes of u64 words in the mapping (byte offset // 8); the consumer's in ringwalk.py.
_DROPPED = 128 // 8
_WAITING = 192 // 8
_MAGIC = 256 // 8
_SIZE = 264 // 8


#: what platform.machine() says on the CPUs the rings are correct on
SUPPORTED_MACHINES = ("x86_64", "amd64")


def platform_support(machine: str | None = None) -> tuple[bool, str]:
    """(whether the rings can run on `machine`, a sentence saying so and why); the text
    `forkproxy check` prints and the error the rings raise elsewhere."""
    machine = machine if machine is not None else platform.machine()
    why = ("workers hand each request's record to the manager through shared-memory rings "
           "written from Python with plain 8-byte stores; that is only correct on x86-64, "
           "where such a store is one atomic instruction and the CPU keeps stores in "
           "program order (TSO), so a record is complete before its index is published. "
           "Weakly ordered CPUs such as ARM need acquire/release atomics that Python "
           "cannot issue.")
    if machine.lower() in SUPPORTED_MACHINES:
        return True, (f"platform: {machine}, supported (forkproxy runs on x86-64 Linux only: "
                      "its shared-memory rings rely on x86-64 store ordering and atomic "
                      "8-byte stores from Python)")
    return False, (f"platform: {machine or 'this CPU'} is not supported: forkproxy runs on "
                   f"x86-64 Linux only; {why}")


def check_atomic_layout() -> None:
    """Raise RuntimeError where the x86-64 ordering argument of this module does not hold."""
    supported, text = platform_support()
    if not supported:
        raise RuntimeError(text)
    if sys.byteorder != "little":
        raise RuntimeError("forkproxy rings assume a little-endian CPU")
    if memoryview(bytearray(8)).cast("Q").itemsize != 8:
        raise RuntimeError("memoryview 'Q' is not 8 bytes wide")


class Ring:
    """One SPSC ring. Create it in the master before fork; one producer and one consumer use it.

    Producer methods: :meth:`push`, :meth:`reset_producer`. Consumer methods: :meth:`drain`,
    :meth:`wait`. Exactly one live process may act as each side at a time: the master must
    reap a dead worker before it forks the replacement that pushes into the same ring.
    """

    __slots__ = ("_map", "_q", "_buf", "_efd", "_size", "_mask", "_half", "_max", "_limit",
                 "_producer")

    def __init__(self, mapping, doorbell_fd: int) -> None:
        self._map = mapping
        self._q = memoryview(mapping).cast("Q")
        self._buf = memoryview(mapping)
        self._efd = doorbell_fd
        if self._q[_MAGIC] != MAGIC:
            raise ValueError("not a forkproxy ring mapping")
        self._size = self._q[_SIZE]
        self._mask = self._size - 1
        if self._size > MAX_DATA_SIZE:
            raise ValueError("ring too large for 32-bit lengths and sequence numbers")
        # At most half the ring per record (header included): it then fits in an empty ring
        # at any offset, even when the space up to the end is skipped by a wrap marker.
        self._half = self._size // 2
        self._max = self._half - 8
        # Producer-local: head may grow up to here before tail must be re-read. A stale
        # value only underestimates free space (tail never moves backwards).
        self._limit = self._q[_TAIL] + self._size
        #: the push in C when ringpush.py is compiled (None: pushed in Python below)
        self._producer = (Producer(mapping, doorbell_fd, self._size, self._q[_TAIL])
                          if PUSH_COMPILED else None)

    @classmethod
    def create(cls, data_size: int = 1 << 20) -> Ring:
        """Map a new ring (unlinked at once) and its eventfd doorbell; call before fork."""
        check_atomic_layout()
        if data_size & (data_size - 1) or not MIN_DATA_SIZE <= data_size <= MAX_DATA_SIZE:
            raise ValueError(
                f"data_size must be a power of two in [{MIN_DATA_SIZE}, {MAX_DATA_SIZE}]"
            )
        mapping = create_mapping("ring", HEADER_SIZE + data_size)
        q = memoryview(mapping).cast("Q")
        q[_SIZE] = data_size
        q[_MAGIC] = MAGIC
        q.release()
        # Inherited across fork, closed on exec: the doorbell is for forked children only.
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return cls(mapping, efd)

    # -- producer ---------------------------------------------------------------------------

    def pusher(self) -> Callable[[Payload], bool]:
        """The fastest callable with :meth:`push`'s semantics: the compiled producer's
        own push (one C call, ringpush.py), or :meth:`push`. For the worker's per-request
        record (worker/state.py keeps it)."""
        producer = self._producer
        return producer.push if producer is not None else self.push

    def push(self, payload: Payload) -> bool:
        """Append one record (a bytes-like object of single bytes); False if dropped.

        Never blocks. The only system call is one eventfd write when the consumer sleeps.
        ``head`` is read from shared memory on every push, so a replacement producer
        continues where the previous one last committed.
        """
        producer = self._producer
        if producer is not None:
            return producer.push(payload)
        return self.push_python(payload)

    def push_python(self, payload: Payload) -> bool:
        """:meth:`push` in Python (the plain build's; tests compare it with the C one)."""
        n = len(payload)
        q = self._q
        head = q[_HEAD]
        need = (n + 15) & -8  # header + payload padded to 8
        off = head & self._mask
        # Fast path: fits before the end of the data area and below the cached limit.
        if need <= self._half and off + need <= self._size and head + need <= self._limit:
            at = _DATA + off
            self._map[at + 8 : at + 8 + n] = payload
            q[at >> 3] = n | (head << 29) & _HI  # seq = (head >> 3) mod 2**32, in bits 32-63
            q[_HEAD] = head + need  # the commit
            if q[_WAITING]:
                q[_WAITING] = 0  # one doorbell per sleep, not one per push
                os.eventfd_write(self._efd, 1)
            return True
        return self._push_slow(payload, n, head, off, need)

    def _push_slow(self, payload: Payload, n: int, head: int, off: int, need: int) -> bool:
        """Wrap, refresh the cached tail, or drop."""
        q = self._q
        size = self._size
        room = size - off
        end = head + need if need <= room else head + room + need
        if end > self._limit and need <= self._half:
            self._limit = q[_TAIL] + size  # only here do we read the consumer's line
        if end > self._limit or need > self._half:
            q[_DROPPED] += 1
            if q[_WAITING]:  # full while the consumer sleeps: a wake-up was missed
                q[_WAITING] = 0
                os.eventfd_write(self._efd, 1)
            return False
        if need > room:
            q[(_DATA + off) >> 3] = WRAP | (head << 29) & _HI
            head += room
            off = 0
        at = _DATA + off
        self._map[at + 8 : at + 8 + n] = payload
        q[at >> 3] = n | (head << 29) & _HI
        q[_HEAD] = head + need
        if q[_WAITING]:
            q[_WAITING] = 0
            os.eventfd_write(self._efd, 1)
        return True

    def reset_producer(self) -> None:
        """Refresh producer-local state after the producer process was replaced.

        Optional: ``head`` already lives only in shared memory, and the one cached value,
        the consumer's ``tail``, can only lag the real one (a push that seems not to fit
        re-reads it before dropping).
        A producer killed mid-push left at most an uncommitted record above ``head``, which
        the replacement overwrites.
        """
        self._limit = self._q[_TAIL] + self._size
        if self._producer is not None:
            self._producer.reset()

    # -- consumer ---------------------------------------------------------------------------

    def drain(self, handler: Callable[[memoryview], None], max_records: int = 4096) -> int:
        """Call ``handler`` on up to ``max_records`` committed records, oldest first.

        The memoryview points into the mapping and the producer may overwrite it once the
        batch is published: copy or decode what you need (``msgspec`` decoding copies). It
        is released when the handler returns, so a kept reference fails loudly instead of
        showing a later record (slices of it are not covered). ``tail`` is published once,
        after the batch; if the handler raises, the records handed out so far (including
        that one) are consumed and the exception propagates. Returns the number handled.
        """
        return walk(self._q, self._buf, self._size, self._max, handler, None, None, (),
                    max_records)[0]

    def drain_decoded(self, decode: Callable[[memoryview], object], out: list,
                      errors: type[Exception] | tuple = (),
                      max_records: int = 4096) -> tuple[int, int]:
        """Append ``decode(record)`` to ``out`` for up to ``max_records`` records.

        The manager's drain: no Python handler is called per record (a function call
        and a try/finally per record are ~0.3 µs of the manager's ~1.2 µs of ring walk
        and decode). ``decode`` must copy what it keeps (msgspec's decoders do); the view
        it gets is not released explicitly, it goes when ``decode`` returns. A record
        that raises one of ``errors`` is consumed and counted, not appended. Returns
        (records consumed, records that did not decode).
        """
        return walk(self._q, self._buf, self._size, self._max, None, decode, out, errors,
                    max_records)

    def drain_spans(self, starts, ends, max_records: int = 4096) -> tuple[int, int]:
        """Where up to ``max_records`` records stand, without copying or consuming them:
        record ``k`` is ``buffer[starts[k]:ends[k]]`` (``array('q')`` of at least
        ``max_records`` each). Returns (records, the tail that consumes them).

        The compiled manager's drain (manager/rawbatch.py reads the records in the ring
        and then calls :meth:`release` with that tail): the records stay the consumer's
        until then, so the producer has a batch less of free space meanwhile (a 1 MiB
        ring holds ~4,500 records of ~230 bytes, a batch at most ``max_records``). A
        record never straddles the end of the data area, so each is contiguous.
        """
        if len(starts) < max_records or len(ends) < max_records:  # the walk writes unchecked
            raise ValueError("drain_spans: too few starts or ends for max_records")
        return walk(self._q, self._buf, self._size, self._max, None, None, None, (),
                    max_records, starts, ends)

    def release(self, tail: int) -> None:
        """Publish ``tail`` from :meth:`drain_spans` once its records have been read: the
        producer may overwrite them from then on. A tail behind the published one, or
        past ``head``, is refused (it would hand the producer space it has not read, or
        re-deliver records)."""
        q = self._q
        if not q[_TAIL] <= tail <= q[_HEAD]:
            raise ValueError(f"release: tail {tail} outside [{q[_TAIL]}, {q[_HEAD]}]")
        q[_TAIL] = tail

    @property
    def buffer(self) -> memoryview:
        """The whole mapping as bytes (what :meth:`drain_spans`'s offsets index)."""
        return self._buf

    def wait(self, timeout: float = 0.05) -> None:
        """Sleep (cooperatively, in gevent) until the producer rings or ``timeout`` passes.

        Returns at once if records are pending. Arms ``waiting`` and re-checks ``head``
        before sleeping; the timeout bounds the lost wake-up that x86-64's store-load
        reordering allows (see the module docstring).
        """
        q = self._q
        if q[_HEAD] != q[_TAIL]:
            return
        q[_WAITING] = 1
        try:
            if q[_HEAD] != q[_TAIL]:
                return
            try:
                wait_read(self._efd, timeout)
            except TimeoutError:
                return
            try:
                os.eventfd_read(self._efd)
            except BlockingIOError:
                pass
        finally:
            q[_WAITING] = 0

    # -- state ------------------------------------------------------------------------------

    @property
    def head(self) -> int:
        return self._q[_HEAD]

    @property
    def tail(self) -> int:
        return self._q[_TAIL]

    @property
    def dropped(self) -> int:
        """Pushes refused (ring full or record larger than ``max_payload``), all producers."""
        return self._q[_DROPPED]

    @property
    def lost(self) -> int:
        """Invalid records the consumer detected and skipped by resynchronising to head."""
        return self._q[_LOST]

    @property
    def waiting(self) -> bool:
        return bool(self._q[_WAITING])

    @property
    def data_size(self) -> int:
        return self._size

    @property
    def max_payload(self) -> int:
        return self._max

    @property
    def doorbell_fd(self) -> int:
        return self._efd

    @property
    def closed(self) -> bool:
        return self._efd < 0

    def close(self) -> None:
        """Unmap and close the doorbell in this process (other processes keep theirs)."""
        if self._efd < 0:
            return
        if self._producer is not None:
            self._producer.close()
            self._producer = None
        self._q.release()
        self._buf.release()
        self._map.close()
        os.close(self._efd)
        self._efd = -1

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<Ring closed>"
        return (
            f"<Ring size={self._size} head={self.head} tail={self.tail} "
            f"dropped={self.dropped} lost={self.lost}>"
        )
