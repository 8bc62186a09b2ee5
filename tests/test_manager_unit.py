"""Issue 4, manager side without a proxy: metrics exposition (parsed with prometheus_client),
histogram math, access log formats and file handling, the collector over real rings, the
admin request logic, and the worker debug hook between two real sibling processes."""

from __future__ import annotations

import json
import math
import os
import signal
import time

import gevent
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from forkproxy import log as log_mod
from forkproxy.context import (
    N_TIMES,
    T_ACCEPT,
    T_CONNECT_START,
    T_CONNECTED,
    T_END,
    T_FIRST_BYTE,
    T_HEADERS,
    T_SENT,
    T_TLS,
    RequestContext,
    UpstreamGauge,
    WorkerGauges,
    decoder,
    encoder,
    phase_durations,
)
from forkproxy.manager import accesslog, profiling
from forkproxy.manager.accesslog import AccessLog, console_line, json_line
from forkproxy.manager.admin import Admin
from forkproxy.manager.collector import (
    COALESCE,
    COALESCE_MAX,
    WAIT_LIVE,
    Collector,
    coalesce_pause,
)
from forkproxy.manager.metrics import (
    DURATION_BUCKETS,
    PHASE_BUCKETS,
    Histogram,
    Metrics,
    Sample,
    phases,
    phases_ms,
    request_duration,
    tcp_states,
)
from forkproxy.manager.status import admin_target, render
from forkproxy.shm.ring import Ring
from forkproxy.shm.table import WorkerTable
from forkproxy.worker import profiling as worker_profiling


def ctx(rid="r1", status=200, upstream="app", listener="127.0.0.1:8080", reused=False,
        tls=None, t0=1000.0, headers=0.001, tls_at=0.0, connect=0.0005, send=0.0001,
        first_byte=0.2, body=0.003, bytes_out=1234, bytes_in=0, path="/x", error="",
        worker=4242) -> RequestContext:
    """A synthetic request context with the given phase durations (seconds)."""
    t = [0.0] * N_TIMES
    t[T_ACCEPT] = t0
    if tls_at:
        t[T_TLS] = t0 + tls_at
    t[T_HEADERS] = t0 + headers
    if upstream:
        t[T_CONNECT_START] = t[T_HEADERS]
        t[T_CONNECTED] = t[T_CONNECT_START] + connect
        t[T_SENT] = t[T_CONNECTED] + send
        t[T_FIRST_BYTE] = t[T_SENT] + first_byte
        t[T_END] = t[T_FIRST_BYTE] + body
    else:
        t[T_END] = t[T_HEADERS] + body
    return RequestContext(1_700_000_000.123456, rid, worker, listener, "127.0.0.1", "GET", path,
                          status, bytes_in, bytes_out, upstream,
                          "127.0.0.1:9000" if upstream else "", reused, tls,
                          "TLSv1.3" if tls is not None else "", t, error)


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams, family: str, sample_name: str, **labels) -> float:
    total = 0.0
    found = False
    for s in fams[family].samples:
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
            found = True
    assert found, f"no sample {sample_name}{labels}"
    return total


# -- histogram math ---------------------------------------------------------------------


def test_histogram_buckets_are_le_and_cumulative():
    h = Histogram((0.1, 0.5, 1.0))
    for v in (0.05, 0.1, 0.1000001, 0.5, 0.7, 1.0, 3.0):
        h.observe(v)
    assert h.cumulative() == [(0.1, 2), (0.5, 4), (1.0, 6), (math.inf, 7)]
    assert h.count == 7
    assert h.sum == pytest.approx(0.05 + 0.1 + 0.1000001 + 0.5 + 0.7 + 1.0 + 3.0)


