"""Monitoring shipped with forkproxy: the Prometheus rules (promtool check and unit tests),
the recording rules evaluated by a real Prometheus scraping a running forkproxy, and every
query of the Grafana dashboard run against that Prometheus."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import urllib.request

import pytest
from fp import ROOT, Client, Origin, Proxy, free_port, recv_response, wait_for
from otlputil import Receiver
from promutil import Prometheus
from tlsutil import Pki, Responder

RULES = os.path.join(ROOT, "etc", "prometheus", "forkproxy-rules.yml")
RULE_TESTS = os.path.join(ROOT, "etc", "prometheus", "forkproxy-rules.test.yml")
DASHBOARD = os.path.join(ROOT, "etc", "grafana", "forkproxy.json")
#: one request in ERROR_EVERY is answered 500 by the origin
ERROR_EVERY = 4


def test_promtool_check_rules():
    p = subprocess.run(["promtool", "check", "rules", RULES], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout


def test_promtool_unit_tests_cover_every_alert():
    p = subprocess.run(["promtool", "test", "rules", RULE_TESTS], capture_output=True,
                       text=True, cwd=os.path.dirname(RULE_TESTS))
    assert p.returncode == 0, p.stdout + p.stderr
    with open(RULES) as f:
        alerts = set(re.findall(r"^\s*- alert: (\w+)", f.read(), re.M))
    with open(RULE_TESTS) as f:
        tested = set(re.findall(r"^\s*alertname: (\w+)", f.read(), re.M))
    assert alerts and alerts == tested, f"alerts without unit tests: {alerts - tested}"


class Traffic(threading.Thread):
    """HTTPS keep-alive clients resuming their TLS sessions; every ERROR_EVERY-th request
    is a 500 from the origin."""

    def __init__(self, port: int, ca: str):
        super().__init__(daemon=True)
        self.port = port
        self.ctx = ssl.create_default_context(cafile=ca)
        self.ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # sessions resumable at once
        self.stop_event = threading.Event()
        self.sent = 0
        self.errors: list[str] = []

    def run(self) -> None:
        session = None
        while not self.stop_event.is_set():
            try:
                raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                s = self.ctx.wrap_socket(raw, server_hostname="localhost", session=session)
                c = Client.__new__(Client)
                c.sock, c.buf = s, b""
                with c:
                    for i in range(ERROR_EVERY):
                        path = "/status/500" if i == 0 else "/tiny"
                        c.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
                        recv_response(c)
                        self.sent += 1
                    session = s.session
            except OSError as e:
                self.errors.append(repr(e))
            self.stop_event.wait(0.02)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Origin, OCSP responder, OTLP receiver, forkproxy (TLS listener, max_worker_rss,
    span export, a second upstream "spare" whose only server is down under active health
    checks), traffic, and a Prometheus scraping the admin endpoint every
    second with the shipped rules."""
    d = tmp_path_factory.mktemp("monitoring")
    (d / "pki").mkdir()
    pki = Pki.create(d / "pki")
    responder = Responder(pki)
    pki.issue_leaves(responder.url)
    origin = Origin()
    receiver = Receiver()
    leaf = pki.leaves["ec"]
    proxy = Proxy(d, {"app": [origin.address], "spare": [f"127.0.0.1:{free_port()}"]},
                  workers=2, admin=True, start=False,
                  server_extra='max_worker_rss = "1g"',
                  upstream_extra='health_check = { interval = "250ms", timeout = "250ms", '
                                 'fall = 1, rise = 1 }',
                  extra=f'[tracing]\nendpoint = "{receiver.url}"\nsample_ratio = 1.0\n'
                        'export_interval = "200ms"\n',
                  listener_extra=f'[listener.tls]\ncertificates = [{{ cert = "{leaf.cert_path}", '
                                 f'key = "{leaf.key_path}" }}]\nocsp_retry = "1s"\n')
    traffic = prom = None
    try:
        proxy.start()
        traffic = Traffic(proxy.port, str(pki.ca_path))
        traffic.start()
        prom = Prometheus(str(d), [f"127.0.0.1:{proxy.admin_port}"], [RULES])
        wait_for(prom.targets_up, timeout=30, interval=0.5, what="the scrape target up")
        yield proxy, prom, traffic
    finally:
        if traffic is not None:
            traffic.stop_event.set()
            traffic.join(15)
        if prom is not None:
            prom.stop()
        proxy.stop()
        proxy.kill_all()
        origin.stop()
        responder.stop()
        receiver.stop()


