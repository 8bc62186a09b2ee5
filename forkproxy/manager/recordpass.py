"""The metrics' two passes over a batch of request contexts: the counters, then every
record's timings into the duration, phase and critical-path histograms.

The manager's cost per record is mostly these passes and the access log's line
(jsonline.py), so they are compiled (setup.py's COMPILED; recordpass.pxd gives the C
types: the timestamps and sums are C doubles, the histograms' buckets found by a binary
search over C arrays of the bounds instead of ``bisect_left`` on a tuple). As plain
Python (FORKPROXY_PURE_PYTHON=1, or no compiler) the same loops run with ``bisect_left``.
Both give the same buckets and the same sums, added in the same order:
tests/test_manager_aggregation.py compares the exposition with a per-record reference
at every bucket bound. Measured in docs/BENCHMARKS.md, "The manager's record path".
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from types import FunctionType

from forkproxy.context import N_TIMES, PHASES, T_CONNECTED, T_TLS, padded_times
from forkproxy.manager.histogram import (
    DURATION_BUCKETS,
    FINE_BUCKETS,
    FINE_TO_PHASE,
    Histogram,
    PhaseGroup,
)

#: the bounds as C doubles (typed in recordpass.pxd) for the compiled search
_FINE = array("d", FINE_BUCKETS)
_DURATION = array("d", DURATION_BUCKETS)
_N_FINE = len(FINE_BUCKETS)
_N_DURATION = len(DURATION_BUCKETS)
_F2P = array("l", FINE_TO_PHASE)


def _compiled_probe():
    """A function to look at: Cython's functions are not Python functions."""


#: True when this module runs compiled: the loops then search the C arrays
COMPILED = not isinstance(_compiled_probe, FunctionType)