def test_histogram_quantile_interpolates_like_promql():
    h = Histogram((1.0, 2.0, 4.0))
    for _ in range(10):
        h.observe(0.5)  # bucket (0, 1]
    for _ in range(10):
        h.observe(3.0)  # bucket (2, 4]
    assert h.quantile(0.5) == pytest.approx(1.0)
    assert h.quantile(0.75) == pytest.approx(3.0)
    assert h.quantile(0.25) == pytest.approx(0.5)
    h.observe(100.0)  # +Inf bucket: the estimate is the highest finite bound
    assert h.quantile(1.0) == 4.0
    assert math.isnan(Histogram((1.0,)).quantile(0.5))


def test_request_duration_and_phases_from_timestamps():
    c = ctx(headers=0.002, connect=0.001, send=0.0005, first_byte=0.2, body=0.01, tls_at=0.0015)
    assert request_duration(c) == pytest.approx(0.001 + 0.0005 + 0.2 + 0.01)
    ph = phases(c)
    assert ph == pytest.approx(phase_durations(c))
    assert ph["tls_handshake"] == pytest.approx(0.0015)
    assert ph["accept_to_headers"] == pytest.approx(0.002)
    assert ph["upstream_connect"] == pytest.approx(0.001)
    assert ph["request_send"] == pytest.approx(0.0005)
    assert ph["upstream_first_byte"] == pytest.approx(0.2)
    assert ph["response_body"] == pytest.approx(0.01)
    ms: dict = {}
    Metrics().observe(c, ms)  # the access log's phases come from the same pass
    assert ms == phases_ms(c)
    assert ms["accept_to_headers"] == 2.0 and ms["upstream_first_byte"] == 200.0
    # a 400 before any timestamp was taken: no phases, zero duration
    bad = RequestContext(1.0, "x", 1, "l", "r", "GET", "/", 400, 0, 0, "", "", False, None, "",
                         [0.0] * N_TIMES)
    assert phases(bad) == {}
    assert request_duration(bad) == 0.0
    m = Metrics()
    m.observe(bad)  # counted, but no zero in the duration histogram
    assert m.requests == {("l", "", 400): 1} and m.durations == {}


# -- exposition -------------------------------------------------------------------------


