"""The shared-memory SPSC ring: layout rules, drops, resync, doorbell, crash safety."""

from __future__ import annotations

import os
import random
import signal
import struct
import time
import traceback
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Iterator

import gevent
import posix_ipc
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from forkproxy.shm import ring as ring_mod
from forkproxy.shm.ring import Ring
from forkproxy.shm.segment import create_mapping, sweep_stale

# -- helpers ----------------------------------------------------------------------------------


class Children:
    """Forked children of one test; every one still running is SIGKILLed and reaped after it."""

    def __init__(self) -> None:
        self.live: set[int] = set()

    def start(self, target: Callable[..., object], *args: object) -> int:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                target(*args)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        self.live.add(pid)
        return pid

    def reap(self, pid: int) -> int:
        """Wait for ``pid`` and return its raw wait status."""
        _, status = os.waitpid(pid, 0)
        self.live.discard(pid)
        return status

    def kill(self, pid: int) -> int:
        os.kill(pid, signal.SIGKILL)
        return self.reap(pid)

    def cleanup(self) -> None:
        for pid in list(self.live):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.reap(pid)


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    yield c
    c.cleanup()


@pytest.fixture
def make_ring() -> Iterator[Callable[[int], Ring]]:
    rings: list[Ring] = []

    def make(data_size: int = 1 << 16) -> Ring:
        r = Ring.create(data_size)
        rings.append(r)
        return r

    yield make
    for r in rings:
        r.close()


def drain_all(ring: Ring, max_records: int = 4096) -> list[bytes]:
    out: list[bytes] = []
    ring.drain(lambda v: out.append(bytes(v)), max_records)
    return out


def record_span(n: int) -> int:
    """Bytes a record of ``n`` payload bytes occupies: u64 header + payload padded to 8."""
    return 8 + (n + 7) // 8 * 8


def shm_entries(pid: int) -> list[str]:
    return [e for e in os.listdir("/dev/shm") if e.startswith(f"forkproxy.{pid}.")]


def await_condition(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.0005)


# -- single-process behaviour ---------------------------------------------------------------


def test_roundtrip_of_sizes_and_buffer_types(make_ring):
    ring = make_ring(1 << 12)
    payloads = [b"", b"x", bytes(range(7)), bytes(8), bytearray(b"abc" * 30), b"z" * 1000]
    for p in payloads:
        assert ring.push(p)
    assert ring.push(memoryview(b"view!"))
    assert drain_all(ring) == [bytes(p) for p in payloads] + [b"view!"]
    assert ring.head == ring.tail == sum(record_span(len(p)) for p in payloads) + record_span(5)
    assert ring.dropped == ring.lost == 0


def test_drain_batches_and_publishes_tail_once_per_batch(make_ring):
    ring = make_ring(1 << 12)
    for i in range(10):
        assert ring.push(b"r%d" % i)
    tails_seen: list[int] = []
    got: list[bytes] = []

    def handler(view: memoryview) -> None:
        tails_seen.append(ring.tail)
        got.append(bytes(view))

    assert ring.drain(handler, max_records=4) == 4
    assert tails_seen == [0, 0, 0, 0]  # not published record by record
    assert ring.tail == 4 * record_span(2)
    assert ring.drain(handler, max_records=4) == 4
    assert ring.drain(handler, max_records=4) == 2
    assert ring.drain(handler, max_records=4) == 0
    assert got == [b"r%d" % i for i in range(10)]
    assert ring.tail == ring.head


def test_wrap_marker_moves_record_to_start_of_data_area(make_ring):
    ring = make_ring(256)
    a, b, c = b"a" * 100, b"b" * 100, b"c" * 100  # 112 bytes each
    assert ring.push(a) and ring.push(b)
    assert drain_all(ring) == [a, b]
    assert ring.head == 224
    assert ring.push(c)  # 32 bytes left before the end: wrap marker, record at offset 0
    assert ring.head == 256 + 112
    assert drain_all(ring) == [c]
    # Many laps with sizes that land the wrap on every possible 8-byte offset.
    expected, got = [], []
    for i in range(2000):
        p = bytes([i % 251]) * (i * 7 % 57)  # 3 records + wrap waste always fit
        assert ring.push(p)
        expected.append(p)
        if i % 3 == 2:
            got += drain_all(ring)
    got += drain_all(ring)
    assert got == expected
    assert ring.head > 200 * 256 and ring.dropped == 0


