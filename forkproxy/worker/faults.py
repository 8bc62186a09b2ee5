"""Fault injection for tests: the one hook, read once from ``FORKPROXY_FAULT``.

Production code never patches itself; it asks this module at the few places a fault
can be injected. Values:

- ``startup``: a worker crashes during start-up (the master's back-off is tested);
- ``request``: a request whose path starts with ``/__fault__`` raises inside the
  worker, the way a bug would (``/__fault__/after-head`` raises once a partial response
  went out), so the fault handling (log, 500, the worker keeps serving) is tested;
  ``/__fault__/grow-rss/N`` does not raise: the worker keeps N more MiB, resident, and
  the request goes on as usual (the master's ``max_worker_rss`` replacement is tested);
- ``manager-startup``: read by the manager (forkproxy/manager/process.py).
"""

from __future__ import annotations

import os

FAULT = os.environ.get("FORKPROXY_FAULT", "")
#: a worker crashes during start-up
STARTUP = FAULT == "startup"
#: requests under /__fault__ raise (checked once per request: one global load)
REQUEST = FAULT == "request"


#: what /__fault__/grow-rss/N requests made the worker keep
_LEAKED: list[bytes] = []


def request_fault(front, req) -> None:
    """Raise like a bug would, for a request under /__fault__ (only with REQUEST)."""
    if not req.path.startswith(b"/__fault__"):
        return
    if req.path.startswith(b"/__fault__/grow-rss/"):
        # a leak, written page by page so that it is resident
        _LEAKED.append(b"\x01" * (int(req.path.rsplit(b"/", 1)[1]) << 20))
        return
    if req.path.startswith(b"/__fault__/after-head"):
        front.resp_started = True
        front.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    raise RuntimeError("fault injected: FORKPROXY_FAULT=request")