def test_exposition_parses_and_counts():
    m = Metrics()
    for i in range(7):
        c = ctx(rid=f"a{i}", first_byte=0.2, reused=i > 0)
        m.observe(c)
    for i in range(3):
        c = ctx(rid=f"b{i}", status=502, first_byte=0.001, error="upstream connect: refused")
        m.observe(c)
    c = ctx(rid="t1", tls=True, tls_at=0.002, listener="127.0.0.1:8443")
    m.observe(c)
    c = ctx(rid="t2", tls=False, tls_at=0.004, listener="127.0.0.1:8443")
    m.observe(c)
    c = ctx(rid="t3", tls=True, listener="127.0.0.1:8443")  # 2nd request on a TLS connection
    m.observe(c)
    m.observe_gauges(WorkerGauges(4242, 1.0, 17, 3, [UpstreamGauge("app", "127.0.0.1:9000", 2, 5)]))
    m.observe_gauges(WorkerGauges(4343, 1.0, 9, 1, [UpstreamGauge("app", "127.0.0.1:9000", 1, 4)]))
    sample = Sample(master_pid=1, generation=3, ring_dropped=5, ring_lost=1,
                    workers=[{"pid": 4242, "generation": 3, "rss": 10 << 20, "requests": 10},
                             {"pid": 4343, "generation": 3, "rss": 11 << 20, "requests": 3}],
                    tcp={("127.0.0.1:8080", "listen"): 2, ("127.0.0.1:8080", "established"): 4})
    fams = families(m.render(sample))

    assert value(fams, "forkproxy_requests", "forkproxy_requests_total") == 13
    assert value(fams, "forkproxy_requests", "forkproxy_requests_total", code="502") == 3
    assert value(fams, "forkproxy_requests", "forkproxy_requests_total",
                 listener="127.0.0.1:8443", upstream="app", code="200") == 3
    d = "forkproxy_request_duration_seconds"
    assert fams[d].type == "histogram"
    assert value(fams, d, d + "_count") == 13
    assert value(fams, d, d + "_bucket", le="+Inf") == 13
    fb = dict(phase="upstream_first_byte")
    p = "forkproxy_phase_duration_seconds"
    assert value(fams, p, p + "_count", **fb) == 13
    assert value(fams, p, p + "_bucket", le="0.1", **fb) == 3  # the 3 fast 502s
    assert value(fams, p, p + "_bucket", le="0.25", **fb) == 13
    assert value(fams, p, p + "_sum", **fb) == pytest.approx(10 * 0.2 + 3 * 0.001)
    # upstream_connect counts new connections only (6 of the 7 "a" requests were pooled)
    assert value(fams, p, p + "_count", phase="upstream_connect") == 13 - 6
    assert value(fams, p, p + "_count", phase="tls_handshake") == 2
    tls = "forkproxy_tls_handshakes"
    assert value(fams, tls, tls + "_total", resumed="true") == 1
    assert value(fams, tls, tls + "_total", resumed="false") == 1
    r = "forkproxy_upstream_reuse"
    assert value(fams, r, r + "_total", upstream="app", reused="true") == 6
    assert value(fams, r, r + "_total", upstream="app", reused="false") == 7
    u = "forkproxy_upstream_connections"
    assert value(fams, u, u, upstream="app", state="active") == 3
    assert value(fams, u, u, upstream="app", state="idle") == 9
    assert value(fams, "forkproxy_workers", "forkproxy_workers") == 2
    assert value(fams, "forkproxy_worker_resident_bytes", "forkproxy_worker_resident_bytes",
                 pid="4343") == 11 << 20
    assert value(fams, "forkproxy_worker_greenlets", "forkproxy_worker_greenlets",
                 pid="4242") == 17
    assert value(fams, "forkproxy_ring_dropped", "forkproxy_ring_dropped_total") == 5
    assert value(fams, "forkproxy_tcp_connections", "forkproxy_tcp_connections",
                 state="established") == 4
    assert value(fams, "forkproxy_generation", "forkproxy_generation") == 3


def test_every_histogram_is_well_formed():
    m = Metrics()
    for v in (0.0, 0.0001, 0.00010001, 59.9, 61.0):
        c = ctx(first_byte=v)
        m.observe(c)
    for fam in text_string_to_metric_families(m.render()):
        if fam.type != "histogram":
            continue
        series: dict = {}
        for s in fam.samples:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            series.setdefault(key, {"buckets": [], "count": None})
            if s.name.endswith("_bucket"):
                series[key]["buckets"].append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                series[key]["count"] = s.value
        for key, sr in series.items():
            bounds = [b for b, _ in sr["buckets"]]
            counts = [c for _, c in sr["buckets"]]
            assert bounds == sorted(bounds) and bounds[-1] == math.inf, key
            assert counts == sorted(counts), key  # cumulative
            assert counts[-1] == sr["count"], key
            want = PHASE_BUCKETS if fam.name.startswith("forkproxy_phase") else DURATION_BUCKETS
            assert bounds[:-1] == list(want)


def test_label_values_are_escaped():
    m = Metrics()
    c = ctx(upstream='we"ird\\name\nx')
    m.observe(c)
    fams = families(m.render())
    labels = [s.labels for s in fams["forkproxy_requests"].samples]
    assert labels == [{"listener": "127.0.0.1:8080", "upstream": 'we"ird\\name\nx', "code": "200"}]