def test_full_ring_drops_and_counts(make_ring):
    ring = make_ring(1024)
    payload = b"p" * 100  # 112 bytes: 9 fit in 1024
    assert [ring.push(payload) for _ in range(9)] == [True] * 9
    assert not ring.push(payload)
    assert ring.push(bytes(8))  # 16 bytes: exactly the rest
    assert ring.head == 1024
    assert not ring.push(b"")
    assert ring.dropped == 2
    assert ring.head == 1024  # a refused push writes nothing
    assert ring.drain(lambda v: None, max_records=1) == 1
    assert ring.push(payload)  # exactly the 112 bytes just freed, at offset 0
    assert not ring.push(b"")
    assert ring.dropped == 3
    assert len(drain_all(ring)) == 10
    assert ring.head == ring.tail


def test_record_too_large_is_dropped_and_largest_fits_at_any_offset(make_ring):
    ring = make_ring(1024)
    assert ring.max_payload == 512 - 8
    assert not ring.push(bytes(ring.max_payload + 1))
    assert ring.dropped == 1
    for skew in range(0, 1024, 8):  # empty ring, head at every offset
        assert ring.push(bytes(skew % 500))
        drain_all(ring)
        big = bytes([skew % 256]) * ring.max_payload
        assert ring.push(big), skew
        assert drain_all(ring) == [big]
    assert ring.dropped == 1


def test_stale_record_from_previous_lap_is_never_delivered(make_ring):
    ring = make_ring(256)
    assert ring.push(b"old" * 30)  # position 0, 104 bytes
    assert ring.push(bytes(64)) and ring.push(bytes(72))  # 72 + 80 bytes: up to 256
    assert len(drain_all(ring)) == 3
    assert ring.head == 256
    # A broken producer publishing head for a record at position 256 without writing it:
    # offset 0 still holds the intact record of lap 0, which only its seq gives away.
    ring._q[0] = 256 + record_span(90)
    delivered = drain_all(ring)
    assert delivered == []
    assert ring.lost == 1
    assert ring.tail == ring.head
    assert ring.push(b"new")  # the ring keeps working after the resync
    assert drain_all(ring) == [b"new"]
    assert ring.lost == 1


