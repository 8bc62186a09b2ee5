"""[server] max_worker_rss: a worker whose memory grows past it is replaced gracefully (a
new worker first, then the old one drains and exits), counted in
forkproxy_worker_recycles_total{reason="rss"}. The growth comes from the worker's fault
hook (FORKPROXY_FAULT=request, GET /__fault__/grow-rss/MIB)."""

from __future__ import annotations

import re
import urllib.request

from fp import alive, connect, recv_response, request, rss_kib, wait_for


def recycles(proxy, reason: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf'^forkproxy_worker_recycles_total{{reason="{reason}"}} (\d+)$', text, re.M)
    assert m, text
    return int(m.group(1))


def test_worker_above_max_rss_is_replaced_after_draining(proxies, origin, tmp_path,
                                                          monkeypatch):
    monkeypatch.setenv("FORKPROXY_FAULT", "request")
    p = proxies(tmp_path, origin.address, workers=1, admin=True,
                server_extra='max_worker_rss = "128m"')
    [old] = p.workers_pids()
    assert rss_kib(old) < 100 * 1024  # below the limit at rest: nothing happens
    assert recycles(p, "rss") == 0

    status, _, _ = request(p.port, "GET", "/__fault__/grow-rss/160")
    assert status == 404  # the hook grew the worker, then the origin answered
    assert rss_kib(old) > 128 * 1024
    # a slow request in flight on the old worker must finish while it drains
    slow = connect(p.port)
    slow.sendall(b"GET /sleep/3000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    both = wait_for(lambda: len(p.workers_pids()) == 2 and p.workers_pids(), timeout=20,
                    what="a replacement started before the old worker leaves")
    [new] = [pid for pid in both if pid != old]
    status, _, body, _ = recv_response(slow)
    slow.close()
    assert (status, body) == (200, b"slept\n")
    wait_for(lambda: not alive(old), timeout=20, what="the old worker to exit")
    assert p.workers_pids() == [new]
    assert request(p.port, "GET", "/tiny")[0] == 200
    wait_for(lambda: recycles(p, "rss") == 1, timeout=10, what="the recycle counted")
    events = [e for e in p.log_events() if e.get("pid") == old]
    names = [e["event"] for e in events]
    above = names.index("worker above max_worker_rss, replacing it")
    replaced = names.index("worker replaced for its memory, old one draining")
    assert above < replaced
    assert events[replaced]["replacement"] == new
    # the replacement is below the limit: no further recycle
    assert rss_kib(new) < 100 * 1024
    assert recycles(p, "rss") == 1
    assert alive(new)
