"""The compiled record path (manager/rawbatch.py: records scanned into C structs, counters
and histograms from them, JSON lines written in C) against msgspec's decode and the
Python path: the same exposition to the last digit and the same access log bytes, for
records that take every branch (the fast path, each fallback, hostile strings, records
that do not decode), in batches drained from a real ring."""

from __future__ import annotations

import math
import random

import msgspec
import pytest
from test_manager_aggregation import assert_same, random_context, reference_metrics

from forkproxy.context import N_TIMES, RequestContext, WorkerGauges, decoder, encoder
from forkproxy.manager import accesslog, rawbatch
from forkproxy.manager.collector import Collector
from forkproxy.manager.histogram import DURATION_BUCKETS, FINE_BUCKETS
from forkproxy.manager.jsonline import json_batch
from forkproxy.manager.metrics import Metrics
from forkproxy.manager.records import RecordSink
from forkproxy.shm.ring import Ring

pytestmark = pytest.mark.skipif(not rawbatch.COMPILED,
                                reason="the C record path exists only when compiled")

#: rawrecord.pxd's FP_NAMES_MAX: a RawBatch forgets its names past this many
NAMES_MAX = 1 << 14

HOSTILE = ["", "/", "/a\"b", "/back\\slash", "/ctl\x01\x1f\x7f", "/tab\tnl\nret\r",
           "/b\bf\f", "/caf\u00e9", "/\u2603snow", "x" * 40, "y" * 300, "z" * 5000,
           "/emoji\U0001f600", "/nul\x00"]


def hostile_context(rng: random.Random) -> RequestContext:
    ctx = random_context(rng)
    pick = rng.choice
    ctx.path = pick(HOSTILE)
    ctx.remote = pick(["127.0.0.1", "::1", "a\"b", "\u00e9"])
    ctx.method = pick(["GET", "M\\", "PO\nST"])
    ctx.request_id = pick([ctx.request_id, "", "id\x02"])
    ctx.listener = pick(["a:1", "b:2", "l\u00e9", "l\"q"])
    ctx.upstream = pick(["", "app", "api", "u\\p"])
    ctx.route = pick(["", "* /api", "\u00e9 /"])
    ctx.protocol, ctx.stream = pick([("HTTP/1.1", 0), ("HTTP/2", 1), ("HTTP/2", 2**31 - 1)])
    ctx.trace_id, ctx.span_id = pick([(b"", b""), (bytes(range(16)), b"\xff" * 8)])
    ctx.trace_flags = pick([0, 1])
    ctx.tracestate = pick(["", "a=b"])
    ctx.grpc_status = pick([None, None, None, 0, 14])
    ctx.worker = pick([1, 2**40, -5])
    ctx.bytes_out = pick([0, 1, 2**50, 255, 65536])
    ctx.status = pick([200, 404, 0, 99999])
    ctx.retries = pick([0, 0, 1, -3, 2**45])
    ctx.ts = pick([ctx.ts, 0.0, 1e12, 1.5])
    if rng.random() < 0.05:
        ctx.times = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1e7]  # 1e13 µs: the Python line
    if rng.random() < 0.05:
        ctx.times = ctx.times[:6]  # another number of timestamps
    return ctx


def odd_payloads() -> list[bytes]:
    """Records the scanner must leave to msgspec: gauges, short or long arrays, ints where
    floats go, garbage that does not decode."""
    t = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0]
    full = list(msgspec.structs.astuple(RequestContext(
        1.0, "r", 1, "a:1", "h", "GET", "/", 200, 0, 0, "app", "", False, None, "", t)))
    return [
        encoder.encode(WorkerGauges(7, 1.0, 5, 2, [])),
        msgspec.msgpack.encode([1, *full[:16]]),  # an older record: fewer fields
        msgspec.msgpack.encode([1, *full, "extra"]),
        msgspec.msgpack.encode([1, *full[:15], [0, 0, 1, 0, 0, 0, 0, 2]]),  # ints
        b"\xc1garbage",
        msgspec.msgpack.encode([1, *full[:7], "200", *full[8:]]),  # wrong type
    ]


