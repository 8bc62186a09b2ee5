"""The critical-path report: its arithmetic on synthetic request contexts, and a real proxy
in front of an origin whose /slow body and /sleep first byte dominate their routes, read
through GET /debug/phases and the `forkproxy phases` verb."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import urllib.request

import pytest
from fp import PY, ROOT, connect, recv_response, wait_for
from test_manager_unit import ctx

from forkproxy.context import RequestContext
from forkproxy.manager import phases
from forkproxy.manager.metrics import Metrics


def with_route(c: RequestContext, route: str) -> RequestContext:
    c.route = route
    return c


def test_report_moments_weights_and_model():
    m = Metrics()
    first = [0.010, 0.020, 0.030, 0.040, 0.100]
    for i, fb in enumerate(first):
        m.observe(with_route(ctx(rid=f"r{i}", first_byte=fb, body=0.002 * (i + 1),
                                 connect=0.001, t0=1000.0 + i), "* /api"))
    m.observe(with_route(ctx(rid="pooled", first_byte=0.05, reused=True), "* /api"))
    rep = phases.report(m)
    [g] = rep["groups"]
    assert (g["route"], g["upstream"], g["requests"]) == ("* /api", "app", 6)
    rows = {r["phase"]: r for r in g["phases"]}
    fb_values = [*first, 0.05]
    assert rows["upstream_first_byte"]["mean"] == pytest.approx(statistics.fmean(fb_values))
    assert rows["upstream_first_byte"]["stddev"] == pytest.approx(statistics.pstdev(fb_values))
    # the pooled request has no connect: it counts 0 towards the per-request mean
    assert rows["upstream_connect"]["count"] == 5
    assert rows["upstream_connect"]["mean"] == pytest.approx(0.005 / 6)
    for r in rows.values():
        assert r["weight"] == pytest.approx(r["mean"] + 2 * r["stddev"])
    assert g["critical_path"][0] == "upstream_first_byte"
    assert {r["phase"] for r in g["phases"] if r["heaviest"]} == set(g["critical_path"])
    assert len(g["critical_path"]) == 3
    chain = [rows[p] for p in phases.CHAIN if p in rows]
    model = (sum(r["mean"] for r in chain)
             + 2.33 * math.sqrt(sum(r["stddev"] ** 2 for r in chain)))
    assert g["model_p99"] == pytest.approx(model)
    assert 0.1 < g["measured_p99"] <= 0.25  # the slowest (0.112 s) is in the (0.1, 0.25] bucket
    text = phases.render(rep)
    assert "route * /api  upstream app  requests 6" in text
    assert "P99 model" in text


@pytest.fixture
def slow_proxy(proxies, origin, tmp_path):
    return proxies(tmp_path, origin.address, admin=True, extra=(
        '[[route]]\npath_prefix = "/slow"\nupstream = "app"\n'
        '[[route]]\npath_prefix = "/sleep"\nupstream = "app"\n'
        '[[route]]\npath_prefix = "/"\nupstream = "app"\n'))


def test_phases_report_finds_the_dominant_phase_per_route(slow_proxy):
    p = slow_proxy
    with connect(p.port) as c:
        for i in range(12):
            for path in ("/slow/50", "/sleep/30", "/tiny"):
                c.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert recv_response(c)[0] == 200, (i, path)

    def report():
        url = f"http://127.0.0.1:{p.admin_port}/debug/phases"
        with urllib.request.urlopen(url, timeout=10) as r:
            rep = json.load(r)
        return rep if sum(g["requests"] for g in rep["groups"]) >= 36 else None

    rep = wait_for(report, timeout=10, what="36 requests in the report")
    groups = {g["route"]: g for g in rep["groups"]}
    assert set(groups) == {"* /slow", "* /sleep", "* /"}
    slow, sleep = groups["* /slow"], groups["* /sleep"]
    assert slow["critical_path"][0] == "response_body"
    assert sleep["critical_path"][0] == "upstream_first_byte"
    body = {r["phase"]: r for r in slow["phases"]}["response_body"]
    assert 0.04 <= body["mean"] < 0.5 and body["p99"] >= 0.04
    # the model's P99 and the measured one agree roughly when one phase dominates
    for g in (slow, sleep):
        assert g["model_p99"] == pytest.approx(g["measured_p99"], rel=0.5), g
        assert g["measured_mean"] <= g["measured_p99"]

    out = subprocess.run([PY, "-m", "forkproxy", "phases", "-c", p.conf], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    at = lines.index("route * /slow  upstream app  requests 12")
    marked = [line.split()[0] for line in lines[at + 2:at + 9] if line.endswith(" *")]
    assert marked[0] == "response_body" or "response_body" in marked
    assert "P99 model" in out.stdout
    js = subprocess.run([PY, "-m", "forkproxy", "phases", "-c", p.conf, "--json"], cwd=ROOT,
                        capture_output=True, text=True, timeout=30)
    assert js.returncode == 0 and json.loads(js.stdout)["groups"]
