"""The manager's batched record path against straightforward per-record references:
histogram bucket indexing at every bound, the phases, the access log line, and shards'
counters added up (issue 16: a cheaper consumer must count exactly what the old one did)."""

from __future__ import annotations

import math
import random

import msgspec
import pytest

from forkproxy.context import N_TIMES, PHASES, RequestContext, WorkerGauges
from forkproxy.manager import accesslog
from forkproxy.manager.jsonline import json_batch
from forkproxy.manager.metrics import (
    DURATION_BUCKETS,
    FINE_BUCKETS,
    PHASE_BUCKETS,
    Histogram,
    Metrics,
    MetricsState,
    PhaseGroup,
    phases,
    phases_ms,
    request_duration,
)


def linear_bucket(bounds, v: float) -> int:
    """Prometheus "le": the first bound >= v, else +Inf (the old search, written out)."""
    for i, bound in enumerate(bounds):
        if v <= bound:
            return i
    return len(bounds)


def edge_values(bounds) -> list[float]:
    out = [0.0, 1e-12, 1e9, math.inf]
    for b in bounds:
        out += [b, math.nextafter(b, 0.0), math.nextafter(b, math.inf), b * 0.999, b * 1.001]
    return out


def random_times(rng: random.Random) -> list[float]:
    """Timestamps with the holes and oddities records have: absent (0.0) phases, equal
    stamps, a clock that went backwards between two of them, values on bucket bounds."""
    t0 = rng.uniform(1.0, 1e6)
    t = [0.0] * N_TIMES
    at = t0
    for i in range(N_TIMES):
        r = rng.random()
        if r < 0.2:
            continue  # did not happen
        if r < 0.25:
            step = -rng.uniform(0, 0.01)  # backwards
        elif r < 0.3:
            step = 0.0
        elif r < 0.45:
            step = rng.choice(PHASE_BUCKETS + DURATION_BUCKETS + FINE_BUCKETS)
        else:
            step = rng.lognormvariate(-8, 2.5)
        at += step
        t[i] = at
    return t


def random_context(rng: random.Random) -> RequestContext:
    tls = rng.random() < 0.3
    return RequestContext(
        1_700_000_000 + rng.random() * 1e5, f"r{rng.getrandbits(40):x}", rng.choice([1, 2, 3]),
        rng.choice(["a:1", "b:2"]), "127.0.0.1", rng.choice(["GET", "POST"]),
        rng.choice(["/", "/x?y=1", '/"q"']), rng.choice([200, 404, 502, 400]),
        rng.choice([0, 0, 17]), rng.choice([0, 1234]), rng.choice(["", "app", "api"]),
        "10.0.0.1:80", rng.random() < 0.7, (rng.random() < 0.5) if tls else None,
        "TLSv1.3" if tls else "", random_times(rng), rng.choice(["", "", "boom"]),
        rng.choice(["", "", "", "framing"]), rng.choice([0, 0, 0, 2]), rng.random() < 0.05,
        route=rng.choice(["", "* /api", "example.com /"]))


def reference_metrics(ctxs: list[RequestContext]) -> Metrics:
    """What Metrics counted before the batched path: one record at a time, histograms by
    Histogram.observe, phases from the generic phases()."""
    m = Metrics()
    for ctx in ctxs:
        m.records += 1
        key = (ctx.listener, ctx.upstream, ctx.status)
        m.requests[key] = m.requests.get(key, 0) + 1
        t = ctx.times
        end, start = t[7], t[2] or t[0]
        if end and start and end >= start:
            h = m.durations.setdefault((ctx.listener, ctx.upstream),
                                       Histogram(DURATION_BUCKETS))
            h.observe(end - start)
        for name, v in phases(ctx).items():
            if not (name == "upstream_connect" and ctx.reused):
                m.phases[name].observe(v)
        if t[1]:
            m.tls[bool(ctx.tls_resumed)] = m.tls.get(bool(ctx.tls_resumed), 0) + 1
        if ctx.upstream and t[4]:
            k = (ctx.upstream, ctx.reused)
            m.reuse[k] = m.reuse.get(k, 0) + 1
        for d, n in ((m.bytes_in, ctx.bytes_in), (m.bytes_out, ctx.bytes_out)):
            if n:
                d[ctx.listener] = d.get(ctx.listener, 0) + n
        if ctx.reject:
            m.rejected[ctx.reject] = m.rejected.get(ctx.reject, 0) + 1
        if ctx.retries:
            m.retries[ctx.upstream] = m.retries.get(ctx.upstream, 0) + ctx.retries
        if ctx.tunnel:
            m.tunnels[ctx.upstream] = m.tunnels.get(ctx.upstream, 0) + 1
        g = m.groups.setdefault((ctx.route, ctx.upstream), PhaseGroup())
        start = t[0] or t[2]
        if end and start and end >= start:
            g.total.observe(end - start)
        for name, v in phases(ctx).items():
            if not (name == "upstream_connect" and ctx.reused):
                g.phases[name].observe(v)
    return m


