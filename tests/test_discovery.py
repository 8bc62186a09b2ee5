"""Servers from DNS (issue 15, point 4), against a real dnsmasq on loopback.

The proxy is a real forked master with workers and a manager; the origins are the
built-in origin on 127.0.0.2 and 127.0.0.3; the records change by rewriting dnsmasq's
addn-hosts file and sending it SIGHUP.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

import gevent
import pytest
from dnsutil import Dnsmasq, LoopbackOrigin
from fp import PY, ROOT, free_port, request, wait_for
from load import Load
from upstreams_util import UProxy, metric_value

from forkproxy import config as config_mod
from forkproxy.context import WEIGHT_SCALE
from forkproxy.manager.discovery import Discovery, Source
from forkproxy.shm.resolved import ResolvedTable
from forkproxy.worker.upconn import UpstreamConn
from forkproxy.worker.upstream import Upstream

RESOLVE = 1.0  # seconds: the resolve interval of these tests


@pytest.fixture
def cleanup():
    """Things with a stop() method, stopped (by pid) at the end of the test."""
    items = []
    yield items.append
    for item in reversed(items):
        item.stop()


def two_origins(cleanup) -> tuple[LoopbackOrigin, LoopbackOrigin]:
    port = free_port()
    a, b = LoopbackOrigin("127.0.0.2", port), None
    cleanup(a)
    b = LoopbackOrigin("127.0.0.3", port)
    cleanup(b)
    return a, b


def dns_proxy(tmp_path, proxies_started, dns: Dnsmasq, servers: str, upstream: str = "",
              **kw) -> UProxy:
    """A proxy whose upstream "app" has ``servers`` (``upstream``: more of its keys)."""
    p = UProxy(tmp_path, f"""
        [resolver]
        nameservers = ["{dns.nameserver}"]
        timeout = "500ms"

        [upstream.app]
        servers = [{servers}]
        max_fails = 0
        {upstream}
        """, admin=True, start=False, **kw)
    proxies_started.append(p)
    p.start()
    return p


@pytest.fixture
def started():
    items: list[UProxy] = []
    yield items
    for p in items:
        p.kill_all()


def test_record_added_then_removed_under_load(tmp_path, cleanup, started):
    a, b = two_origins(cleanup)
    dns = Dnsmasq(tmp_path, {"app.test": ["127.0.0.2"]})
    cleanup(dns)
    p = dns_proxy(tmp_path, started, dns,
                  f'{{ address = "app.test:{a.port}", resolve = "{RESOLVE:g}s" }}', workers=2)
    # the master resolved before forking the workers: every worker serves at once
    assert [request(p.port, "GET", "/tiny")[0] for _ in range(20)] == [200] * 20
    primed = [e for e in p.log_events() if e.get("event") == "DNS servers changed"]
    assert primed[0]["process"] == "master"
    load = Load(p.port, keepalive_threads=3, close_threads=1).start()
    try:
        wait_for(lambda: a.proxied() > 50, timeout=20, what="load reaching 127.0.0.2")
        assert b.proxied() == 0
        # added: traffic reaches 127.0.0.3 within two resolve intervals
        t_add = dns.set_hosts({"app.test": ["127.0.0.2", "127.0.0.3"]})
        wait_for(lambda: b.proxied() > 0, timeout=10, interval=0.02, what="traffic to the new server")
        reached = time.monotonic() - t_add
        print(f"new server reached {reached:.3f}s after the record was added")
        assert reached <= 2 * RESOLVE
        before = a.proxied()
        wait_for(lambda: b.proxied() > 100, timeout=20, what="load on both servers")
        assert a.proxied() > before  # both take load
        status = p.status()["upstreams"]["app"]
        [entry] = status["dns"]
        assert sorted(s["address"] for s in entry["servers"]) == [
            f"127.0.0.2:{a.port}", f"127.0.0.3:{a.port}"]
        assert {s["address"] for s in status["servers"]} == {
            f"127.0.0.2:{a.port}", f"127.0.0.3:{a.port}"}
        # removed: 127.0.0.3 drains and gets nothing new after two resolve intervals
        t_del = dns.set_hosts({"app.test": ["127.0.0.2"]})
        time.sleep(max(0.0, t_del + 2 * RESOLVE - time.monotonic()))
        drained = b.proxied()
        busy = a.proxied()
        wait_for(lambda: a.proxied() > busy + 100, timeout=20, what="load after the removal")
        assert b.proxied() == drained, "the removed server still got requests"
    finally:
        result = load.stop()
    print(result.summary())
    assert result.failed == 0, result.errors
    assert result.ok > 500
    metrics = p.metrics()
    name = f"app.test:{a.port}"
    assert metric_value(metrics, "forkproxy_dns_resolutions_total", upstream="app", dns_name=name,
                        result="ok") >= 3
    assert metric_value(metrics, "forkproxy_upstream_dns_servers", upstream="app",
                        dns_name=name) == 1
    changes = [e for e in p.log_events() if e.get("event") == "DNS servers changed"]
    assert [e["added"] for e in changes] == [[f"127.0.0.2:{a.port}"], [f"127.0.0.3:{a.port}"], []]
    assert changes[-1]["removed"] == [f"127.0.0.3:{a.port}"]


def entry_status(p: UProxy, name: str) -> dict:
    for e in p.status()["upstreams"]["app"]["dns"]:
        if e["name"] == name:
            return e
    raise KeyError(name)


def test_failure_keeps_the_last_set_and_bad_answers_are_logged(tmp_path, cleanup, started):
    a, b = two_origins(cleanup)
    dns = Dnsmasq(tmp_path, {"app.test": ["127.0.0.2", "127.0.0.3"]},
                  ['txt-record=txtonly.test,"no addresses here"',
                   "srv-host=_http._tcp.gone.test"])  # no target: SRV with target "."
    cleanup(dns)
    port = a.port
    p = dns_proxy(tmp_path, started, dns, ", ".join([
        f'{{ address = "app.test:{port}", resolve = "1s" }}',
        f'{{ address = "nope.test:{port}", resolve = "1s" }}',
        f'{{ address = "txtonly.test:{port}", resolve = "1s" }}',
        '{ srv = "_http._tcp.gone.test", resolve = "1s" }']))
    manager = p.manager_pid()
    expected = {f"nope.test:{port}": "nxdomain", f"txtonly.test:{port}": "no_records",
                "srv:_http._tcp.gone.test": "malformed"}
    for name, result in expected.items():
        wait_for(lambda n=name, r=result: entry_status(p, n)["last_result"] == r, timeout=10,
                 what=f"{name}: {result}")
    failures = {e["name"]: e for e in p.log_events()
                if e.get("event") == "DNS resolution failed: keeping the last servers"}
    for name, result in expected.items():
        assert failures[name]["result"] == result and failures[name]["detail"]
        assert entry_status(p, name)["servers"] == []
    wait_for(lambda: len(entry_status(p, f"app.test:{port}")["servers"]) == 2, timeout=10,
             what="both servers resolved")
    counts = (a.proxied(), b.proxied())
    wait_for(lambda: request(p.port, "GET", "/tiny")[0] == 200 and a.proxied() > counts[0]
             and b.proxied() > counts[1], timeout=10, what="both servers serving")
    # the DNS server goes away: the last set stays, and so does the traffic to both
    dns.stop()
    wait_for(lambda: entry_status(p, f"app.test:{port}")["last_result"]
             in ("timeout", "nameservers_failed"), timeout=10, what="resolution failing")
    counts = (a.proxied(), b.proxied())
    statuses = [request(p.port, "GET", "/tiny")[0] for _ in range(40)]
    assert statuses == [200] * 40
    assert a.proxied() > counts[0] and b.proxied() > counts[1]
    entry = entry_status(p, f"app.test:{port}")
    assert len(entry["servers"]) == 2
    assert entry["resolutions"]["timeout"] + entry["resolutions"]["nameservers_failed"] >= 1
    kept = [e for e in p.log_events() if e.get("event") == "DNS resolution failed: keeping "
            "the last servers" and e.get("name") == f"app.test:{port}"]
    assert kept and kept[-1]["servers"] == 2
    assert p.manager_pid() == manager  # nothing crashed


def test_srv_weights_and_priorities(tmp_path, cleanup, started):
    port_a, port_b, port_c = free_port(), free_port(), free_port()
    a = LoopbackOrigin("127.0.0.2", port_a)
    cleanup(a)
    b = LoopbackOrigin("127.0.0.3", port_b)
    cleanup(b)
    c = LoopbackOrigin("127.0.0.4", port_c)
    cleanup(c)
    dns = Dnsmasq(tmp_path, {}, [
        "host-record=a.test,127.0.0.2", "host-record=b.test,127.0.0.3",
        "host-record=c.test,127.0.0.4",
        f"srv-host=_http._tcp.svc.test,a.test,{port_a},0,10",
        f"srv-host=_http._tcp.svc.test,b.test,{port_b},0,30",
        f"srv-host=_http._tcp.svc.test,c.test,{port_c},1,100"])  # a backup priority
    cleanup(dns)
    p = dns_proxy(tmp_path, started, dns, '{ srv = "_http._tcp.svc.test", resolve = "1s" }',
                  workers=1)
    wait_for(lambda: len(entry_status(p, "srv:_http._tcp.svc.test")["servers"]) == 2,
             timeout=10, what="SRV resolved")
    entry = entry_status(p, "srv:_http._tcp.svc.test")
    assert entry["type"] == "SRV"
    assert sorted((s["address"], s["weight"]) for s in entry["servers"]) == [
        (f"127.0.0.2:{port_a}", 10), (f"127.0.0.3:{port_b}", 30)]
    wait_for(lambda: request(p.port, "GET", "/tiny")[0] == 200, timeout=10,
             what="workers following the SRV set")
    base = (a.proxied(), b.proxied())
    statuses = [request(p.port, "GET", "/tiny")[0] for _ in range(200)]
    assert statuses == [200] * 200
    got = (a.proxied() - base[0], b.proxied() - base[1])
    assert got == (50, 150), got  # one worker, smooth weighted round robin: exactly 10:30
    assert c.proxied() == 0  # priority 1 is not used while priority 0 has targets


# -- the manager's resolver does not block its hub ------------------------------------------


def blackhole_config(port: int, timeout: str = "1s") -> config_mod.Config:
    return config_mod.loads(f"""
        [[listener]]
        listen = "127.0.0.1:1"
        upstream = "app"
        [upstream.app]
        servers = [{{ address = "app.test:9000", resolve = "1s" }}]
        [resolver]
        nameservers = ["127.0.0.1:{port}"]
        timeout = "{timeout}"
        """)


def max_hub_stall(discovery: Discovery, src: Source) -> tuple[float, str]:
    """(longest gap beyond a 5 ms tick, result) while one resolution runs in a greenlet."""
    worst = 0.0
    done = False

    def tick():
        nonlocal worst
        while not done:
            t0 = time.monotonic()
            gevent.sleep(0.005)
            worst = max(worst, time.monotonic() - t0 - 0.005)

    ticker = gevent.spawn(tick)
    gevent.sleep(0.02)
    answer = gevent.spawn(discovery.resolve_once, src).get()
    done = True
    ticker.join()
    return worst, answer.result


def test_a_nameserver_that_never_answers_does_not_stall_the_hub():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:  # takes queries, never answers
        hole.bind(("127.0.0.1", 0))
        cfg = blackhole_config(hole.getsockname()[1])
        table = ResolvedTable(4)
        table.assign(cfg)
        pooled = Discovery(cfg, table)
        stall, result = max_hub_stall(pooled, pooled.sources[0])
        print(f"hub stall while resolving in the thread pool: {stall * 1000:.1f} ms")
        assert result == "timeout"
        # a few ms when the machine is quiet; the bound leaves room for a busy scheduler
        # and is still half of what resolving on the hub costs (the whole 1 s timeout)
        assert stall < 0.5
        # the same resolution called on the hub blocks it for the whole timeout: the
        # measurement above would see it
        inline = Discovery(cfg, table, run_blocking=lambda fn, args: fn(*args))
        stall, result = max_hub_stall(inline, inline.sources[0])
        print(f"hub stall when resolving on the hub itself: {stall * 1000:.1f} ms")
        assert result == "timeout" and stall > 0.5


# -- the shared table and a worker following it -----------------------------------------------

CHECK_BASE = """
[[listener]]
listen = "127.0.0.1:1"
upstream = "app"
"""


def test_resolved_table_keeps_known_slots_reclaims_when_full_and_says_so():
    table = ResolvedTable(2)
    assert table.assign_keys([1, 2]) == 2
    slots = table.index()
    table.publish(slots[2], [("127.0.0.9", 9001, 3)])
    assert table.assign_keys([2, 3]) == 2  # full: key 1's slot goes to key 3
    after = table.index()
    assert set(after) == {2, 3} and after[2] == slots[2] and after[3] == slots[1]
    assert table.read(after[2])[1] == [("127.0.0.9", 9001, 3)]  # kept with its servers
    assert table.read(after[3])[1] == []  # a fresh slot starts empty
    with pytest.raises(RuntimeError, match="resolved-servers table full"):
        table.assign_keys([4, 5, 6])


def test_seqlock_readers_never_see_a_torn_set():
    table = ResolvedTable(2)
    table.assign_keys([1])
    many = [(f"10.0.{i // 250}.{i % 250 + 1}", 8000 + i, i + 1) for i in range(64)]
    few = [("::1", 9000, 7), ("127.0.0.9", 9001, 3)]
    table.publish(0, few)
    pid = os.fork()
    if pid == 0:  # the writer: alternate the two sets as fast as it can
        try:
            while True:
                table.publish(0, many)
                table.publish(0, few)
        finally:
            os._exit(0)
    try:
        reads = retries = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            got = table.read(0)
            if got is None:
                retries += 1
                continue
            reads += 1
            assert got[1] in (many, few)
        print(f"{reads} consistent reads, {retries} gave up on a busy slot")
        assert reads > 1000
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def table_and_upstream(upstream_section: str, start_set=()) -> tuple[ResolvedTable, int, Upstream]:
    """A shared table for one upstream whose "app.test:9000" entry resolves; the worker's
    Upstream is built after start_set was published (as the master's first resolution)."""
    cfg = config_mod.loads(CHECK_BASE + "[upstream.app]\n" + upstream_section)
    table = ResolvedTable(4)
    table.assign(cfg)
    slot = table.find("app", "app.test:9000")
    if start_set:
        table.publish(slot, list(start_set))
    return table, slot, Upstream("app", cfg.upstream["app"], None, table)


def test_a_worker_swaps_in_new_servers_and_drains_vanished_ones():
    table, slot, up = table_and_upstream(
        'servers = [{ address = "127.0.0.1:7000" },\n'
        '           { address = "app.test:9000", resolve = "1s", weight = 2 }]\n')
    assert [s.address for s in up.servers] == ["127.0.0.1:7000"] and up.single
    table.publish(slot, [("127.0.0.2", 9000, 2), ("127.0.0.3", 9000, 2)])
    up.refresh(time.monotonic())
    assert [s.address for s in up.servers] == ["127.0.0.1:7000", "127.0.0.2:9000",
                                               "127.0.0.3:9000"]
    assert not up.single and up.total_weight == 5
    kept, leaving = up.servers[1], up.servers[2]
    idle_a, idle_b = socket.socketpair()
    lent_a, lent_b = socket.socketpair()
    leaving.idle.append(UpstreamConn(idle_a, leaving))
    lent = UpstreamConn(lent_a, leaving)
    leaving.active += 1  # an exchange in flight on the server about to vanish
    table.publish(slot, [("127.0.0.2", 9000, 2)])
    up.refresh(time.monotonic())
    assert up.servers == [up.servers[0], kept]  # the survivor keeps its pool and state
    assert not leaving.usable and not leaving.idle and idle_a.fileno() == -1
    picked = {up.pick().address for _ in range(30)}
    assert picked == {"127.0.0.1:7000", "127.0.0.2:9000"}
    leaving.release(lent, reusable=True)  # the exchange ends: closed, not pooled
    assert lent_a.fileno() == -1 and not leaving.idle and leaving.active == 0
    for s in (idle_b, lent_b):
        s.close()
    before = table.seq(slot)
    up.refresh(time.monotonic())  # nothing moved: nothing read
    assert table.seq(slot) == before and up.servers[1] is kept


def test_a_server_found_later_slow_starts():
    table, slot, up = table_and_upstream(
        'servers = [{ address = "app.test:9000", resolve = "1s" }]\nslow_start = "10s"\n',
        [("127.0.0.2", 9000, 1)])
    [first] = up.servers
    now = time.monotonic()
    table.publish(slot, [("127.0.0.2", 9000, 1), ("127.0.0.3", 9000, 1)])
    up.refresh(now + 1.0)
    new = up.servers[1]
    assert first.eff_weight == first.weight * WEIGHT_SCALE  # the start set: full weight
    assert 0 < new.eff_weight < new.weight * WEIGHT_SCALE  # found later: ramping
    up.refresh(now + 12.0)
    assert new.eff_weight == new.weight * WEIGHT_SCALE


@pytest.mark.parametrize("servers, extra, message", [
    ('{ address = "10.0.0.1:80", resolve = "30s" }', "",
     "upstream.app.servers[0].resolve: '10.0.0.1' is not a DNS name: nothing to resolve"),
    ('{ srv = "_http._tcp.app.internal" }', "",
     'upstream.app.servers[0].resolve: required with srv (e.g. "30s")'),
    ('{ srv = "_http._tcp.app.internal", resolve = "30s", weight = 5 }', "",
     "upstream.app.servers[0].weight: SRV records carry their own weights"),
    ('{ srv = "not a name", resolve = "30s" }', "",
     "upstream.app.servers[0].srv: expected a DNS name"),
    ('{ address = "a.internal:80", srv = "_x._tcp.a.internal", resolve = "30s" }', "",
     "upstream.app.servers[0].srv: give address or srv, not both"),
    ('{ weight = 2 }', "", "upstream.app.servers[0].address: required (or give srv)"),
    ('{ address = "a.internal:80", resolve = "100ms" }', "",
     "upstream.app.servers[0].resolve: must be at least 1s"),
    ('{ address = "a.internal:80", resolve = "soon" }', "",
     "upstream.app.servers[0].resolve: expected a duration"),
    ('{ address = "a.internal:80", resolve = "30s" }, { address = "a.internal:80", resolve = "5s" }',
     "", "upstream.app.servers[1]: 'a.internal:80' is listed twice"),
    ('{ address = "a.internal:80", resolve = "30s" }', '[resolver]\nnameservers = ["dns.internal"]',
     "resolver.nameservers[0]: expected an IP address with an optional port"),
    ('{ address = "a.internal:80", resolve = "30s" }', '[resolver]\nservers = ["127.0.0.1"]',
     "resolver.servers: unknown key"),
])
def test_check_names_the_key(tmp_path, servers, extra, message):
    conf = tmp_path / "bad.toml"
    conf.write_text(CHECK_BASE + f"[upstream.app]\nservers = [{servers}]\n" + extra)
    r = subprocess.run([PY, "-m", "forkproxy", "check", "-c", str(conf)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert message in r.stderr + r.stdout


def test_check_accepts_dns_servers(tmp_path):
    conf = tmp_path / "good.toml"
    conf.write_text(CHECK_BASE + """
[upstream.app]
servers = [{ address = "10.0.0.1:80" },
           { address = "app.internal:9000", resolve = "30s", weight = 2 },
           { srv = "_http._tcp.app.internal", resolve = "30s" }]
[resolver]
nameservers = ["127.0.0.1:53", "::1", "[::1]:5353"]
timeout = "1s"
""")
    r = subprocess.run([PY, "-m", "forkproxy", "check", "-c", str(conf)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_a_reload_keeps_the_servers_found(tmp_path, cleanup, started):
    """The new generation starts with the last good set, even when DNS is gone."""
    a, b = two_origins(cleanup)
    dns = Dnsmasq(tmp_path, {"app.test": ["127.0.0.2", "127.0.0.3"]})
    cleanup(dns)
    servers = f'{{ address = "app.test:{a.port}", resolve = "1s" }}'
    p = dns_proxy(tmp_path, started, dns, servers, workers=2)
    name = f"app.test:{a.port}"
    wait_for(lambda: entry_status(p, name)["resolutions"]["ok"] >= 1
             and len(entry_status(p, name)["servers"]) == 2, timeout=10,
             what="both servers resolved by the manager")
    dns.stop()
    wait_for(lambda: entry_status(p, name)["last_result"] in ("timeout", "nameservers_failed"),
             timeout=10, what="resolution failing")
    resolutions_before = entry_status(p, name)["resolutions"]
    body = p.body.replace('max_fails = 0', 'max_fails = 0\nkeepalive = 8')
    old_workers = set(p.workers_pids())
    p.reload(body)
    assert not set(p.workers_pids()) & old_workers
    counts = (a.proxied(), b.proxied())
    statuses = [request(p.port, "GET", "/tiny")[0] for _ in range(40)]
    assert statuses == [200] * 40
    assert a.proxied() > counts[0] and b.proxied() > counts[1]
    assert len(entry_status(p, name)["servers"]) == 2
    after = entry_status(p, name)["resolutions"]
    assert resolutions_before["ok"] >= 1  # counters survive the manager's reload:
    assert after["ok"] >= resolutions_before["ok"]
    assert after["timeout"] + after["nameservers_failed"] >= 1


def statuses(p: UProxy, n: int) -> list[int]:
    return [request(p.port, "GET", "/tiny")[0] for _ in range(n)]


def test_servers_found_through_dns_are_health_checked(tmp_path, cleanup, started):
    """The upstream's health_check applies to servers DNS lists: the one that is down is
    taken out of rotation (no retries, no passive health: only the check can do it),
    comes back once it answers, and is no longer checked once DNS drops it."""
    port = free_port()
    a = LoopbackOrigin("127.0.0.2", port)
    cleanup(a)
    dns = Dnsmasq(tmp_path, {"app.test": ["127.0.0.2", "127.0.0.3"]})
    cleanup(dns)
    name, up, down = f"app.test:{port}", f"127.0.0.2:{port}", f"127.0.0.3:{port}"
    p = dns_proxy(tmp_path, started, dns, f'{{ address = "{name}", resolve = "1s" }}',
                  upstream='retries = 0\nhealth_check = { interval = "200ms", '
                           'timeout = "3s", fall = 2, rise = 2 }', workers=2)

    def check(address: str) -> dict:
        return p.server_status("app", address)["health_check"] or {}

    wait_for(lambda: check(down).get("state") == "down", timeout=15,
             what="the check taking the DNS-found server that is down out")
    assert check(up)["state"] == "up"
    assert check(down)["last_result"] == "connect failed"
    # the workers read the verdict every SWEEP_INTERVAL (later under load): until then
    # about half the requests go to the server that is down and fail (no retries)
    wait_for(lambda: statuses(p, 10) == [200] * 10, timeout=15, what="the verdict applied")
    before = a.proxied()
    assert statuses(p, 60) == [200] * 60, "a server the check found down was still picked"
    assert a.proxied() - before >= 60  # (plus the checks it got meanwhile)
    down_logs = [e["server"] for e in p.log_events() if e.get("event") == "upstream server down"]
    assert down in down_logs  # (a slow check of the live one under load may add it too)
    # the server comes up: the check brings it back (rise = 2) and it takes traffic again
    b = LoopbackOrigin("127.0.0.3", port)
    cleanup(b)
    wait_for(lambda: check(down).get("state") == "up", timeout=15, what="the server back up")
    checks_seen = b.proxied()  # the checks it got so far

    def reached() -> bool:
        assert statuses(p, 10) == [200] * 10
        return b.proxied() > checks_seen + 2
    wait_for(reached, timeout=15, interval=0.1, what="traffic reaching the server back up")
    ups = [e["server"] for e in p.log_events() if e.get("event") == "upstream server up"]
    assert down in ups
    metrics = p.metrics()
    for result in ("failed", "ok"):
        assert metric_value(metrics, "forkproxy_upstream_health_checks_total", upstream="app",
                            server=down, result=result) >= 2
    # dropped from DNS: nothing reaches it any more, not even a check
    dns.set_hosts({"app.test": ["127.0.0.2"]})
    wait_for(lambda: [s["address"] for s in entry_status(p, name)["servers"]] == [up],
             timeout=10, what="the manager resolving the removal")
    time.sleep(1.0)  # the workers and the checker follow within FOLLOW_INTERVAL
    quiet = b.proxied()
    assert statuses(p, 20) == [200] * 20
    time.sleep(1.0)  # five check intervals
    assert b.proxied() == quiet, "a server DNS dropped is still checked or served"