def run_both(payloads: list[bytes], batch: int = 97) -> int:
    """Through the ring: the C path and the reference, batch by batch."""
    ring = Ring.create(1 << 20)
    raw = rawbatch.RawBatch(batch)
    fast, ref = Metrics(), Metrics()
    fast_errors, ref_errors = [], []  # the records Metrics.on_error is given
    fast.on_error, ref.on_error = fast_errors.append, ref_errors.append
    fast_lines, ref_lines = [], []
    bad = scanned = 0
    try:
        for i in range(0, len(payloads), batch):
            for p in payloads[i:i + batch]:
                assert ring.push(p)
            raw.n, tail = ring.drain_spans(raw.starts, raw.ends, batch)
            assert raw.n == len(payloads[i:i + batch])
            raw.attach(ring.buffer)  # read where they stand, as the Collector does
            fast_lines.append(raw.process(fast, True))
            bad += raw.bad
            scanned += raw.scanned
            items = []
            for p in payloads[i:i + batch]:
                try:
                    items.append(decoder.decode(p))
                except msgspec.DecodeError:
                    pass
            ref.observe_batch(items)
            ref_lines.append(json_batch(items)[0])
            assert raw.records() == items
            raw.detach()
            ring.release(tail)
    finally:
        ring.close()
    assert bad == sum(1 for p in payloads if safe_decode(p) is None)
    assert b"".join(fast_lines) == b"".join(ref_lines)
    assert fast.render() == ref.render()
    assert fast_errors == ref_errors
    for attr in ("rejected", "retries", "tunnels", "grpc", "requests", "bytes_out"):
        assert getattr(fast, attr) == getattr(ref, attr), attr
    return scanned
    assert (fast.records, fast.gauge_records) == (ref.records, ref.gauge_records)


def safe_decode(p: bytes):
    try:
        return decoder.decode(p)
    except msgspec.DecodeError:
        return None


def test_records_take_the_c_path_and_match_msgspec_to_the_byte():
    rng = random.Random(4)
    ctxs = [random_context(rng) for _ in range(3000)]  # errors, rejects, retries, tunnels
    for c in ctxs[::3]:
        c.grpc_status = c.status % 17
    assert run_both([encoder.encode(c) for c in ctxs], batch=1024) == len(ctxs)