def assert_same(a: Metrics, b: Metrics) -> None:
    for attr in ("requests", "tls", "reuse", "bytes_in", "bytes_out", "rejected", "retries",
                 "tunnels", "records", "gauge_records", "gauges"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert a.durations.keys() == b.durations.keys()
    for key, h in a.durations.items():
        assert h.counts == b.durations[key].counts, key
        assert h.sum == pytest.approx(b.durations[key].sum, rel=1e-12)
    for name in PHASES:
        assert a.phases[name].counts == b.phases[name].counts, name
        assert a.phases[name].sum == pytest.approx(b.phases[name].sum, rel=1e-12)
    # the critical-path report's histograms (sums: shards add theirs in another order)
    assert a.groups.keys() == b.groups.keys()
    for key, g in a.groups.items():
        for (counts, total, sumsq), (ref_counts, ref_total, ref_sumsq) in zip(
                g.state(), b.groups[key].state(), strict=True):
            assert counts == ref_counts, key
            assert total == pytest.approx(ref_total, rel=1e-12)
            assert sumsq == pytest.approx(ref_sumsq, rel=1e-12)


@pytest.mark.parametrize("bounds", [DURATION_BUCKETS, PHASE_BUCKETS, FINE_BUCKETS])
def test_bucket_index_equals_the_linear_search_at_every_edge(bounds):
    for v in edge_values(bounds):
        h = Histogram(bounds)
        h.observe(v)
        assert h.counts.index(1) == linear_bucket(bounds, v), v
    # the batched path: each value as a phase of its own request (pooled: no connect);
    # the phase bucket comes from the fine one, so both sets of edges are tried
    for v in edge_values(PHASE_BUCKETS) + edge_values(FINE_BUCKETS):
        t = [0.0] * N_TIMES
        t[0], t[2] = 10.0, 10.0 + v  # accept_to_headers == v (up to float rounding)
        ctx = RequestContext(0.0, "r", 1, "l", "", "GET", "/", 200, 0, 0, "", "", True, None,
                             "", t)
        m = Metrics()
        m.observe_batch([ctx])
        got = m.phases["accept_to_headers"].counts.index(1)
        assert got == linear_bucket(PHASE_BUCKETS, t[2] - t[0]), v
        (group,) = m.groups.values()
        assert group.hdr.counts.index(1) == linear_bucket(FINE_BUCKETS, t[2] - t[0]), v
    # the batched durations: the whole request (from its complete head) is the value
    for v in edge_values(DURATION_BUCKETS) + edge_values(FINE_BUCKETS):
        t = [0.0] * N_TIMES
        t[2], t[7] = 10.0, 10.0 + v
        ctx = RequestContext(0.0, "r", 1, "l", "", "GET", "/", 200, 0, 0, "", "", True, None,
                             "", t)
        m = Metrics()
        m.observe_batch([ctx])
        (h,) = m.durations.values()
        assert h.counts.index(1) == linear_bucket(DURATION_BUCKETS, t[7] - t[2]), v
        (group,) = m.groups.values()
        assert group.total.counts.index(1) == linear_bucket(FINE_BUCKETS, t[7] - t[2]), v


def test_batched_metrics_equal_the_per_record_reference():
    rng = random.Random(16)
    ctxs = [random_context(rng) for _ in range(3000)]
    gauges = [WorkerGauges(w, 1.0, 5, 2, []) for w in (1, 2)]
    batched = Metrics()
    for i in range(0, len(ctxs), 700):  # several batches, one with gauges in the middle
        batched.observe_batch([*ctxs[i:i + 350], *gauges, *ctxs[i + 350:i + 700]])
    ref = reference_metrics(ctxs)
    for g in gauges:
        ref.gauge_records += 5
        ref.gauges[g.worker] = g
    assert_same(batched, ref)
    one_by_one = Metrics()
    for ctx in ctxs:
        one_by_one.observe(ctx)
    assert_same(one_by_one, reference_metrics(ctxs))
    assert batched.render() == ref.render()  # the exposition, to the last digit of each sum


def test_phases_ms_and_the_json_line_equal_the_generic_versions():
    rng = random.Random(7)
    gauges = WorkerGauges(1, 1.0, 5, 2, [])  # not a request: no line
    for _ in range(3000):
        ctx = random_context(rng)
        ms = phases_ms(ctx)
        ref = {name: int(v * 1e6 + 0.5) / 1000 for name, v in phases(ctx).items()}
        assert ms == ref and list(ms) == list(ref)  # same keys in the same order
        line = msgspec.json.decode(accesslog.json_line(ctx, ms))
        sec = int(ctx.ts)
        assert line["ts"] == accesslog._Clock().iso(ctx.ts)
        assert line["ts"].endswith(f".{int((ctx.ts - sec) * 1000):03d}Z")
        assert line["duration_ms"] == int(request_duration(ctx) * 1e6 + 0.5) / 1000
        assert line["phases"] == ms and line["request_id"] == ctx.request_id
        # the access log's batch path makes the same bytes (jsonline.json_batch)
        assert json_batch([ctx, gauges]) == (accesslog.json_line(ctx, ms), 1)


def test_shards_counters_add_up_to_the_per_record_sum():
    rng = random.Random(3)
    ctxs = [random_context(rng) for _ in range(2000)]
    shards = [Metrics() for _ in range(3)]
    for i, ctx in enumerate(ctxs):
        shards[i % 3].observe_batch([ctx])
    shards[1].observe_gauges(WorkerGauges(7, 1.0, 3, 1, []))
    total = Metrics()
    for shard in shards:  # through msgpack, as over the socketpair
        total.add(msgspec.msgpack.decode(msgspec.msgpack.encode(shard.state()),
                                         type=MetricsState))
    ref = reference_metrics(ctxs)
    ref.gauge_records = 1
    ref.gauges = {7: WorkerGauges(7, 1.0, 3, 1, [])}
    assert_same(total, ref)
    assert sum(total.requests.values()) == len(ctxs)


def test_histogram_add_refuses_other_buckets():
    h = Histogram(PHASE_BUCKETS)
    with pytest.raises(ValueError):
        h.add([1] * (len(DURATION_BUCKETS) + 1), 1.0)