def one_value(prom: Prometheus, expr: str) -> float | None:
    result = prom.query(expr)
    if len(result) != 1:
        return None
    v = float(result[0]["value"][1])
    return None if v != v else v


def admin_metrics(proxy) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin_port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_recording_rules_in_a_real_prometheus(stack):
    proxy, prom, traffic = stack
    ratio = wait_for(lambda: one_value(prom, "forkproxy:requests_5xx:ratio_rate1m"),
                     timeout=60, interval=0.5, what="the 5xx ratio recorded")
    assert abs(ratio - 1 / ERROR_EVERY) < 0.08, ratio
    assert traffic.sent > 0 and not traffic.errors, traffic.errors

    # worker RSS over max_worker_rss (1 GiB), per worker, as /metrics shows it
    rows = wait_for(lambda: prom.query("forkproxy:worker_rss:ratio") if len(
        prom.query("forkproxy:worker_rss:ratio")) == 2 else None, timeout=30, interval=0.5,
        what="two workers' RSS ratios")
    rss = {m["metric"]["pid"]: float(m["value"][1]) * (1 << 30) for m in rows}
    text = admin_metrics(proxy)
    for pid, value in rss.items():
        m = re.search(rf'^forkproxy_worker_resident_bytes{{pid="{pid}"}} (\d+)$', text, re.M)
        assert m, pid
        assert abs(int(m.group(1)) - value) < 16 << 20, (pid, value, m.group(1))

    assert one_value(prom, 'forkproxy:upstream_servers_available{upstream="app"}') == 1
    assert one_value(prom, "forkproxy:ring_dropped:rate5m") == 0
    resumed = wait_for(lambda: one_value(prom, "forkproxy:tls_resumption:ratio_rate5m"),
                       timeout=30, interval=0.5, what="the TLS resumption ratio")
    assert 0.5 < resumed <= 1.0, resumed  # every connection after the first resumes
    p99 = wait_for(lambda: prom.query('forkproxy:phase_duration_seconds:p99_5m'
                                      '{phase="upstream_first_byte"}'),
                   timeout=30, interval=0.5, what="the phase p99")
    assert 0 < float(p99[0]["value"][1]) < 1.0
    # the new gauges: the test CA's leaf expires within a day, the staple is fresh
    left = one_value(prom, "forkproxy_tls_certificate_expiry_seconds - time()")
    assert left is not None and 0 < left < 2 * 86400
    wait_for(lambda: (one_value(prom, "forkproxy_tls_ocsp_staple_expiry_seconds - time()")
                      or 0) > 0, timeout=30, interval=0.5, what="an OCSP staple")
    assert one_value(prom, "forkproxy_config_last_reload_successful") == 1


def test_alerts_fire_in_a_real_prometheus(stack):
    """The leaf certificate of the test CA expires within a day, and upstream "spare"
    has no server up (for 30 s): both alerts fire; "app"'s does not."""
    _, prom, _ = stack

    def firing():
        return {(a["metric"]["alertname"], a["metric"].get("upstream", ""))
                for a in prom.query('ALERTS{alertstate="firing"}')}

    names = wait_for(lambda: ("ForkproxyUpstreamAllServersDown", "spare") in firing()
                     and firing(), timeout=120, interval=1, what="the upstream alert firing")
    assert ("ForkproxyCertificateExpiringSoon", "") in names, names
    assert ("ForkproxyUpstreamAllServersDown", "app") not in names, names
    assert not any(n == "ForkproxyRingRecordsDropped" for n, _ in names), names


def dashboard_queries() -> list[tuple[str, str]]:
    with open(DASHBOARD) as f:
        dash = json.load(f)
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            out.append((panel["title"], target["expr"]))
    return out


def grafana_expand(expr: str) -> str:
    """What Grafana sends for the dashboard's variables with "All" selected."""
    return (expr.replace("$__rate_interval", "1m").replace('"$instance"', '".*"')
            .replace('"$phase"', '".*"'))


def test_dashboard_covers_what_the_issue_asks():
    titles = " | ".join(t for t, _ in dashboard_queries()).lower()
    for needed in ("request rate by code", "phase", "upstream", "resident memory", "cpu",
                   "resumption", "ring records dropped"):
        assert needed in titles, needed