def test_gauges_of_gone_workers_are_forgotten():
    m = Metrics()
    m.observe_gauges(WorkerGauges(1, 0.0, 5, 0, []))
    m.observe_gauges(WorkerGauges(2, 0.0, -1, 0, []))
    fams = families(m.render(Sample(workers=[{"pid": 2, "generation": 1, "rss": 1,
                                              "requests": 0}])))
    assert [s.labels["pid"] for s in fams["forkproxy_worker_client_connections"].samples] == ["2"]
    assert fams["forkproxy_worker_greenlets"].samples == []  # -1 = not counted
    m.forget_workers([2])
    assert list(m.gauges) == [2]


def test_tcp_states_from_sock_diag_match_the_sockets():
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    accepted = [srv.accept()[0] for _ in range(3)]
    try:
        out = tcp_states([("L", port)])
        assert out[("L", "listen")] == 1
        assert out[("L", "established")] == 3  # the accepted ends have sport == port
        assert out[("L", "time_wait")] == 0
    finally:
        for s in clients + accepted + [srv]:
            s.close()


# -- access log -------------------------------------------------------------------------


def test_json_line_has_the_contract_fields():
    c = ctx(rid="abc", status=201, path='/p?q="1"', first_byte=0.25, bytes_out=99)
    line = json_line(c, phases_ms(c))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    rec = json.loads(line)
    for key in ("ts", "request_id", "remote", "method", "path", "status", "bytes_out",
                "upstream", "upstream_addr", "duration_ms", "phases", "tls_resumed", "worker"):
        assert key in rec, key
    assert rec["ts"] == "2023-11-14T22:13:20.123Z"
    assert rec["request_id"] == "abc"
    assert rec["path"] == '/p?q="1"'
    assert rec["status"] == 201 and rec["bytes_out"] == 99
    assert rec["upstream"] == "app" and rec["upstream_addr"] == "127.0.0.1:9000"
    assert rec["tls_resumed"] is None and rec["worker"] == 4242
    assert rec["phases"]["upstream_first_byte"] == pytest.approx(250.0)
    assert "tls_handshake" not in rec["phases"]
    assert rec["duration_ms"] == pytest.approx((0.0005 + 0.0001 + 0.25 + 0.003) * 1000, abs=0.002)


def test_console_line_is_one_escaped_line():
    c = ctx(rid="abc", path='/a"b\nc', tls=True, tls_at=0.001, reused=True,
            error="upstream timeout")
    line = console_line(c, phases_ms(c)).decode()
    assert line.count("\n") == 1 and line.endswith("\n")
    assert line.startswith("2023-11-14T22:13:20.123Z 127.0.0.1 \"GET /a\\\"b\\x0ac\" 200 1234B ")
    assert "app=127.0.0.1:9000+" in line and "rid=abc" in line and "w=4242" in line
    assert "tls=TLSv1.3/resumed" in line and "first_byte=200.0" in line
    assert 'error="upstream timeout"' in line


def _read(path) -> str:
    with open(path) as f:
        return f.read()


def _nlines(path) -> int:
    return len(_read(path).splitlines())


def test_access_log_buffers_then_flushes_and_reopens(tmp_path):
    path = str(tmp_path / "access.log")
    log = AccessLog(path, "json")
    c = ctx()
    log.write(c, phases_ms(c))
    assert os.path.getsize(path) == 0  # buffered
    log.flush()
    assert _nlines(path) == 1
    # past the buffer threshold a write goes out on its own
    n = accesslog.BUFFER_BYTES // len(json_line(c, phases_ms(c))) + 2
    for _ in range(n):
        log.write(c, phases_ms(c))
    assert _nlines(path) > 1
    log.flush()
    assert _nlines(path) == n + 1
    # logrotate: rename, reopen, the next lines go to a new file
    os.rename(path, path + ".1")
    log.write(c, phases_ms(c))
    log.reopen()  # what was buffered still belongs to the old file
    log.write(c, phases_ms(c))
    log.close()
    assert _nlines(path + ".1") == n + 2
    assert _nlines(path) == 1
    assert log.lines == n + 3 and log.errors == 0


