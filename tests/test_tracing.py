"""W3C Trace Context and span export: parsing and ids (sans-IO), propagation through a
real proxy to a real origin, spans decoded by a real OTLP/HTTP receiver on loopback,
head and tail sampling, and a collector that is down or slow."""

from __future__ import annotations

import collections
import json
import re
import statistics
import time
import urllib.request

import pytest
from fp import children_of, comm, connect, free_port, recv_response, request, wait_for
from otlputil import Receiver, attrs
from puremod import pure_twin

from forkproxy.http import ids as idmod
from forkproxy.http import tracecontext as tc

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


# -- sans-IO ----------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
     (bytes.fromhex(CLIENT_TRACE), bytes.fromhex(CLIENT_SPAN), 1)),
    (b" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00\t",
     (bytes.fromhex(CLIENT_TRACE), bytes.fromhex(CLIENT_SPAN), 0)),
    # a later version: the known fields, then "-" and whatever it adds
    (b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-what-the-future-adds",
     (bytes.fromhex(CLIENT_TRACE), bytes.fromhex(CLIENT_SPAN), 9)),
    (b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", (
        bytes.fromhex(CLIENT_TRACE), bytes.fromhex(CLIENT_SPAN), 1)),
    (b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),  # version ff
    (b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None),  # upper case
    (b"00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),  # zero trace id
    (b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),  # zero parent
    (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-", None),  # 00 plus more
    (b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", None),
    (b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None),  # short trace id
    (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", None),
    (b"-", None),  # the parser's mark for two traceparent fields
    (b"", None),
])
def test_parse_traceparent(value, expected):
    assert tc.parse_traceparent(value) == expected


def test_format_traceparent_round_trips():
    tid, sid = bytes.fromhex(CLIENT_TRACE), bytes.fromhex(CLIENT_SPAN)
    text = tc.format_traceparent(tid, sid, 1)
    assert text == f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01".encode()
    assert tc.parse_traceparent(text) == (tid, sid, 1)


@pytest.mark.parametrize("fields, expected", [
    ([b"congo=t61rcWkgMzE"], "congo=t61rcWkgMzE"),
    ([b"rojo=00f067aa0ba902b7, congo=t61rcWkgMzE"], "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
    ([b"rojo=1", b"congo=2"], "rojo=1,congo=2"),  # several fields combine
    ([b"tenant@vendor=x,,  ,a=b"], "tenant@vendor=x,a=b"),  # empty members dropped
    ([b"Upper=1"], ""),  # keys are lower case
    ([b"a=1,a=2"], ""),  # a key twice
    ([b"a=x=y"], ""),  # "=" in a value
    ([b"a=" + b"v" * 300], ""),  # value longer than 256
    ([b",".join(b"k%d=v" % i for i in range(33))], ""),  # more than 32 members
])
def test_parse_tracestate(fields, expected):
    assert tc.parse_tracestate(fields) == expected


def test_ids_are_distinct_and_ratio_sampling_is_fair():
    ids = tc.IdGenerator()
    spans = {ids.span_id() for _ in range(100_000)}
    assert len(spans) == 100_000 and all(len(s) == 8 and s != bytes(8) for s in spans)
    traces = [ids.trace_id() for _ in range(20_000)]
    assert len(set(traces)) == 20_000 and all(len(t) == 16 for t in traces)
    other = tc.IdGenerator()  # another worker: other ids
    assert not spans & {other.span_id() for _ in range(1000)}
    threshold = tc.ratio_threshold(0.25)
    share = sum(tc.sampled_by_ratio(t, threshold) for t in traces) / len(traces)
    assert 0.23 < share < 0.27
    assert all(tc.sampled_by_ratio(t, tc.ratio_threshold(1.0)) for t in traces[:100])
    # the worker's one-call path agrees with the pieces
    for _ in range(2000):
        (trace_id, span_id, parent, flags, state), line = ids.new_trace(threshold)
        assert (parent, state) == (b"", "")
        name, _, value = line.partition(b": ")
        assert name == b"traceparent" and value.endswith(b"\r\n")
        assert tc.parse_traceparent(value[:-2]) == (trace_id, span_id, flags)
        assert bool(flags) == tc.sampled_by_ratio(trace_id, threshold)
        assert trace_id[:8] == ids.high
    assert not any(tc.sampled_by_ratio(t, tc.ratio_threshold(0.0)) for t in traces[:100])


def test_the_managers_sampling_agrees_with_the_workers_rule():
    """sampling.sample_batch (C in the compiled build) keeps what the rules say: the
    sampled flag, the ratio on the trace id (the worker's sampled_by_ratio), errors and
    slow requests; records without a trace and other record types are skipped; what does
    not fit the queue's room is counted as dropped."""
    import random

    from forkproxy.context import RequestContext, WorkerGauges
    from forkproxy.manager.sampling import sample_batch

    rnd = random.Random(7)
    recs: list = [WorkerGauges(1, 0.0, 1, 1)]
    for i in range(4000):
        start = 100.0 + i
        recs.append(RequestContext(
            1.7e9, f"r{i}", 1, "l", "c", "GET", "/", rnd.choice([200, 200, 503]), 0, 0, "",
            "", False, None, "", [start, 0.0, start + 0.001, 0.0, 0.0, 0.0, 0.0,
                                  start + rnd.choice([0.01, 0.01, 0.9])],
            error=rnd.choice(["", "", "", "upstream_reset"]),
            trace_id=rnd.choice([rnd.randbytes(16), rnd.randbytes(16), b""]),
            trace_flags=rnd.choice([0, 0, 0, 1])))
    for ratio in (0.0, 0.3, 1.0):
        threshold = tc.ratio_threshold(ratio)
        want = [r for r in recs if type(r) is RequestContext and r.trace_id and (
            r.trace_flags & 1 or tc.sampled_by_ratio(r.trace_id, threshold)
            or r.status >= 500 or r.error or r.times[7] - r.times[0] > 0.5)]
        kept: list = []
        assert sample_batch(recs, kept, 1 << 30, threshold, 0.5) == (len(want), 0)
        assert kept == want
        kept = []
        assert sample_batch(recs, kept, 10, threshold, 0.5) == (len(want), len(want) - 10)
        assert kept == want[:10]


# -- a real proxy -------------------------------------------------------------------------


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


def traced_proxy(proxies, tmp_path, origin, endpoint: str, **tracing):
    keys = {"endpoint": f'"{endpoint}"', "sample_ratio": "1.0", "export_interval": '"100ms"',
            **tracing}
    text = "[tracing]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
    return proxies(tmp_path, origin.address, admin=True, extra=text + (
        '[[route]]\npath_prefix = "/headers"\nupstream = "app"\n'
        '[[route]]\npath_prefix = "/"\nupstream = "app"\n'))


def origin_headers(port: int, headers: dict | None = None) -> dict:
    status, _, body = request(port, "GET", "/headers", headers=headers)
    assert status == 200
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


def access_log(p) -> list[dict]:
    try:
        with open(p.access_log) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError:
        return []


def metric(p, name: str, **labels) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}{{{sel}}} (\S+)$" if sel else rf"^{name} (\S+)$", text, re.M)
    assert m, (name, labels)
    return float(m.group(1))


def test_traceparent_propagates_with_forkproxys_span_as_parent(proxies, tmp_path, origin,
                                                              receiver):
    p = traced_proxy(proxies, tmp_path, origin, receiver.url)
    seen = origin_headers(p.port, {
        "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
        "tracestate": "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"})
    version, trace, parent, flags = seen["traceparent"].split("-")
    assert (version, trace, flags) == ("00", CLIENT_TRACE, "01")
    assert parent != CLIENT_SPAN and re.fullmatch("[0-9a-f]{16}", parent)
    assert seen["tracestate"] == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"

    [span] = wait_for(receiver.server_spans, timeout=10, what="the server span exported")
    assert span.trace_id.hex() == CLIENT_TRACE
    assert span.span_id.hex() == parent  # the origin's parent is forkproxy's span
    assert span.parent_span_id.hex() == CLIENT_SPAN  # whose parent is the client's
    assert span.trace_state == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    assert span.name == "GET /headers"
    a = attrs(span)
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == "/headers"
    assert a["url.scheme"] == "http"
    assert a["http.response.status_code"] == 200
    assert a["http.route"] == "/headers"
    assert (a["server.address"], a["server.port"]) == ("127.0.0.1", p.port)
    assert a["forkproxy.upstream"] == "app"
    assert a["forkproxy.upstream.port"] == origin.port
    assert a["forkproxy.upstream.connection_reused"] is False
    assert a["client.address"] == "127.0.0.1"
    assert a["network.protocol.version"] == "1.1"
    assert a["http.response.body.size"] > 0
    children = wait_for(lambda: len(receiver.children_of(span.span_id)) >= 5 and
                        receiver.children_of(span.span_id), timeout=10, what="phase spans")
    for name in ("request_head", "upstream_connect", "request_send", "upstream_first_byte",
                 "response_body"):
        child = children[name]
        assert child.trace_id == span.trace_id
        assert span.start_time_unix_nano <= child.start_time_unix_nano
        assert child.start_time_unix_nano <= child.end_time_unix_nano <= span.end_time_unix_nano
    assert children["upstream_connect"].end_time_unix_nano <= \
        children["upstream_first_byte"].end_time_unix_nano
    assert abs(span.end_time_unix_nano / 1e9 - time.time()) < 60
    res = attrs(receiver.requests[0].resource_spans[0].resource)
    assert res["service.name"] == "forkproxy"
    assert receiver.content_types[0] == "application/x-protobuf"

    # the access log carries the ids
    line = wait_for(lambda: [e for e in access_log(p) if e["path"] == "/headers"],
                    what="the access log line")[0]
    assert (line["trace_id"], line["span_id"]) == (CLIENT_TRACE, parent)


def test_a_trace_starts_when_the_client_sends_none(proxies, tmp_path, origin, receiver):
    p = traced_proxy(proxies, tmp_path, origin, receiver.url)
    first = origin_headers(p.port, {"tracestate": "rojo=1"})
    second = origin_headers(p.port, {"traceparent": "00-zz-bad-01"})  # invalid: a new trace
    for seen in (first, second):
        assert tc.parse_traceparent(seen["traceparent"].encode()) is not None
        assert "tracestate" not in seen  # dropped without a valid traceparent
    assert first["traceparent"][3:35] != second["traceparent"][3:35]
    spans = wait_for(lambda: len(receiver.server_spans()) == 2 and receiver.server_spans(),
                     timeout=10, what="two server spans")
    assert {s.trace_id.hex() for s in spans} == {first["traceparent"][3:35],
                                                 second["traceparent"][3:35]}
    assert all(not s.parent_span_id for s in spans)


def test_head_sampling(proxies, tmp_path, origin, receiver):
    p = traced_proxy(proxies, tmp_path, origin, receiver.url, sample_ratio="0.0")
    unsampled = origin_headers(p.port)  # a trace we start, not sampled
    assert unsampled["traceparent"].endswith("-00")
    origin_headers(p.port, {"traceparent": f"00-{'1' * 32}-{CLIENT_SPAN}-00"})
    origin_headers(p.port, {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    [span] = wait_for(receiver.server_spans, timeout=10, what="the sampled request's span")
    assert span.trace_id.hex() == CLIENT_TRACE
    wait_for(lambda: metric(p, "forkproxy_trace_requests_sampled_total") == 1, what="counts")
    time.sleep(0.5)  # two more export intervals: nothing else arrives
    assert len(receiver.server_spans()) == 1

    p.stop()
    (tmp_path / "all").mkdir()
    p2 = traced_proxy(proxies, tmp_path / "all", origin, receiver.url, sample_ratio="1.0")
    assert origin_headers(p2.port)["traceparent"].endswith("-01")
    wait_for(lambda: len(receiver.server_spans()) == 2, timeout=10, what="the second span")


def test_tail_sampling_keeps_errors_and_slow_requests(proxies, tmp_path, origin, receiver):
    p = traced_proxy(proxies, tmp_path, origin, receiver.url, sample_ratio="0.0",
                     sample_slower_than='"600ms"')  # far above the fast ones, even loaded
    took = {}
    for path in ("/tiny", "/sleep/900", "/status/503", "/sleep/10", "/status/404"):
        t0 = time.monotonic()
        assert request(p.port, "GET", path)[0] in (200, 404, 503)
        took[path] = time.monotonic() - t0
    spans = wait_for(lambda: len(receiver.server_spans()) >= 2 and receiver.server_spans(),
                     timeout=15, what="the slow and the failed request's spans")
    paths = {attrs(s)["url.path"]: s for s in spans}
    assert set(paths) == {"/sleep/900", "/status/503"}, (set(paths), took)
    failed = paths["/status/503"]
    assert failed.status.code == failed.status.STATUS_CODE_ERROR
    assert attrs(failed)["error.type"] == "503"
    assert paths["/sleep/900"].status.code == 0  # unset: a slow 200 is no error
    time.sleep(0.5)
    assert len(receiver.server_spans()) == 2


def test_upstream_reset_is_kept_as_an_error(proxies, tmp_path, origin, receiver):
    """A refused upstream (502, the proxy's own answer) is an error: always exported."""
    dead = f"127.0.0.1:{free_port()}"
    keys = (f'[tracing]\nendpoint = "{receiver.url}"\nsample_ratio = 0.0\n'
            'export_interval = "100ms"\n')
    p = proxies(tmp_path, dead, admin=True, extra=keys)
    assert request(p.port, "GET", "/x")[0] == 502
    [span] = wait_for(receiver.server_spans, timeout=10, what="the 502's span")
    assert attrs(span)["http.response.status_code"] == 502
    assert span.status.code == span.status.STATUS_CODE_ERROR
    assert span.status.message  # why: the connect error


def latencies(port: int, n: int = 150) -> list[float]:
    out = []
    with connect(port) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            c.sendall(b"GET /tiny HTTP/1.1\r\nHost: x\r\n\r\n")
            assert recv_response(c)[0] == 200
            out.append(time.perf_counter() - t0)
    return out


def dropped(p) -> float:
    return (metric(p, "forkproxy_trace_spans_dropped_total", reason="queue_full")
            + metric(p, "forkproxy_trace_spans_dropped_total", reason="export_failed"))


def settled(p) -> bool:
    """Every sampled request was exported or dropped (none waiting)."""
    return (metric(p, "forkproxy_trace_queue_length") == 0
            and metric(p, "forkproxy_trace_spans_exported_total") + dropped(p)
            == metric(p, "forkproxy_trace_requests_sampled_total"))


def test_collector_down_or_slow_costs_no_latency_and_drops_are_counted(proxies, tmp_path,
                                                                      origin, receiver):
    """150 requests per phase against a queue of 64: with the collector slow (answers
    after the export timeout) or down (refused), spans are dropped and counted, and the
    proxy's latency stays what it was with the collector up."""
    p = traced_proxy(proxies, tmp_path, origin, receiver.url, queue_size="64",
                     batch_size="32", export_timeout='"300ms"')
    latencies(p.port, 20)  # warm up (connections, pools)
    base = statistics.median(latencies(p.port))
    wait_for(lambda: settled(p), timeout=15, what="the spans of the first phase exported")
    assert metric(p, "forkproxy_trace_spans_exported_total") >= 32  # a batch at least

    receiver.delay = 2.0
    before = dropped(p)
    slow = statistics.median(latencies(p.port))
    wait_for(lambda: dropped(p) >= before + 50, timeout=20,
             what="drops while the collector is slow")

    receiver.delay = 0.0
    receiver.stop()  # down: connections refused
    before = dropped(p)
    down = statistics.median(latencies(p.port))
    wait_for(lambda: dropped(p) >= before + 50, timeout=20,
             what="drops while the collector is down")
    wait_for(lambda: metric(p, "forkproxy_trace_export_requests_total", result="failure") > 0,
             timeout=20, what="failed exports counted")
    # the proxy does not wait for the collector: same latency (loose: a shared machine)
    for median in (slow, down):
        assert median < 3 * base + 0.002, (base, slow, down)


@pytest.mark.parametrize("fast", [True, False])
def test_parser_keeps_the_trace_fields_apart(fast):
    """Both parser paths (the fast one and llhttp's) take traceparent and tracestate out
    of the forwarded headers; a second traceparent invalidates the trace context."""
    from forkproxy.http.request import HEAD, Limits, RequestParser

    def parse(extra: bytes):
        p = RequestParser(Limits())
        if not fast:
            p._boundary = False  # skip the fast path, as test_request_head.py does
        p.feed(memoryview(bytearray(b"GET / HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")))
        [(kind, req)] = [e for e in p.events if e[0] == HEAD]
        return req

    tp = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01".encode()
    req = parse(b"traceparent: " + tp + b"\r\ntracestate: a=1\r\nX-Y: z\r\ntracestate: b=2\r\n")
    assert (req.traceparent, req.tracestate) == (tp, b"a=1,b=2")
    assert req.headers == [(b"X-Y", b"z")]
    twice = parse(b"traceparent: " + tp + b"\r\ntraceparent: " + tp + b"\r\n")
    assert tc.parse_traceparent(twice.traceparent) is None


def test_collector_shards_export_their_rings_spans_and_counts_add_up(proxies, tmp_path,
                                                                     origin, receiver):
    """With two collectors, the shard exports the spans of its workers' rings itself; the
    manager's /metrics adds the shard's export counters, /debug/phases its histograms."""
    extra = (f'[tracing]\nendpoint = "{receiver.url}"\nsample_ratio = 1.0\n'
             'export_interval = "100ms"\n')
    p = proxies(tmp_path, origin.address, workers=2, admin=True, extra=extra,
                server_extra="collectors = 2")
    wait_for(lambda: any(comm(c).startswith("fp-collector")
                         for c in children_of(p.manager_pid() or 0)), what="the collector shard")
    n = 48
    for _ in range(n // 24):  # many connections: both workers (so both rings) serve some
        clients = [connect(p.port) for _ in range(24)]
        for c in clients:
            c.sendall(b"GET /tiny HTTP/1.1\r\nHost: x\r\n\r\n")
        for c in clients:
            assert recv_response(c)[0] == 200
            c.close()
    lines = wait_for(lambda: len(access_log(p)) == n and access_log(p), what="the log lines")
    assert len({e["worker"] for e in lines}) == 2  # both rings, so both collectors, had some
    spans = wait_for(lambda: len(receiver.server_spans()) == n and receiver.server_spans(),
                     timeout=15, what="every request's span")
    assert {s.span_id.hex() for s in spans} == {e["span_id"] for e in lines}
    wait_for(lambda: metric(p, "forkproxy_trace_spans_exported_total") == n, timeout=10,
             what="the manager's and the shard's export counters added")
    with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/debug/phases",
                                timeout=10) as r:
        rep = json.load(r)
    assert sum(g["requests"] for g in rep["groups"]) == n


def test_http2_streams_carry_the_trace_context(proxies, tmp_path, origin, receiver):
    """An HTTP/2 (h2c) request's traceparent is continued like an HTTP/1.1 one: the origin
    gets one traceparent, the client's trace with forkproxy's span as the parent."""
    from h2client import SocketClient

    extra = (f'[tracing]\nendpoint = "{receiver.url}"\nsample_ratio = 1.0\n'
             'export_interval = "100ms"\n')
    p = proxies(tmp_path, origin.address, admin=True, extra=extra,
                listener_extra='protocols = ["http/1.1", "h2c"]')
    c = SocketClient(p.port)
    try:
        got = c.wait(c.send([(b":method", b"GET"), (b":scheme", b"http"),
                             (b":authority", b"x"), (b":path", b"/headers"),
                             (b"traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01".encode()),
                             (b"tracestate", b"rojo=1")]))
    finally:
        c.close()
    assert got["status"] == 200
    headers = json.loads(got["body"])["headers"]
    sent = [v for n, v in headers if n.lower() == "traceparent"]
    assert len(sent) == 1, headers  # the client's field is not forwarded besides ours
    _, trace, parent, flags = sent[0].split("-")
    assert (trace, flags) == (CLIENT_TRACE, "01") and parent != CLIENT_SPAN
    assert [v for n, v in headers if n.lower() == "tracestate"] == ["rojo=1"]
    [span] = wait_for(receiver.server_spans, timeout=10, what="the stream's span")
    assert (span.span_id.hex(), span.parent_span_id.hex()) == (parent, CLIENT_SPAN)
    assert attrs(span)["network.protocol.version"] == "2"


# -- span templates against the protobuf builder --------------------------------------


def varied_records(n: int, seed: int, shapes: int = 60) -> list:
    """Request contexts of ``shapes`` shapes (listeners, routes, servers, methods,
    statuses, errors, TLS, phases present or not, retries, pooled, a parent or not), each
    request with random ids, times, paths, clients, sizes and tracestate."""
    import random

    from forkproxy.context import N_TIMES, RequestContext

    rnd = random.Random(seed)
    pool = []
    for _ in range(shapes):
        tls = rnd.choice(["", "TLSv1.3", "TLSv1.2"])
        addr = rnd.choice(["", "10.0.0.1:80", "[::1]:8443", "origin.internal:9000"])
        pool.append(dict(
            listener=rnd.choice(["127.0.0.1:8080", "[::]:443", "0.0.0.0:80"]),
            method=rnd.choice(["GET", "POST", "DELETE"]),
            status=rnd.choice([200, 200, 204, 301, 404, 499, 500, 502, 503, 0]),
            upstream=rnd.choice(["", "app", "static"]) if addr else "", upstream_addr=addr,
            reused=rnd.random() < 0.5, tls_resumed=(rnd.random() < 0.5) if tls else None,
            tls_version=tls, error=rnd.choice(["", "", "", "upstream_reset", "client_gone"]),
            retries=rnd.choice([0, 0, 1, 3]), protocol=rnd.choice(["HTTP/1.1", "HTTP/2"]),
            route=rnd.choice(["", "* /api", "example.com /"])))
        pool[-1]["_zero"] = rnd.sample(range(N_TIMES - 1), rnd.randint(0, 4))
        pool[-1]["_swap"] = rnd.random() < 0.1  # out of order: no upstream_connect span
        pool[-1]["_parent"] = rnd.random() < 0.5
    out = []
    for i in range(n):
        shape = dict(rnd.choice(pool))
        t = [0.0] * N_TIMES
        now = 1_000_000 * rnd.random() + 50
        steps = sorted(rnd.uniform(0, 2) for _ in range(N_TIMES))
        for k in range(N_TIMES):
            t[k] = now + steps[k]
        for k in shape.pop("_zero"):
            t[k] = 0.0  # a phase that did not happen
        if shape.pop("_swap"):
            t[3], t[4] = t[4], t[3]
        parent = rnd.randbytes(8) if shape.pop("_parent") else b""
        out.append(RequestContext(
            ts=1.7e9 + rnd.random() * 1e6, request_id=f"r{i}", worker=4242,
            remote=rnd.choice(["127.0.0.1", "::1", f"10.1.{i % 7}.{i % 251}"]),
            path=rnd.choice(["/", f"/api/items/{i % 300}", "/ü/" + "x" * rnd.randint(0, 300),
                             f"/search?q={i % 50}&x=", "/?"]),
            bytes_in=rnd.choice([0, 0, 17, 70000]),
            bytes_out=rnd.choice([0, 1234, rnd.randint(1, 1 << 40)]), times=t,
            trace_id=rnd.randbytes(16), span_id=rnd.randbytes(8), parent_span_id=parent,
            trace_flags=1, tracestate=rnd.choice(["", "", "rojo=1,congo=t61rcWkgMzE"]),
            **shape))
    return out


def decoded_spans(body: bytes) -> dict:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    req = ExportTraceServiceRequest.FromString(body)
    [rs] = req.resource_spans
    [ss] = rs.scope_spans
    spans = {s.span_id: s for s in ss.spans}
    assert len(spans) == len(ss.spans)  # no span id twice
    return {"resource": rs.resource, "scope": ss.scope, "spans": spans}


def assert_same_spans(got: dict, want: dict) -> None:
    """Field by field: every span the protobuf builder makes, and no other."""
    assert got["resource"] == want["resource"] and got["scope"] == want["scope"]
    assert set(got["spans"]) == set(want["spans"])
    for span_id, w in want["spans"].items():
        g = got["spans"][span_id]
        assert g.ListFields() == w.ListFields(), (span_id.hex(), g, w)


@pytest.mark.parametrize("compiled", [True, False], ids=["spanfill", "struct"])
def test_span_templates_write_what_the_protobuf_classes_write(compiled):
    """A differential test: 6,000 requests of 60 shapes encoded by the templates (and the
    protobuf builder for a shape's first MAKE_AFTER requests and the ids templates leave
    to it) decode, with the official classes, to the same spans as the builder's. Both
    fills: spanfill's (C in the compiled build, Python in the pure one) and the generated
    struct packing."""
    from forkproxy.manager.spans import SpanEncoder

    enc = SpanEncoder("forkproxy-test", compiled=compiled)
    ref = SpanEncoder("forkproxy-test")
    recs = varied_records(6000, seed=18)
    recs[7].span_id = b"\x03" + bytes(7)  # a child id would be 0: the slow builder
    recs[8].trace_id = b"\x01" * 15  # not 16 bytes (never from a worker): slow too
    recs[9].times = recs[9].times[:5]  # too few times (neither): slow, the rest 0
    recs[10].path = "/" + "p" * 17000  # the server span over 16 KiB: slow
    for at in range(0, len(recs), 512):
        batch = recs[at:at + 512]
        assert_same_spans(decoded_spans(enc.encode(batch)), decoded_spans(ref.encode_slow(batch)))
    assert enc.slow >= 4 and enc.fast > 0.8 * len(recs), (enc.fast, enc.slow)
    assert len(enc.templates.templates) > 40  # most shapes got one


def test_span_templates_are_bounded_and_fall_back():
    """Past MAX_TEMPLATES shapes the oldest quarter goes; a shape whose server span does
    not fit a template (over 16 KiB) stays with the protobuf builder; same spans."""
    from forkproxy.manager import spantemplate
    from forkproxy.manager.spans import SpanEncoder

    enc = SpanEncoder("forkproxy-test")
    recs = varied_records(2000, seed=5, shapes=1)
    for i, r in enumerate(recs):
        r.route = f"* /r{i % 100}"  # 100 shapes, 20 requests each
    recs[-1].error = recs[-2].error = "e" * 20000  # the status message: too long
    recs[-2].route = recs[-1].route  # one shape, seen twice
    saved = spantemplate.MAX_TEMPLATES, spantemplate.MAKE_AFTER
    spantemplate.MAX_TEMPLATES, spantemplate.MAKE_AFTER = 64, 2
    try:
        body = enc.encode(recs)
        for r in recs[-2:]:  # the long one's shape, seen MAKE_AFTER times: no template
            assert enc.templates.templates.get(enc_key(r)) is False
    finally:
        spantemplate.MAX_TEMPLATES, spantemplate.MAKE_AFTER = saved
    assert 48 <= len(enc.templates.templates) <= 64
    # 100 shapes in turn through 64 places: evicted ones start over (seen, then made)
    assert enc.slow >= 102 and enc.fast > enc.slow, (enc.fast, enc.slow)
    assert_same_spans(decoded_spans(body), decoded_spans(enc.encode_slow(recs)))


def enc_key(ctx) -> tuple:
    """The shape key of ctx (to look its template up)."""
    from forkproxy.manager.spanfill import shape_key

    return shape_key(ctx, ctx.times)


def test_exported_template_spans_decode_at_a_real_receiver(receiver):
    """Through the Tracer and its OTLP/HTTP client to the real receiver: what it decodes
    is, span for span, what the protobuf builder makes of the same records."""
    from forkproxy.config import TracingConfig
    from forkproxy.manager.spans import SpanEncoder
    from forkproxy.manager.tracing import Tracer

    tracer = Tracer(TracingConfig(endpoint=receiver.url, sample_ratio=1.0,
                                  queue_size=10000, batch_size=256))
    recs = varied_records(1000, seed=99, shapes=10)
    for r in recs:
        tracer.offer(r)
    while tracer.queued:
        assert tracer._send_batch()
    assert tracer.exported == 1000 and tracer.encoder.fast > 800, tracer.encoder.fast
    got = {s.span_id: s for s in receiver.spans}
    want = decoded_spans(SpanEncoder("forkproxy").encode_slow(recs))["spans"]
    assert set(got) == set(want)
    for span_id, w in want.items():
        assert got[span_id].ListFields() == w.ListFields()


def test_sampled_requests_are_gathered_then_written_and_all_exported(receiver):
    """At a low ratio a batch of records holds one or two sampled requests: they wait
    (counted in the queue) until ENCODE_AT are there, or until the export, which writes
    and sends them too; disabling export counts the waiting ones as dropped."""
    from forkproxy.config import TracingConfig
    from forkproxy.manager.tracing import ENCODE_AT, Tracer

    cfg = TracingConfig(endpoint=receiver.url, sample_ratio=1.0, queue_size=10000)
    tracer = Tracer(cfg)
    recs = varied_records(ENCODE_AT + 3, seed=5, shapes=4)
    tracer.offer_batch(recs[:ENCODE_AT - 1])
    assert (tracer.queued, len(tracer.pending), tracer.encoder.count) == (
        ENCODE_AT - 1, ENCODE_AT - 1, 0)
    tracer.offer_batch(recs[ENCODE_AT - 1:ENCODE_AT])
    assert (tracer.queued, len(tracer.pending), tracer.encoder.count) == (
        ENCODE_AT, 0, ENCODE_AT)
    tracer.offer_batch(recs[ENCODE_AT:])
    assert (tracer.queued, len(tracer.pending)) == (ENCODE_AT + 3, 3)
    while tracer.queued:
        assert tracer._send_batch()
    assert tracer.exported == ENCODE_AT + 3 and not tracer.pending
    assert len(receiver.server_spans()) == ENCODE_AT + 3
    tracer.offer_batch(recs[:5])
    tracer.configure(TracingConfig(endpoint=""))
    assert (tracer.queued, tracer.pending, tracer.dropped_export) == (0, [], 5)


def test_a_busy_shapes_spans_are_the_same_from_the_builder_and_the_template(
        proxies, tmp_path, origin, receiver):
    """Through a real proxy: a shape's first MAKE_AFTER - 1 requests are encoded by the
    protobuf builder, the rest from its template; decoded by the receiver, all of them
    have the same structure (names, kinds, status, attributes but the path, phase spans
    and their parents) and consistent times."""
    from forkproxy.manager.spantemplate import MAKE_AFTER

    p = traced_proxy(proxies, tmp_path, origin, receiver.url)
    n = MAKE_AFTER * 3
    with connect(p.port) as c:
        for i in range(n):
            c.sendall(f"GET /tiny?n={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert recv_response(c)[0] == 200
    spans = wait_for(lambda: len(receiver.server_spans()) == n and receiver.server_spans(),
                     timeout=15, what="every request's span")

    def structure(span) -> tuple:
        a = attrs(span)
        assert a.pop("url.path") == "/tiny"  # the query is no part of url.path
        assert a.pop("url.query").startswith("n=")
        assert span.start_time_unix_nano <= span.end_time_unix_nano
        kids = receiver.children_of(span.span_id)
        for kid in kids.values():
            assert kid.trace_id == span.trace_id
            assert span.start_time_unix_nano <= kid.start_time_unix_nano
            assert kid.start_time_unix_nano <= kid.end_time_unix_nano <= span.end_time_unix_nano
        return (span.name, span.kind, span.status, sorted(a.items()),
                sorted((k, v.kind, sorted(attrs(v).items())) for k, v in kids.items()))

    wait_for(lambda: sum(len(receiver.children_of(s.span_id)) for s in spans) >= 4 * n,
             timeout=10, what="the phase spans")
    shapes = [repr(structure(s)) for s in spans]
    # the connection's first request connected upstream; all the others are alike
    counts = sorted(collections.Counter(shapes).values())
    assert counts in ([n], [1, n - 1]), counts


@pytest.mark.skipif(not idmod.COMPILED, reason="plain-Python job: no C id generator built")
def test_compiled_new_trace_makes_the_bytes_of_the_python_one():
    # http/ids.py compiled (the worker's) against the same file run as Python, from
    # the same sequence state, at every kind of threshold (all, some, none sampled)
    pure = pure_twin(idmod)
    ids, py_ids = idmod.IdGenerator(), pure.IdGenerator()
    py_ids.high, py_ids.high_hex = ids.high, ids.high_hex
    thresholds = (tc.ratio_threshold(1.0), tc.ratio_threshold(0.5), 0, 1, (1 << 64) - 1)
    for i in range(5000):
        threshold = thresholds[i % len(thresholds)]
        got = ids.new_trace(threshold)
        trace_id = got[0][0]
        py_ids._next = (int.from_bytes(trace_id[8:], "big") - pure._STEP) % (1 << 64)
        assert got == py_ids.new_trace(threshold), i


def test_request_ids_are_a_worker_prefix_and_a_hex_counter():
    ids, other = idmod.RequestIds(), idmod.RequestIds()
    first = [ids.next() for _ in range(1000)]
    assert first[0][8:] == b"00000001" and first[-1][8:] == b"000003e8"
    assert all(len(r) == 16 and r[:8] == ids.prefix and re.fullmatch(rb"[0-9a-f]{16}", r)
               for r in first)
    assert ids.prefix != other.prefix  # random per worker
    ids.count = 0xFFFFFFFF  # past 2**32 the counter takes more digits, never wraps
    assert ids.next() == ids.prefix + b"100000000"
    if idmod.COMPILED:  # the C writer makes the bytes of the Python format
        pure = pure_twin(idmod).RequestIds()
        pure.prefix = ids.prefix
        for count in (0, 9, 0xF, 0x10, 0xABCDEF, 0xFFFFFFFE, 1 << 40, (1 << 64) - 2):
            ids.count = pure.count = count
            assert ids.next() == pure.next(), count