def test_every_fallback_and_hostile_strings_match_msgspec():
    rng = random.Random(16)
    payloads = [encoder.encode(hostile_context(rng)) for _ in range(4000)]
    odd = odd_payloads()
    for i in range(0, len(payloads), 37):
        payloads.insert(i, odd[(i // 37) % len(odd)])
    scanned = run_both(payloads)
    assert 0 < scanned < len(payloads)  # both paths taken


def test_durations_at_the_edge_of_the_c_writer_range():
    """Phases from 0 to just under and over 1e12 µs: msgspec's float text, C or Python."""
    payloads = []
    for us in (0, 1, 9, 10, 99, 100, 999, 1000, 1001, 12000, 123456, 999999999999,
               1000000000000, 2**53):
        t = [0.0] * N_TIMES
        t[0], t[2] = 10.0, 10.0 + us / 1e6
        t[7] = t[2] + us / 1e6
        payloads.append(encoder.encode(RequestContext(
            1_700_000_000.999, "r", 1, "a:1", "h", "GET", "/", 200, 0, 0, "", "", False,
            None, "", t)))
    assert run_both(payloads) == len(payloads)


def test_integers_at_every_power_of_ten_match_msgspec():
    """The line writer's integers (worker, status, byte counts, stream, and the phases'
    and duration's milliseconds) at 10^k - 1, 10^k and 10^k + 1 for every k, and the
    int64 extremes: msgspec's digits."""
    edges = sorted({0, 1, 2**48, 2**63 - 1, *(
        x for k in range(1, 19) for x in (10**k - 1, 10**k, 10**k + 1))})
    payloads = []
    for i, x in enumerate(edges):
        t = [0.0] * N_TIMES
        us = x % 10**12  # the writer's range for milliseconds (us / 1000)
        t[0], t[2] = 10.0, 10.0 + us / 1e6
        t[7] = t[2] + us / 1e6
        for worker in (x, -x, -(2**63)):
            payloads.append(encoder.encode(RequestContext(
                1_700_000_000.25, "r", worker, "a:1", "h", "GET", "/", x % 65536,
                min(x, 2**48), min(x, 2**48), "app", "", False, None, "", t,
                protocol="HTTP/2", stream=x if i % 2 else 0)))
    assert run_both(payloads) > 0.9 * len(payloads)


def test_phases_and_durations_on_every_bucket_bound():
    """Each phase and the duration at, just under and just over every histogram bound
    (below the first, past the last): the C bucket search puts each where
    bisect_left does, so the exposition is the same."""
    bounds = sorted(set(FINE_BUCKETS) | set(DURATION_BUCKETS))
    values = [1e-9, 1e4]
    for b in bounds:
        values += [math.nextafter(b, 0.0), b, math.nextafter(b, math.inf)]
    ctxs = []
    for v in values:
        # differences of doubles that are exact (2v - v == v): the phases at v, 2v, 4v
        # and 8v, the duration and the total at v
        for t in ([v, 2 * v, 2 * v, v, 2 * v, 4 * v, 8 * v, 16 * v],
                  [v, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2 * v]):
            assert t[2] - t[0] == v or t[7] - t[0] == v
            ctxs.append(RequestContext(1_700_000_000.5, "r", 1, "a:1", "h", "GET", "/", 200,
                                       0, 0, "app", "", False, None, "", t))
    payloads = [encoder.encode(c) for c in ctxs]
    assert run_both(payloads) == len(payloads)  # the same as time_batch's search
    ring = Ring.create(1 << 20)  # and as bisect_left's (Histogram.observe)
    raw, fast = rawbatch.RawBatch(), Metrics()
    try:
        for at in range(0, len(payloads), 256):
            for p in payloads[at:at + 256]:
                assert ring.push(p)
            raw.n, tail = ring.drain_spans(raw.starts, raw.ends, 256)
            raw.attach(ring.buffer)
            raw.process(fast, False)
            raw.detach()
            ring.release(tail)
    finally:
        ring.close()
    assert_same(fast, reference_metrics(ctxs))


@pytest.mark.parametrize("fmt,batch", [("json", 64), ("console", 64), ("json", 1024)])
def test_the_collector_hands_raw_batches_to_the_record_sink(tmp_path, fmt, batch):
    """The manager's wiring: Collector + RecordSink over real rings take the raw path,
    and count, log and report decode errors as the decoded path does (at 1,024 a batch's
    JSON lines pass LINES_CHUNK: written in pieces from the output buffer as they come)."""
    rng = random.Random(5)
    rings = {i: Ring.create(1 << 18) for i in range(2)}
    per_ring = [[encoder.encode(hostile_context(rng)) for _ in range(300)] for _ in rings]
    for payloads in per_ring:
        payloads[17:17] = odd_payloads()
    logs = {name: accesslog.AccessLog(str(tmp_path / f"{name}.log"), fmt)
            for name in ("raw", "ref")}
    raw_metrics, ref_metrics = Metrics(), Metrics()
    try:
        col = Collector(rings, RecordSink(raw_metrics, logs["raw"]).on_batch, batch=batch)
        assert col.raw is not None  # compiled: the raw path
        for ring, payloads in zip(rings.values(), per_ring, strict=True):
            for p in payloads:
                assert ring.push(p)
        assert col.drain_all() == sum(map(len, per_ring))
        ref = RecordSink(ref_metrics, logs["ref"])
        items = [r for payloads in per_ring for r in map(safe_decode, payloads) if r]
        for at in range(0, len(items), 64):
            ref.on_batch(items[at:at + 64])
        if batch > 64 and fmt == "json":  # handed over while the batch was processed
            assert logs["raw"].writes > len(rings)
        assert col.decode_errors == sum(safe_decode(p) is None for ps in per_ring for p in ps)
        assert col.records == len(items)
    finally:
        for ring in rings.values():
            ring.close()
        for log in logs.values():
            log.close()
    raw_log, ref_log = ((tmp_path / f"{n}.log").read_bytes() for n in ("raw", "ref"))
    assert raw_log == ref_log and raw_log.count(b"\n") == ref_metrics.records
    assert raw_metrics.render() == ref_metrics.render()


def test_a_batch_that_does_not_describe_its_data_is_refused():
    with pytest.raises(ValueError):
        rawbatch.RawBatch(rawbatch.MAX_RECORDS + 1)
    raw = rawbatch.RawBatch(4)
    raw.n = 1
    with pytest.raises(ValueError):  # no buffer attached
        raw.process(Metrics(), True)
    raw.attach(bytearray(1024))
    raw.n = 5
    with pytest.raises(ValueError):
        raw.process(Metrics(), True)
    raw.n, raw.ends[0], raw.starts[1], raw.ends[1] = 2, 10, 10, 2000
    with pytest.raises(ValueError):
        raw.records()
    raw.starts[1], raw.ends[1] = 10, 5
    with pytest.raises(ValueError):
        raw.trace(None)  # (checked before the tracer is read)
    raw.starts[1], raw.ends[1] = -1, 5
    with pytest.raises(ValueError):
        raw.process(Metrics(), True)


def test_a_batch_of_distinct_labels_fills_every_kind_of_cell():
    """Every record with its own listener, upstream, route, reject reason and gRPC
    status: the most cells a batch can start (rawbatch.CELLS_PER_RECORD each)."""
    rng = random.Random(9)
    ctxs = []
    for i in range(rawbatch.MAX_RECORDS):
        c = random_context(rng)
        c.listener, c.upstream, c.route = f"l{i}", f"u{i}", f"r{i}"
        c.reject, c.retries, c.tunnel, c.grpc_status = f"why{i}", 1 + i, True, i
        c.bytes_in, c.bytes_out, c.reused = 1, 2, i % 2 == 0
        c.times = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7]
        ctxs.append(c)
    assert run_both([encoder.encode(c) for c in ctxs], batch=rawbatch.MAX_RECORDS) == len(ctxs)


def test_labels_in_runs_across_the_forgetting_of_the_names():
    """Runs of records with one listener, upstream and route (each field remembers its
    last name: rawrecord's fp_intern_field), names longer than it keeps, and more
    distinct routes than FP_NAMES_MAX, so the names are forgotten between two batches
    while a run goes on: every count under its own labels."""
    rng = random.Random(12)
    long_name = "L" * 57
    ctxs = []
    for i in range(2 * NAMES_MAX + 4000):  # half of them with a route of its own
        c = random_context(rng)
        run = i // 7
        c.listener = ("a:1", "b:2", long_name, "")[run % 4]
        c.upstream = ("app", "api", "", long_name + "u")[run % 3]
        c.route = f"r{i}" if i % 2 else ("* /api", "")[run % 2]
        ctxs.append(c)
    assert run_both([encoder.encode(c) for c in ctxs], batch=1024) == len(ctxs)


def test_each_escape_and_non_ascii_byte_at_every_offset_of_a_string():
    """The scanner checks strings eight bytes a step (and the tail as a masked word when
    the record has the room): a special byte at each offset of strings of 0-24 bytes, in
    the path and in the last string of the record (tracestate, at the record's end)."""
    rng = random.Random(24)
    specials = ["\x00", "\x1f", '"', "\\", "\x7f", "\u00e9", "!", "#", "[", "]", " ", "~"]
    payloads = []
    non_ascii = 0
    for n in range(25):
        for k in range(n):
            for ch in specials:
                s = "".join(rng.choice("abcXYZ019/-._") for _ in range(n))
                s = s[:k] + ch + s[k + 1:]
                ctx = random_context(rng)
                ctx.path, ctx.tracestate = s, s[::-1]
                payloads.append(encoder.encode(ctx))
                non_ascii += ch == "\u00e9"
        ctx = random_context(rng)
        ctx.path = "p" * n
        payloads.append(encoder.encode(ctx))
    scanned = run_both(payloads, batch=512)
    assert scanned == len(payloads) - non_ascii