def _fine_bucket(v):
    """``bisect_left(FINE_BUCKETS, v)`` over C doubles (compiled only: as Python it would
    be slower than bisect)."""
    lo = 0
    hi = _N_FINE
    while lo < hi:
        mid = (lo + hi) >> 1
        if _FINE[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _duration_bucket(v):
    """``bisect_left(DURATION_BUCKETS, v)`` over C doubles (compiled only)."""
    lo = 0
    hi = _N_DURATION
    while lo < hi:
        mid = (lo + hi) >> 1
        if _DURATION[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


def count_batch(m, reqs):
    """The counters of a batch of request contexts, into Metrics ``m``."""
    m.records += len(reqs)
    requests, tls, reuse = m.requests, m.tls, m.reuse
    bytes_in, bytes_out = m.bytes_in, m.bytes_out
    for ctx in reqs:
        listener = ctx.listener
        upstream = ctx.upstream
        key = (listener, upstream, ctx.status)
        requests[key] = requests.get(key, 0) + 1
        t = ctx.times
        if len(t) != N_TIMES:
            t = padded_times(t)
        if t[T_TLS]:  # the first request of a TLS connection carries its handshake
            resumed = bool(ctx.tls_resumed)
            tls[resumed] = tls.get(resumed, 0) + 1
        if upstream and t[T_CONNECTED]:
            rkey = (upstream, ctx.reused)
            reuse[rkey] = reuse.get(rkey, 0) + 1
        n = ctx.bytes_in
        if n:
            bytes_in[listener] = bytes_in.get(listener, 0) + n
        n = ctx.bytes_out
        if n:
            bytes_out[listener] = bytes_out.get(listener, 0) + n
        if ctx.reject or ctx.retries or ctx.tunnel or ctx.error or ctx.grpc_status is not None:
            m.count_rare(ctx)


def time_batch(m, reqs):
    """Duration and phase histograms, and the critical-path report's (per route and
    upstream, FINE_BUCKETS, sums of squares), of a batch: one walk over each record's
    timestamps, one search per phase (:data:`FINE_TO_PHASE` gives the phase bucket).

    Written out: a loop over (name, index, index, histogram) tuples cost ~0.3 µs more
    per record, a call per update ~0.8 µs, and two walks (this one and the report's)
    ~0.5 µs (tests/test_layout.py). Phase sums are kept in locals, continuing from
    the histograms' own: the same additions in the same order. Conditions as in
    metrics.phases; a pooled connection's wait for the pool is no connect. The
    report's request runs from the accept (``ta or th``), the duration from the
    complete head (``th or ta``).
    """
    durations, groups = m.durations, m.groups
    compiled = COMPILED
    db, fb, f2p = DURATION_BUCKETS, FINE_BUCKETS, _F2P if compiled else FINE_TO_PHASE
    ph = m.phases
    c_hdr, c_tls, c_conn, c_send, c_fb, c_body = [ph[name].buckets for name in PHASES]
    s_hdr, s_tls, s_conn, s_send, s_fb, s_body = [ph[name].sum for name in PHASES]
    for ctx in reqs:
        t = ctx.times
        ta, tt, th, tcs, tc, tsent, tfb, te = t if len(t) == N_TIMES else padded_times(t)
        upstream = ctx.upstream
        g = groups.get((ctx.route, upstream))
        if g is None:
            g = groups[(ctx.route, upstream)] = PhaseGroup()
        if te:
            start = th or ta
            if start and te >= start:  # not for a 400 answered before any timestamp
                h = durations.get((ctx.listener, upstream))
                if h is None:
                    h = durations[(ctx.listener, upstream)] = Histogram(db)
                v = te - start
                i = _duration_bucket(v) if compiled else bisect_left(db, v)
                h.buckets[i] += 1
                h.sum += v
            start = ta or th
            if start and te >= start:
                h, v = g.total, te - start
                i = _fine_bucket(v) if compiled else bisect_left(fb, v)
                h.buckets[i] += 1
                h.sum += v
                h.sumsq += v * v
        if ta:
            if th and th >= ta:
                h, v = g.hdr, th - ta
                i = _fine_bucket(v) if compiled else bisect_left(fb, v)
                c_hdr[f2p[i]] += 1
                s_hdr += v
                h.buckets[i] += 1
                h.sum += v
                h.sumsq += v * v
            if tt and tt >= ta:
                h, v = g.tls, tt - ta
                i = _fine_bucket(v) if compiled else bisect_left(fb, v)
                c_tls[f2p[i]] += 1
                s_tls += v
                h.buckets[i] += 1
                h.sum += v
                h.sumsq += v * v
        if tcs and tc and tc >= tcs and not ctx.reused:
            h, v = g.conn, tc - tcs
            i = _fine_bucket(v) if compiled else bisect_left(fb, v)
            c_conn[f2p[i]] += 1
            s_conn += v
            h.buckets[i] += 1
            h.sum += v
            h.sumsq += v * v
        if tc and tsent and tsent >= tc:
            h, v = g.send, tsent - tc
            i = _fine_bucket(v) if compiled else bisect_left(fb, v)
            c_send[f2p[i]] += 1
            s_send += v
            h.buckets[i] += 1
            h.sum += v
            h.sumsq += v * v
        if tsent and tfb and tfb >= tsent:
            h, v = g.fb, tfb - tsent
            i = _fine_bucket(v) if compiled else bisect_left(fb, v)
            c_fb[f2p[i]] += 1
            s_fb += v
            h.buckets[i] += 1
            h.sum += v
            h.sumsq += v * v
        if tfb and te and te >= tfb:
            h, v = g.body, te - tfb
            i = _fine_bucket(v) if compiled else bisect_left(fb, v)
            c_body[f2p[i]] += 1
            s_body += v
            h.buckets[i] += 1
            h.sum += v
            h.sumsq += v * v
    for name, s in zip(PHASES, (s_hdr, s_tls, s_conn, s_send, s_fb, s_body), strict=True):
        ph[name].sum = s