def test_torn_header_is_never_delivered(make_ring):
    ring = make_ring(1024)
    assert ring.push(b"a" * 40) and ring.push(b"b" * 40)
    word = ring._q[512 + record_span(40) // 8]  # header of the second record
    ring._q[512 + record_span(40) // 8] = word + 200  # length now runs past head
    assert drain_all(ring) == [b"a" * 40]
    assert ring.lost == 1 and ring.tail == ring.head


def test_handler_exception_consumes_that_record_and_propagates(make_ring):
    ring = make_ring(1024)
    for p in (b"one", b"two", b"three"):
        ring.push(p)
    seen: list[bytes] = []

    def handler(view: memoryview) -> None:
        seen.append(bytes(view))
        if view == b"two":
            raise ValueError("bad record")

    with pytest.raises(ValueError):
        ring.drain(handler)
    assert seen == [b"one", b"two"]
    assert ring.tail == record_span(3) * 2
    assert drain_all(ring) == [b"three"]


def test_view_is_released_after_the_handler(make_ring):
    ring = make_ring(1024)
    ring.push(b"data")
    kept: list[memoryview] = []
    ring.drain(kept.append)
    with pytest.raises(ValueError):
        bytes(kept[0])


def test_drain_decoded_appends_counts_bad_records_and_resumes(make_ring):
    ring = make_ring(1024)
    for p in (b"1", b"x", b"3", b"4"):
        ring.push(p)
    out: list[int] = []
    assert ring.drain_decoded(lambda view: int(bytes(view)), out, ValueError, 3) == (3, 1)
    assert out == [1, 3]  # the bad one is consumed and counted, the batch goes on
    assert ring.drain_decoded(lambda view: int(bytes(view)), out, ValueError) == (1, 0)
    assert out == [1, 3, 4] and ring.tail == ring.head
    assert ring.drain_decoded(int, out, ValueError) == (0, 0)


def test_drain_decoded_propagates_other_errors_and_consumes_that_record(make_ring):
    ring = make_ring(1024)
    for p in (b"1", b"2", b"3"):
        ring.push(p)

    def decode(view: memoryview) -> int:
        if view == b"2":
            raise KeyError("not a decode error")
        return int(bytes(view))

    out: list[int] = []
    with pytest.raises(KeyError):
        ring.drain_decoded(decode, out, ValueError)
    assert out == [1] and ring.tail == record_span(1) * 2
    assert ring.drain_decoded(decode, out, ValueError) == (1, 0) and out == [1, 3]


def test_create_validates_size_and_refuses_weakly_ordered_cpus(make_ring, monkeypatch):
    for bad in (0, 32, 1000, 1 << 33):
        with pytest.raises(ValueError):
            make_ring(bad)
    monkeypatch.setattr(ring_mod.platform, "machine", lambda: "aarch64")
    with pytest.raises(RuntimeError, match="acquire/release"):
        make_ring(1024)


# -- doorbell ---------------------------------------------------------------------------------


def test_producer_rings_only_when_consumer_waits(make_ring):
    ring = make_ring(1024)
    ring.push(b"nobody waits")
    with pytest.raises(BlockingIOError):
        os.eventfd_read(ring.doorbell_fd)  # no write happened
    drain_all(ring)

    sleeper = gevent.spawn(ring.wait, 30)
    deadline = time.monotonic() + 5
    while not ring.waiting and time.monotonic() < deadline:
        gevent.sleep(0)
    assert ring.waiting
    t0 = time.monotonic()
    assert ring.push(b"wake up")
    assert not ring.waiting  # the producer disarmed: one doorbell per sleep
    sleeper.join(timeout=30)
    assert sleeper.successful()
    assert time.monotonic() - t0 < 25  # woken, not ended by its 30 s timeout
    with pytest.raises(BlockingIOError):
        os.eventfd_read(ring.doorbell_fd)  # the consumer consumed the doorbell
    assert drain_all(ring) == [b"wake up"]


def test_wait_returns_at_once_when_pending_and_after_timeout_when_idle(make_ring):
    ring = make_ring(1024)
    t0 = time.monotonic()
    ring.wait(0.2)
    assert time.monotonic() - t0 >= 0.15
    assert not ring.waiting
    ring.push(b"x")
    t0 = time.monotonic()
    ring.wait(30)
    assert time.monotonic() - t0 < 25  # at once, not after its 30 s timeout


def _push_when_consumer_sleeps(ring: Ring) -> None:
    deadline = time.monotonic() + 25
    while not ring.waiting:
        if time.monotonic() > deadline:
            raise SystemExit("consumer never slept")
    ring.push(b"from child")


def test_doorbell_wakes_consumer_across_processes(make_ring, children):
    ring = make_ring(1024)
    pid = children.start(_push_when_consumer_sleeps, ring)
    t0 = time.monotonic()
    ring.wait(30)
    assert time.monotonic() - t0 < 25  # woken, not ended by its 30 s timeout
    assert drain_all(ring) == [b"from child"]
    assert os.waitstatus_to_exitcode(children.reap(pid)) == 0


# -- processes, restarts, shared memory -----------------------------------------------------


def _push_tagged(ring: Ring, tag: bytes, count: int) -> None:
    for i in range(count):
        assert ring.push(b"%s%d" % (tag, i))


def test_replaced_producer_resumes_from_shared_head(make_ring, children):
    ring = make_ring(4096)
    got: list[bytes] = []
    for tag in (b"A", b"B", b"C"):
        # Each producer is forked from this process, whose Ring never pushed: its local
        # state is stale, and the head in shared memory must win.
        pid = children.start(_push_tagged, ring, tag, 60)
        assert os.waitstatus_to_exitcode(children.reap(pid)) == 0
        got += drain_all(ring, max_records=25)  # leave some behind across the restart
    got += drain_all(ring)
    assert got == [b"%s%d" % (t, i) for t in (b"A", b"B", b"C") for i in range(60)]
    assert ring.dropped == 0


_PATTERN_A = 0x0123456789ABCDEF
_PATTERN_B = _PATTERN_A ^ 0xFFFFFFFFFFFFFFFF  # every byte differs


def _flip_word(mapping, index: int) -> None:
    q = memoryview(mapping).cast("Q")
    q[1] = 1  # started
    while q[0] == 0:  # until the parent says stop
        q[index] = _PATTERN_A
        q[index] = _PATTERN_B


def test_aligned_u64_store_is_atomic_across_processes(children):
    """The ring's premise: an aligned memoryview 'Q' store is one mov (a CPython build fact)."""
    mapping = create_mapping("test", 4096)
    q = memoryview(mapping).cast("Q")
    index = 64 // 8 + 3  # aligned, inside one cache line
    pid = children.start(_flip_word, mapping, index)
    await_condition(lambda: q[1] == 1)
    seen: dict[int, int] = {}
    reads = 0
    deadline = time.monotonic() + 20
    # At least 2M reads, and on until the flipping child was seen in both states.
    while reads < 2_000_000 or len(seen) < 2 and time.monotonic() < deadline:
        for _ in range(100_000):
            v = q[index]
            seen[v] = seen.get(v, 0) + 1
        reads += 100_000
    q[0] = 1
    assert os.waitstatus_to_exitcode(children.reap(pid)) == 0
    torn = set(seen) - {_PATTERN_A, _PATTERN_B}
    assert not torn, f"torn values: {[hex(v) for v in torn][:5]}"
    assert len(seen) == 2
    q.release()
    mapping.close()


def test_segment_is_unlinked_yet_shared_with_children(make_ring, children):
    ring = make_ring(4096)
    assert shm_entries(os.getpid()) == []
    pid = children.start(_push_tagged, ring, b"child", 3)
    assert os.waitstatus_to_exitcode(children.reap(pid)) == 0
    assert drain_all(ring) == [b"child0", b"child1", b"child2"]


def _create_and_hold(wfd: int) -> None:
    ring = Ring.create(1 << 16)
    ring.push(b"x" * 1000)
    os.write(wfd, b"%d\n" % len(shm_entries(os.getpid())))
    while True:
        time.sleep(60)


def test_no_segment_left_after_creator_is_sigkilled(children):
    rfd, wfd = os.pipe()
    try:
        pid = children.start(_create_and_hold, wfd)
        seen_while_alive = os.read(rfd, 100)
    finally:
        os.close(rfd)
        os.close(wfd)
    assert seen_while_alive == b"0\n"
    status = children.kill(pid)
    assert os.WIFSIGNALED(status)
    assert shm_entries(pid) == []


def test_shm_entries_sees_named_segments_and_sweep_removes_only_dead_creators(children):
    pid = children.start(lambda: None)
    children.reap(pid)  # a dead creator
    dead = posix_ipc.SharedMemory(f"/forkproxy.{pid}.ring.test", posix_ipc.O_CREX, size=4096)
    alive = posix_ipc.SharedMemory(
        f"/forkproxy.{os.getpid()}.ring.test", posix_ipc.O_CREX, size=4096
    )
    try:
        assert shm_entries(pid) == [f"forkproxy.{pid}.ring.test"]  # the probe works
        assert f"forkproxy.{pid}.ring.test" in sweep_stale()
        assert shm_entries(pid) == []
        assert shm_entries(os.getpid()) == [f"forkproxy.{os.getpid()}.ring.test"]
    finally:
        for seg in (dead, alive):
            seg.close_fd()
            try:
                seg.unlink()
            except posix_ipc.ExistentialError:
                pass


# -- property: random sizes and interleavings against a model queue -------------------------


class RingModel(RuleBasedStateMachine):
    """Every refusal is justified by the documented space rule; FIFO equals the model."""

    ring: Ring

    @initialize(size_log=st.integers(min_value=6, max_value=11))
    def create(self, size_log: int) -> None:
        self.ring = Ring.create(1 << size_log)
        self.model: deque[bytes] = deque()
        self.drops = 0

    def teardown(self) -> None:
        if hasattr(self, "ring"):  # absent if hypothesis failed before initialising
            self.ring.close()

    @rule(payload=st.binary(max_size=1100))
    def push(self, payload: bytes) -> None:
        r = self.ring
        was_empty = not self.model
        head, tail, size = r.head, r.tail, r.data_size
        need = record_span(len(payload))
        room = size - head % size
        end = head + need if need <= room else head + room + need
        fits = len(payload) <= r.max_payload and end - tail <= size
        assert r.push(payload) == fits
        if fits:
            self.model.append(payload)
            assert r.head == end
        else:
            self.drops += 1
            assert r.head == head
        if was_empty:  # whatever the offset, an empty ring takes anything up to max_payload
            assert fits == (len(payload) <= r.max_payload)

    @rule(max_records=st.integers(min_value=1, max_value=12))
    def drain(self, max_records: int) -> None:
        got: list[bytes] = []
        count = self.ring.drain(lambda v: got.append(bytes(v)), max_records)
        expected = [self.model.popleft() for _ in range(min(max_records, len(self.model)))]
        assert got == expected
        assert count == len(expected)

    @invariant()
    def counters(self) -> None:
        r = self.ring
        assert 0 <= r.head - r.tail <= r.data_size
        assert r.dropped == self.drops
        assert r.lost == 0
        if not self.model:
            assert r.head == r.tail


RingModel.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestRingModel = RingModel.TestCase


# -- two processes: random SIGKILLs of the producer -----------------------------------------

_REC = struct.Struct("<IIQQ")  # generation, sequence, dropped at start, dropped before push
_CRC = struct.Struct("<I")


def _stress_producer(ring: Ring, gen: int) -> None:
    rnd = random.Random(gen)
    dropped_at_start = ring.dropped
    seq = 0
    while True:
        body = rnd.randbytes(rnd.randrange(0, 1200))
        head = _REC.pack(gen, seq, dropped_at_start, ring.dropped)
        ring.push(head + _CRC.pack(zlib.crc32(body, zlib.crc32(head))) + body)
        seq += 1


def test_sigkilled_producer_never_yields_torn_duplicated_or_reordered_records(make_ring, children):
    ring = make_ring(1 << 14)  # small: wraps every few dozen records, fills quickly
    rnd = random.Random(4)
    records: list[tuple[int, int, int, int]] = []
    torn: list[bytes] = []

    def check(view: memoryview) -> None:
        head = view[: _REC.size]
        (crc,) = _CRC.unpack_from(view, _REC.size)
        if zlib.crc32(view[_REC.size + 4 :], zlib.crc32(head)) != crc:
            torn.append(bytes(view))
            return
        records.append(_REC.unpack(head))

    generations = 40
    stalls = 0
    for gen in range(generations):
        head_at_fork = ring.head
        dropped_at_fork = ring.dropped
        pid = children.start(_stress_producer, ring, gen)
        stall = gen % 3 == 1  # stop consuming until the producer hits a full ring
        deadline = time.monotonic() + 10
        while ring.head == head_at_fork or stall and ring.dropped == dropped_at_fork:
            assert time.monotonic() < deadline, "producer made no progress"
            if stall:
                time.sleep(0.0005)
            else:
                ring.drain(check)
        stalls += stall
        kill_at = time.monotonic() + rnd.uniform(0, 0.03)  # a random moment of its run
        while time.monotonic() < kill_at:
            if gen % 3 == 2:
                ring.wait(0.005)
            ring.drain(check)
        status = children.kill(pid)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        while ring.drain(check):  # the next producer starts on an empty ring
            pass

    assert torn == []
    assert ring.lost == 0
    by_gen: dict[int, list[tuple[int, int, int, int]]] = {}
    last_gen = -1
    for rec in records:
        assert rec[0] >= last_gen, "generations out of order"
        last_gen = rec[0]
        by_gen.setdefault(rec[0], []).append(rec)
    assert sorted(by_gen) == list(range(generations))  # every producer delivered
    explained_drops = 0
    for recs in by_gen.values():
        _, seq0, d_start, d0 = recs[0]
        assert seq0 == d0 - d_start  # records before the first delivered one were drops
        for (_, sa, _, da), (_, sb, _, db) in zip(recs, recs[1:], strict=False):
            assert sb > sa, "duplicate or reordered record"
            assert sb - sa - 1 == db - da, "a record went missing without a counted drop"
        explained_drops += recs[-1][3] - d_start
    # Drops after a generation's last delivered record and before its kill are uncounted
    # here; no drop may be invented.
    assert explained_drops <= ring.dropped
    assert ring.dropped > 0 and stalls >= 8
    assert ring.head > 50 * ring.data_size  # many laps, many wrap markers
    assert len(records) > 1000


def spans_of(ring: Ring, n: int, starts, ends) -> list[bytes]:
    buf = ring.buffer
    return [bytes(buf[starts[k]:ends[k]]) for k in range(n)]


def test_drain_spans_gives_records_where_they_stand_and_releases_on_request(make_ring):
    """Ring.drain_spans (the compiled manager's drain): each record's place in the
    mapping, in ring order, across many wrap markers; nothing is consumed until
    release(tail), and until then the producer cannot reuse the space."""
    ring = make_ring(1 << 12)
    rnd = random.Random(5)
    starts, ends = array("q", bytes(8 * 64)), array("q", bytes(8 * 64))
    sent, got = [], []
    for _ in range(400):
        for _ in range(rnd.randrange(1, 12)):
            m = bytes([rnd.randrange(256)]) * rnd.randrange(1, 200)
            if ring.push(m):
                sent.append(m)
        most = rnd.choice((1, 5, 64))
        tail0 = ring.tail
        n, tail = ring.drain_spans(starts, ends, most)
        assert ring.tail == tail0  # not consumed yet
        assert n <= most and (n == 0 or tail > tail0)
        got += spans_of(ring, n, starts, ends)
        ring.release(tail)
        assert ring.tail == tail
    while True:
        n, tail = ring.drain_spans(starts, ends, 64)
        got += spans_of(ring, n, starts, ends)
        ring.release(tail)
        if not n:
            break
    assert got == sent and ring.head > 20 * ring.data_size and ring.lost == 0
    assert ring.drain_spans(starts, ends, 10) == (0, ring.tail)
    with pytest.raises(ValueError):
        ring.drain_spans(array("q", bytes(8 * 9)), ends, 10)


def test_a_batch_held_in_place_keeps_its_space_until_released(make_ring):
    ring = make_ring(1 << 12)
    starts, ends = array("q", bytes(8 * 64)), array("q", bytes(8 * 64))
    msgs = [bytes([i]) * 100 for i in range(36)]  # 36 x 112 B: most of 4 KiB
    for m in msgs:
        assert ring.push(m)
    n, tail = ring.drain_spans(starts, ends, 64)
    assert n == 36
    assert not ring.push(b"x" * 600)  # the held batch's space is not free yet
    assert spans_of(ring, n, starts, ends) == msgs  # and not overwritten
    with pytest.raises(ValueError):
        ring.release(ring.head + 8)  # past head
    ring.release(tail)
    with pytest.raises(ValueError):
        ring.release(tail - 8)  # behind the published tail
    assert ring.push(b"x" * 600)


def test_drain_spans_skips_a_torn_record_and_resynchronises_on_release(make_ring):
    ring = make_ring(1 << 12)
    starts, ends = array("q", bytes(8 * 64)), array("q", bytes(8 * 64))
    for m in (b"a" * 10, b"b" * 10, b"c" * 10):
        assert ring.push(m)
    q = memoryview(ring._map).cast("Q")
    q[(ring_mod._DATA + 24) >> 3] ^= 1 << 40  # the second record's seq: not this lap
    n, tail = ring.drain_spans(starts, ends, 64)
    assert spans_of(ring, n, starts, ends) == [b"a" * 10]
    assert tail == ring.head and ring.lost == 1
    ring.release(tail)
    q.release()
    assert ring.drain_spans(starts, ends, 64) == (0, ring.head)


@pytest.mark.skipif(not ring_mod.PUSH_COMPILED, reason="plain-Python job: no C push built")
def test_c_push_writes_the_same_bytes_as_the_python_push(make_ring):
    # shm/ringpush.py (the worker's push, compiled) against Ring.push_python, step for
    # step on two rings: records of every length up to past max_payload, wrap markers at
    # every offset, full rings and a drain at random moments, a bytes, bytearray and
    # memoryview payload each
    c_ring, py_ring = make_ring(2048), make_ring(2048)
    c_push = c_ring.pusher()
    assert c_push != c_ring.push_python  # the compiled producer's own push
    rnd = random.Random(7)
    kinds = (bytes, bytearray, lambda b: memoryview(b)[1:])
    for step in range(6000):
        n = rnd.choice((rnd.randrange(0, 64), rnd.randrange(0, 1100)))
        payload = kinds[step % 3](bytes([step % 251]) * (n + 1))
        assert c_push(payload) == py_ring.push_python(payload), step
        if rnd.random() < 0.2:
            most = rnd.randrange(1, 40)
            assert drain_all(c_ring, most) == drain_all(py_ring, most), step
        assert bytes(c_ring._map) == bytes(py_ring._map), step
    assert c_ring.dropped == py_ring.dropped > 0
    assert c_ring.head == py_ring.head > 2048 * 50  # many laps
    c_ring.reset_producer()
    assert c_ring.push(b"after reset")
    assert drain_all(c_ring)[-1] == b"after reset"


def test_push_into_a_closed_ring_raises(make_ring):
    ring = make_ring(1024)
    push = ring.pusher()
    assert push(b"x")
    ring.close()
    with pytest.raises(ValueError):
        push(b"y")
