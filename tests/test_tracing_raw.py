"""Spans from the C struct (Tracer.offer_raw: rawbatch.RawBatch.trace and
spanfill.Filler.fill_rec) against the object path (msgspec's decode, Tracer.offer_batch):
the same OTLP bytes for records the scanner takes, the same spans when some take the
object path, and the same counts (sampled, dropped for want of room, queued), over
batches drained from a real ring."""

from __future__ import annotations

import random

import pytest
from test_rawbatch import hostile_context
from test_tracing import decoded_spans, varied_records

from forkproxy.config import TracingConfig
from forkproxy.context import encoder
from forkproxy.manager import rawbatch
from forkproxy.manager.metrics import Metrics
from forkproxy.manager.spanfill import shape_key
from forkproxy.manager.tracing import Tracer
from forkproxy.shm.ring import Ring

pytestmark = pytest.mark.skipif(not rawbatch.COMPILED,
                                reason="the C record path exists only when compiled")

#: an endpoint nothing is sent to (the bodies are taken from the queue)
NOWHERE = "http://127.0.0.1:9/v1/traces"


def export_bodies(payloads: list[bytes], raw: bool, batch: int = 64, passes: int = 1,
                  **cfg) -> tuple:
    """The export requests' bytes and the tracer's counts for ``payloads`` offered in
    collector batches of ``batch``: as RecordSink.on_raw_batch offers them (``raw``), or
    decoded as RecordSink.on_batch does; ``raw`` "process": in RawBatch.process's pass,
    as RecordSink.on_raw_batch does. With ``passes`` 2, the bytes of the second
    pass, when every shape has its template."""
    tracer = Tracer(TracingConfig(endpoint=NOWHERE, **cfg))
    metrics = Metrics()
    ring = Ring.create(1 << 20)
    bodies = []

    def take():
        while tracer.batches:
            body, _ = tracer.batches.popleft()
            bodies.append(bytes(body))
            tracer.encoder.recycle(body)

    try:
        rb = rawbatch.RawBatch(batch)
        for n in range(passes):
            if n == passes - 1:  # the last pass: its bytes
                tracer._encode_pending()
                if tracer.encoder.count:
                    tracer._close_batch()
                take()
                bodies.clear()
            for at in range(0, len(payloads), batch):
                for p in payloads[at:at + batch]:
                    assert ring.push(p)
                rb.n, tail = ring.drain_spans(rb.starts, rb.ends, batch)
                rb.attach(ring.buffer)
                if raw == "process":  # as RecordSink.on_raw_batch: in the metrics pass
                    rb.process(metrics, True, tracer)
                    tracer.offer_raw(rb, traced=True)
                elif raw:
                    tracer.offer_raw(rb)
                else:
                    tracer.offer_batch(rb.records())
                take()
                rb.detach()
                ring.release(tail)
    finally:
        ring.close()
    counts = (tracer.sampled, tracer.dropped_queue, tracer.queued)
    tracer._encode_pending()
    if tracer.encoder.count:
        tracer._close_batch()
    take()
    return bodies, counts, tracer.encoder


def ascii_records(n: int, seed: int, shapes: int) -> list:
    """varied_records with ASCII paths only: every record is the C scanner's."""
    recs = varied_records(n, seed, shapes)
    for i, r in enumerate(recs):
        if not r.path.isascii():
            r.path = f"/p/{i % 40}"
    return recs


@pytest.mark.parametrize("ratio, slower_than, batch_size", [
    (1.0, 0.5, 512), (1.0, 0.5, 100), (0.3, 1.0, 512), (0.0, 0.0, 64), (0.0, 1e9, 512)])