#: dashboard queries whose series stay at 0 in this test, and why (the others must show
#: a value above 0: the traffic drives them)
ZERO_IN_THIS_TEST = {
    'sum(rate(forkproxy_ring_dropped_total{instance=~"$instance"}[$__rate_interval]))':
        "no ring overflows: the rings hold bursts far above this traffic (the alert's "
        "unit tests in forkproxy-rules.test.yml feed it drops)",
    'sum by (reason) (increase(forkproxy_worker_recycles_total{instance=~"$instance"}'
    '[$__rate_interval]))':
        "no worker passes max_worker_rss (1 GiB) or misses heartbeats here; "
        "tests/test_recycle.py drives a recycle",
    'sum by (reason) (rate(forkproxy_trace_spans_dropped_total{instance=~"$instance"}'
    '[$__rate_interval]))':
        "the OTLP receiver is up; tests/test_tracing.py counts drops with it down or slow",
}


def test_every_dashboard_query_returns_series(stack):
    """Each panel's every query, as Grafana sends it, succeeds in the real Prometheus and
    returns series; those the traffic drives (requests and errors, phases, upstream
    health up and down, RSS, CPU, TLS resumption, span export) have a value above 0."""
    proxy, prom, _ = stack
    proxy.send(signal.SIGHUP)  # a successful reload, for the reloads panel
    wait_for(lambda: reload_metrics(proxy)[0] == 1, what="the reload counted")
    with open(DASHBOARD) as f:
        for var in json.load(f)["templating"]["list"]:
            if var["type"] == "query":
                metric = re.match(r"label_values\((\w+), (\w+)\)", var["query"])
                assert metric and prom.query(metric.group(1)), var["query"]
    queries = dashboard_queries()
    assert set(ZERO_IN_THIS_TEST) <= {e for _, e in queries}, "a stale exemption"

    def positive(result) -> bool:
        return any(float(r["value"][1]) > 0 for r in result)

    # rate() windows need two scrapes of every counter first: wait for each
    for title, expr in queries:
        expanded = grafana_expand(expr)
        if expr in ZERO_IN_THIS_TEST:
            wait_for(lambda e=expanded: prom.query(e), timeout=30, interval=0.5,
                     what=f"series for panel {title!r}: {expr}")
        else:
            wait_for(lambda e=expanded: positive(prom.query(e)), timeout=60, interval=0.5,
                     what=f"a value above 0 for panel {title!r}: {expr}")
    # the panels that tell things apart show both sides
    codes = {r["metric"]["code"] for r in prom.query(grafana_expand(queries[0][1]))}
    assert {"200", "500"} <= codes, codes
    wait_for(lambda: {(r["metric"]["upstream"], r["metric"]["state"]) for r in
                      prom.query("forkproxy_upstream_server_state == 1")}
             >= {("app", "up"), ("spare", "down")}, timeout=30, interval=0.5,
             what="app's server up and spare's down")
    available = {r["metric"]["upstream"]: float(r["value"][1])
                 for r in prom.query("forkproxy:upstream_servers_available")}
    assert available == {"app": 1.0, "spare": 0.0}, available


def reload_metrics(proxy) -> tuple[int, int, int]:
    text = admin_metrics(proxy)
    ok, failed, last = (re.search(pattern, text, re.M) for pattern in (
        r'^forkproxy_config_reloads_total{result="success"} (\d+)$',
        r'^forkproxy_config_reloads_total{result="failure"} (\d+)$',
        r"^forkproxy_config_last_reload_successful (\d+)$"))
    return int(ok.group(1)), int(failed.group(1)), int(last.group(1))


def test_reload_results_are_counted(proxies, origin, tmp_path):
    p = proxies(tmp_path, origin.address, admin=True)
    assert reload_metrics(p) == (0, 0, 1)
    good = p.config_text()
    p.write_config(good + "\n[server.nonsense]\n")
    p.send(signal.SIGHUP)
    wait_for(lambda: reload_metrics(p) == (0, 1, 0), what="the failed reload counted")
    p.write_config(good)
    p.send(signal.SIGHUP)
    wait_for(lambda: reload_metrics(p) == (1, 1, 1), what="the good reload counted")
