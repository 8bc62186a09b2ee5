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


# compiled, the name is sampling.pxd's C function (gevent's way of giving pure-Python
# mode a fallback for C code)
locals().update(fp_id_low_u64=_id_low_u64)


def sample_batch(items, queue, room, threshold, slower_than):
    """Appends the records of ``items`` a rule keeps to ``queue`` (``room`` of them at
    most); returns (kept by a rule, dropped for want of room)."""
    everything = threshold >= ALL
    below = 0 if everything else threshold
    sampled = dropped = 0
    for rec in items:
        if type(rec) is not RequestContext:
            continue
        trace_id = rec.trace_id
        if not trace_id:
            continue
        # head: the sampled flag, the ratio on the id's low 8 bytes
        keep = everything or rec.trace_flags & SAMPLED
        if not keep:
            if len(trace_id) == 16:
                keep = fp_id_low_u64(trace_id) < below  # noqa: F821
            else:  # never from a worker
                keep = int.from_bytes(trace_id[8:], "big") < threshold
        # tail: errors, and requests slower than slower_than
        if not keep and (rec.status >= 500 or rec.error):
            keep = True
        if not keep:
            t = rec.times
            if len(t) > T_END:
                start = t[T_ACCEPT]
                if start == 0:
                    start = t[T_HEADERS]
                keep = start != 0 and t[T_END] - start > slower_than
        if not keep:
            continue
        sampled += 1
        if room <= 0:
            dropped += 1
            continue
        queue.append(rec)
        room -= 1
    return sampled, dropped