@pytest.mark.parametrize("way", [True, "process"], ids=["trace", "process"])
def test_spans_from_the_c_struct_are_the_object_paths_bytes(ratio, slower_than, batch_size,
                                                            way):
    """2,500 requests of 40 shapes, head sampled or not, the counts the same. The first
    time through (a shape's first MAKE_AFTER requests without a template take the object
    path inside the C loop) the same spans: the object path writes those after the
    templated ones of their batch, the C path in ring order. The second time (every
    shape has its template) the export requests are byte for byte the object path's."""
    recs = ascii_records(2500, seed=int(ratio * 10) + batch_size, shapes=40)
    rng = random.Random(3)
    for r in recs:
        r.trace_flags = rng.choice([0, 0, 1])
    payloads = [encoder.encode(r) for r in recs]
    cfg = dict(sample_ratio=ratio, sample_slower_than=slower_than, batch_size=batch_size,
               queue_size=100_000)
    got, got_counts, enc = export_bodies(payloads, way, **cfg)
    want, want_counts, _ = export_bodies(payloads, False, **cfg)
    assert got_counts == want_counts and got_counts[0] > 0
    assert_same_spans(got, want, got_counts[0])
    assert enc.filler.fast > got_counts[0] // 2  # most came from the C struct
    # the shapes that have a template (some never do: the builder writes those, after
    # the templated ones in the object path)
    templates = enc.templates.templates
    payloads = [p for r, p in zip(recs, payloads, strict=True)
                if templates.get(shape_key(r, r.times))]
    assert len(payloads) > len(recs) // 2
    got, got_counts, _ = export_bodies(payloads, way, passes=2, **cfg)
    want, want_counts, enc = export_bodies(payloads, False, passes=2, **cfg)
    assert got_counts == want_counts
    assert len(got) == len(want) and got == want


def assert_same_spans(got: list[bytes], want: list[bytes], requests: int) -> None:
    """The export requests decode to the same spans (any order)."""
    def spans(bodies):
        out = {}
        for body in bodies:
            out.update(decoded_spans(body)["spans"])
        return out

    g, w = spans(got), spans(want)
    assert set(g) == set(w) and len(g) >= requests
    for span_id, span in w.items():
        assert g[span_id].ListFields() == span.ListFields()


def test_a_full_queue_drops_the_same_requests():
    payloads = [encoder.encode(r) for r in ascii_records(1000, seed=7, shapes=5)]
    cfg = dict(sample_ratio=1.0, batch_size=50, queue_size=300)
    got, got_counts, _ = export_bodies(payloads, "process", **cfg)
    want, want_counts, _ = export_bodies(payloads, False, **cfg)
    assert got_counts == want_counts == (1000, 700, 300)
    assert_same_spans(got, want, 300)


def test_records_the_scanner_leaves_give_the_same_spans():
    """Hostile records (non-ASCII strings, odd ids and numbers: decoded and offered as
    objects) mixed with ordinary ones: the same spans, in another order."""
    rng = random.Random(11)
    recs = varied_records(1500, seed=4, shapes=20)
    for i in range(0, len(recs), 5):
        recs[i] = hostile_context(rng)
        recs[i].trace_id = rng.choice([rng.randbytes(16), b"short", b""])
        recs[i].span_id = rng.randbytes(8)
        recs[i].ts = 1.7e9 + i  # (times out of protobuf's range: see below)
        recs[i].times = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7][:rng.choice([6, 8])]
    payloads = [encoder.encode(r) for r in recs]
    for ratio, way in ((1.0, True), (0.2, True), (1.0, "process")):
        cfg = dict(sample_ratio=ratio, batch_size=256, queue_size=100_000)
        got, got_counts, _ = export_bodies(payloads, way, **cfg)
        want, want_counts, _ = export_bodies(payloads, False, **cfg)
        assert got_counts == want_counts and got_counts[0] > 1000 * ratio
        assert_same_spans(got, want, got_counts[0])


def test_a_request_whose_spans_cannot_be_written_is_lost_alone():
    """A sampled record the C fill leaves to the builder, with times protobuf cannot
    hold: that request is counted as an export failure; the batch's others are written."""
    recs = ascii_records(40, seed=2, shapes=1)
    recs[7].ts = 1e12  # ~1e21 ns: not a fixed64
    payloads = [encoder.encode(r) for r in recs]
    bodies, counts, _ = export_bodies(payloads, "process", sample_ratio=1.0)
    assert counts == (40, 0, 39)
    spans = {}
    for body in bodies:
        spans.update(decoded_spans(body)["spans"])
    assert len({s.trace_id for s in spans.values()}) == 39