def test_access_log_writes_buffered_chunks_in_order_with_one_writev(tmp_path):
    path = str(tmp_path / "access.log")
    log = AccessLog(path, "json")
    chunks = [b"".join(b'{"n":%d}\n' % (i * 10 + k) for k in range(i + 1)) for i in range(40)]
    for i, chunk in enumerate(chunks):
        log.write_lines(chunk, i + 1)
    assert os.path.getsize(path) == 0  # under BUFFER_BYTES: buffered
    log.flush()
    assert log.writes == 1 and log.lines == sum(range(1, 41)) and log.errors == 0
    with open(path, "rb") as f:
        assert f.read() == b"".join(chunks)
    big = b"x" * 1000 + b"\n"
    for _ in range(accesslog.BUFFER_BYTES // len(big) + 1):  # past the threshold: written
        log.write_lines(big, 1)
    assert log.writes == 2 and log.size == 0
    log.close()


def test_access_log_off_and_reconfigure(tmp_path):
    log = AccessLog("off", "json")
    c = ctx()
    log.write(c, phases_ms(c))
    assert log.buf == []
    path = str(tmp_path / "a.log")
    log.reconfigure(path, "console")
    log.write(c, phases_ms(c))
    log.flush()
    assert _read(path).startswith("2023-11-14T22:13:20.123Z 127.0.0.1 \"GET /x\"")
    log.reconfigure(str(tmp_path / "missing-dir" / "b.log"), "json")  # cannot open: keep a.log
    assert log.path == path
    log.close()


def test_access_log_counts_lines_lost_to_write_errors(tmp_path):
    log = AccessLog("/dev/full", "json")
    c = ctx()
    for _ in range(5):
        log.write(c, phases_ms(c))
    log.flush()
    assert log.errors == 5 and log.lines == 0
    log.close()


# -- collector over real rings --------------------------------------------------------------


@pytest.fixture
def rings():
    made = {i: Ring.create(1 << 16) for i in range(3)}
    yield made
    for r in made.values():
        r.close()


def test_union_decoder_reads_requests_and_gauges():
    c = ctx()
    g = WorkerGauges(7, 1.5, 3, 2, [UpstreamGauge("app", "a:1", 1, 2)])
    assert decoder.decode(encoder.encode(c)) == c
    assert decoder.decode(encoder.encode(g)) == g
    with pytest.raises(msgspec.DecodeError):
        decoder.decode(b"\x93\x07\x01\x02")  # unknown tag


def test_collector_drains_all_rings_in_order_and_counts_bad_records(rings):
    got = []
    col = Collector(rings, lambda items: got.extend(items), batch=16)
    for i in range(40):
        rings[i % 3].push(encoder.encode(ctx(rid=f"r{i}", worker=i % 3)))
    rings[1].push(b"\xc1garbage")
    rings[2].push(encoder.encode(WorkerGauges(2, 0.0, 1, 0, [])))
    assert col.drain_all() == 42
    assert col.decode_errors == 1
    reqs = [r for r in got if isinstance(r, RequestContext)]
    assert len(reqs) == 40
    for w in range(3):  # per ring, the order of pushes is kept
        ids = [r.request_id for r in reqs if r.worker == w]
        assert ids == [f"r{i}" for i in range(40) if i % 3 == w]
    assert [r for r in got if isinstance(r, WorkerGauges)][0].worker == 2


def test_collector_wakes_on_the_doorbell_not_the_timeout(rings):
    """A record pushed while the collector sleeps arrives in well under WAIT_LIVE/WAIT_IDLE."""
    arrived = []
    col = Collector(rings, lambda items: arrived.extend(time.monotonic() for _ in items))
    col.start()
    try:
        deadline = time.monotonic() + 30
        while not all(r.waiting for r in rings.values()):  # every loop asleep on its doorbell
            assert time.monotonic() < deadline, "the ring loops never went to sleep"
            gevent.sleep(0.01)
        latencies = []
        for i in range(20):
            arrived.clear()
            t0 = time.monotonic()
            rings[i % 3].push(encoder.encode(ctx(rid=str(i))))
            while not arrived and time.monotonic() - t0 < 30.0:
                gevent.sleep(0.0005)
            assert arrived, "record not collected"
            latencies.append(arrived[0] - t0)
            gevent.sleep(0.01)
        latencies.sort()
        # woken by the doorbell: a loop that only woke on its timeout would have a median
        # of about half the timeout (WAIT_LIVE is the shorter one)
        assert latencies[len(latencies) // 2] < WAIT_LIVE / 4, latencies
        # idle: the loops sleep on their doorbells instead of spinning (at most one timeout
        # per loop per WAIT_LIVE of the time that really passed, plus the one in progress)
        wakeups, t0 = col.wakeups, time.monotonic()
        gevent.sleep(0.3)  # a measurement window, not synchronisation
        idle = time.monotonic() - t0
        assert col.wakeups - wakeups <= 3 * (idle / WAIT_LIVE + 1) + 3
    finally:
        col.stop()


def test_collector_batches_under_load(rings):
    sizes = []
    col = Collector(rings, lambda items: sizes.append(len(items)))
    col.start()
    try:
        ring = rings[0]
        payload = encoder.encode(ctx())
        pushed = 0
        t_end = time.monotonic() + 0.3
        while time.monotonic() < t_end:
            for _ in range(50):
                pushed += ring.push(payload)
            gevent.sleep(0.0002)
        deadline = time.monotonic() + 30
        while sum(sizes) < pushed and time.monotonic() < deadline:
            gevent.sleep(0.01)
        assert sum(sizes) == pushed
        assert pushed / len(sizes) > 20  # coalesced into batches, not one wake-up per record
    finally:
        col.stop()


def test_a_busy_rings_pause_follows_its_rate_within_bounds():
    target = 768
    # 25k records/s (a busy worker): the pause that makes a batch of ``target``
    assert coalesce_pause(0.01, 250, target) == pytest.approx(target / 25_000)
    # slow rings wait at most COALESCE_MAX; fast ones at least COALESCE (and a full
    # batch is drained again at once by the loop)
    assert coalesce_pause(0.01, 5, target) == COALESCE_MAX
    assert coalesce_pause(0.001, 1000, target) == COALESCE
    # at COALESCE_MAX the rate the pause was computed for fills a batch, not the ring
    assert COALESCE <= coalesce_pause(0.04, 1023, target) <= COALESCE_MAX


# -- admin request logic --------------------------------------------------------------------


def _manager(tmp_path, rings, admin_extra=""):
    from forkproxy import config as config_mod
    from forkproxy.manager.process import Manager, ManagerSpec

    conf = tmp_path / "fp.toml"
    conf.write_text(f"""
[log]
access_log = "access.log"
error_log = "error.log"
[admin]
listen = ""
{admin_extra}
[[listener]]
listen = "127.0.0.1:1"
upstream = "app"
[upstream.app]
servers = [{{ address = "127.0.0.1:2" }}]
""")
    cfg = config_mod.load(str(conf))
    table = WorkerTable(8)
    table.set_master(os.getpid(), 3)
    spec = ManagerSpec(cfg=cfg, table=table, rings=rings)  # real worker table and rings
    return Manager(spec, log_mod.rebind("manager")), table


def test_admin_routes_status_healthz_metrics(tmp_path, rings):
    mgr, table = _manager(tmp_path, rings)
    admin = Admin(mgr)
    admin.configure_access("127.0.0.1:9901", "")
    r = admin.dispatch("GET", "/healthz", {})
    assert r.status == 503  # no worker yet
    table.assign(0, os.getpid(), 0, 3, None)
    table.beat(0, 12, 1)
    assert admin.dispatch("GET", "/healthz", {}).status == 200
    st = json.loads(admin.dispatch("GET", "/status", {}).body)
    assert st["master_pid"] == os.getpid() and st["generation"] == 3
    assert st["config"] == str(tmp_path / "fp.toml")
    [w] = st["workers"]
    assert w["pid"] == os.getpid() and w["generation"] == 3 and w["requests"] == 12
    assert w["rss"] > 0 and w["connections"] == 1
    for key in ("pid", "cpu", "generation", "started", "requests", "connections", "rss"):
        assert key in w
    m = admin.dispatch("GET", "/metrics?x=1", {})
    assert m.status == 200 and m.ctype.startswith("text/plain; version=0.0.4")
    fams = families(m.body.decode())
    assert value(fams, "forkproxy_workers", "forkproxy_workers") == 1
    assert admin.dispatch("POST", "/metrics", {}).status == 405
    assert admin.dispatch("GET", "/nope", {}).status == 404
    assert admin.dispatch("GET", "/debug/profile?pid=1", {}).status == 404  # not a worker
    assert admin.dispatch("GET", "/debug/profile?seconds=x", {}).status == 400
    mgr.accesslog.close()


def test_admin_token_required_when_set_and_non_loopback_refused_without(tmp_path, rings):
    mgr, _ = _manager(tmp_path, rings)
    admin = Admin(mgr)
    admin.configure_access("0.0.0.0:9901", "s3cret")
    assert admin.dispatch("GET", "/status", {}).status == 401
    assert admin.dispatch("GET", "/status", {"authorization": "Bearer nope"}).status == 401
    assert admin.dispatch("GET", "/status", {"authorization": "Bearer s3cret"}).status == 200
    admin.configure_access("0.0.0.0:9901", "")
    assert admin.dispatch("GET", "/status", {}).status == 403
    admin.configure_access("[::1]:9901", "")
    assert admin.dispatch("GET", "/status", {}).status == 200
    mgr.accesslog.close()


def test_admin_http_server_keepalive_and_head(tmp_path, rings):
    from gevent import socket

    mgr, _ = _manager(tmp_path, rings)
    admin = Admin(mgr)
    assert admin.serve("127.0.0.1:0", "")
    try:
        host, port = admin.addresses[0][:2]
        c = socket.create_connection((host, port))
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nHEAD /status HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
        c.close()
        assert data.count(b"HTTP/1.1 ") == 3
        assert data.startswith(b"HTTP/1.1 503 ")
        head2 = data.split(b"HTTP/1.1 ")[2]
        assert head2.startswith(b"200 ") and b"Content-Length: " in head2
        assert head2.endswith(b"\r\n\r\n")  # HEAD: no body
        assert b"404 Not Found" in data and b"Connection: close" in data
    finally:
        admin.stop()
        mgr.accesslog.close()


def test_status_table_renders():
    st = {"master_pid": 10, "generation": 2, "config": "/etc/fp.toml", "workers": [
        {"pid": 11, "cpu": 0, "generation": 2, "requests": 123456, "connections": 3,
         "rss": 30 * 1048576, "uptime": 3725},
        {"pid": 12, "cpu": None, "generation": 1, "requests": 0, "connections": 0,
         "rss": None, "started": 1000.0},
    ]}
    text = render(st, now=1065.0)
    lines = text.splitlines()
    assert lines[0].startswith("master pid 10  generation 2")
    assert lines[2].split() == ["PID", "CPU", "GEN", "REQUESTS", "CONNS", "RSS", "MiB", "UPTIME"]
    assert lines[3].split() == ["11", "0", "2", "123456", "3", "30.0", "1h02m05s"]
    assert lines[4].split() == ["12", "-", "1", "0", "0", "-", "1m05s"]
    assert admin_target("*:9901") == ("127.0.0.1", 9901)
    assert admin_target("[::1]:9901") == ("::1", 9901)


# -- worker debug hook between two sibling processes ------------------------------------------


def _busy_worker(ready_w: int) -> None:
    gevent.reinit()
    worker_profiling.install_worker_hook()

    def spin():
        while True:
            _hot_loop()
            gevent.sleep(0)

    gevent.spawn(spin)
    gevent.spawn(gevent.sleep, 3600)  # an idle greenlet to find in the report
    os.write(ready_w, b"R")
    gevent.sleep(60)


def _hot_loop():
    x = 0
    for i in range(20000):
        x += i * i
    return x


def _fork(fn, *args) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn(*args)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def _ask(worker_pid: int, cmd: dict, out_w: int) -> None:
    gevent.reinit()
    try:
        answer = profiling.ask_worker(worker_pid, cmd, timeout=10)
    except profiling.DebugError as e:
        answer = {"error": str(e), "status": e.status}
    os.write(out_w, json.dumps(answer).encode())


def _run_sibling(worker_pid: int, cmd: dict) -> dict:
    r, w = os.pipe()
    pid = _fork(_ask, worker_pid, cmd, w)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 20):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def test_debug_hook_profile_and_greenlets_between_siblings():
    r, w = os.pipe()
    worker = _fork(_busy_worker, w)
    os.close(w)
    try:
        assert os.read(r, 1) == b"R"
        assert profiling.catches_debug_signal(worker)
        prof = _run_sibling(worker, {"cmd": "profile", "seconds": 0.5, "hz": 200})
        assert "error" not in prof, prof
        assert prof["pid"] == worker and prof["samples"] > 10
        hot = sum(n for stack, n in prof["stacks"].items() if "_hot_loop" in stack)
        assert hot > prof["samples"] / 2
        text = profiling.collapsed(prof)
        first = text.splitlines()[0]
        assert first.rsplit(" ", 1)[1].isdigit() and ";" in first
        gl = _run_sibling(worker, {"cmd": "greenlets"})
        assert gl["pid"] == worker and gl["total"] >= 3
        assert any("sleep" in " ".join(g["stack"]) for g in gl["groups"])
        # a process that is not a sibling cannot be served: the hook checks the peer's parent
        assert not profiling.catches_debug_signal(os.getpid())
        with pytest.raises(profiling.DebugError) as e:
            gevent.get_hub()
            profiling.ask_worker(os.getpid(), {"cmd": "greenlets"}, timeout=1)
        assert e.value.status == 501
    finally:
        os.close(r)
        os.kill(worker, signal.SIGKILL)
        os.waitpid(worker, 0)


def test_gauges_record_from_worker_state(rings):
    from forkproxy.config import UpstreamConfig
    from forkproxy.worker.upstream import build_upstreams

    class State:
        pid = 99
        connections = {1, 2}
        upstreams = build_upstreams({"app": UpstreamConfig(
            servers=[_addr("127.0.0.1:1"), _addr("127.0.0.1:2")])})
        ring = rings[0]

    State.upstreams["app"].servers[0].active = 2
    g = worker_profiling.gauges(State, now=10.0)
    assert g.worker == 99 and g.connections == 2 and g.greenlets >= 1
    assert [(u.upstream, u.server, u.active, u.idle) for u in g.upstreams] == [
        ("app", "127.0.0.1:1", 2, 0), ("app", "127.0.0.1:2", 0, 0)]
    # the walk is not repeated within GREENLET_COUNT_MIN_INTERVAL
    worker_profiling._greenlets["count"] = -5
    assert worker_profiling.gauges(State, now=11.0).greenlets == -5
    worker_profiling._greenlets["next"] = 0.0
    assert worker_profiling.push_gauges(State)
    got = []
    Collector({0: rings[0]}, got.extend).drain_all()
    assert isinstance(got[0], WorkerGauges) and got[0].worker == 99


def _addr(a: str):
    from forkproxy.config import ServerAddress

    return ServerAddress(address=a)
