"""Which requests' spans are exported: the head and tail sampling rules over a batch of
ring records, in one compiled loop (Cython compiles this file with sampling.pxd's C types:
setup.py COMPILED; as plain Python it does the same).

* head: a request whose traceparent came sampled is kept; otherwise the trace id decides
  with the ratio's threshold (tracecontext.sampled_by_ratio: the same rule the worker
  used to set the sampled flag of a trace it started, so both agree);
* tail: errors (5xx, or an error such as an upstream reset or the client gone) and
  requests slower than ``slower_than`` seconds are always kept.

Kept records go to the export queue while it has room; the others are counted as dropped.
"""

from __future__ import annotations

from forkproxy.context import T_ACCEPT, T_END, T_HEADERS, RequestContext
from forkproxy.http.tracecontext import SAMPLED

#: a threshold at or above this keeps every trace id (a ratio of 1)
ALL = 1 << 64


def _id_low_u64(trace_id):
    """The low 8 bytes of a 16-byte trace id, big-endian (sampling.pxd has it in C)."""
    return int.from_bytes(trace_id[8:], "big")


# compiled, these names are the C functions of sampling.pxd and recordslots.pxd (a field
# read at its offset in the record; here getattr and the field's name): gevent's way of
# giving pure-Python mode a fallback for C code
locals().update(fp_id_low_u64=_id_low_u64, fp_member=getattr,
                fp_member_offset=lambda descr: descr.__name__)

#: where the fields the rules read are in a RequestContext (fp_member(rec, O_STATUS) is
#: rec.status)
O_TRACE_ID, O_TRACE_FLAGS, O_STATUS, O_ERROR, O_TIMES = [
    fp_member_offset(RequestContext.__dict__[name])  # noqa: F821
    for name in ("trace_id", "trace_flags", "status", "error", "times")]
#: the times the slow rule reads (C integers when compiled)
I_ACCEPT, I_HEADERS, I_END = T_ACCEPT, T_HEADERS, T_END


def sample_batch(items, queue, room, threshold, slower_than):
    """Appends the records of ``items`` a rule keeps to ``queue`` (``room`` of them at
    most); returns (kept by a rule, dropped for want of room).

    Compiled, a record that no rule keeps costs a few C loads and compares: its fields
    are read at their offsets, its times as C doubles (this runs for every request
    whatever the ratio, so it is most of what tracing at a low ratio costs)."""
    everything = threshold >= ALL
    below = 0 if everything else threshold
    sampled = dropped = 0
    m = fp_member  # noqa: F821
    for rec in items:
        if type(rec) is not RequestContext:
            continue
        trace_id = m(rec, O_TRACE_ID)
        if not trace_id:
            continue
        # head: the sampled flag, the ratio on the id's low 8 bytes
        keep = everything
        if not keep:
            flags = m(rec, O_TRACE_FLAGS)
            keep = flags & SAMPLED
        if not keep:
            if len(trace_id) == 16:
                keep = fp_id_low_u64(trace_id) < below  # noqa: F821
            else:  # never from a worker
                keep = int.from_bytes(trace_id[8:], "big") < threshold
        # tail: errors, and requests slower than slower_than
        if not keep:
            status = m(rec, O_STATUS)
            error = m(rec, O_ERROR)
            keep = status >= 500 or len(error) != 0
        if not keep:
            t = m(rec, O_TIMES)
            if len(t) > I_END:
                start = t[I_ACCEPT]
                if start == 0:
                    start = t[I_HEADERS]
                end = t[I_END]
                keep = start != 0 and end - start > slower_than
        if not keep:
            continue
        sampled += 1
        if room <= 0:
            dropped += 1
            continue
        queue.append(rec)
        room -= 1
    return sampled, dropped


class TraceState:
    """A Tracer's rules and queue counts where the compiled record path reads and counts
    them (rawspans.RawTrace, once per batch of ring records): C fields when compiled, so
    a batch's start and end touch no Python object. In a running manager each 10 ms
    batch found the Tracer's attributes out of the caches (the worker ran on the same
    CPU meanwhile): ~12 look-ups per batch were ~0.1-0.3 µs per request at 2-5k
    requests/s (docs/BENCHMARKS.md, "Tracing cost in the manager", round 5).

    ``queued``: sampled requests not yet sent; ``sampled``, ``dropped``: kept by a
    rule, and of those dropped for want of room (``queue_size``). ``enc``, ``filler``:
    the tracer's spans.SpanEncoder and its compiled fill (None: none)."""

    def __init__(self):
        self.everything = False
        self.below = 0
        self.slower_than = 0.0
        self.size = 1
        self.queue_size = 1
        self.queued = 0
        self.sampled = 0
        self.dropped = 0
        self.enc = None
        self.filler = None

    def set_rules(self, threshold, slower_than, size, queue_size):
        """sample_batch's rules (a ratio's threshold, the slow rule in seconds), the
        requests per export request and the queue's bound."""
        self.everything = threshold >= ALL
        self.below = 0 if self.everything else threshold
        self.slower_than = slower_than
        self.size = size
        self.queue_size = queue_size
