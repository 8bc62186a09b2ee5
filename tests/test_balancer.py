"""Issue 6, sans-IO: balancing distributions, consistent hashing, splits, retry budget,
health verdicts, the shared health table, passive ejection and slow start."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter

import pytest

from forkproxy import config as config_mod
from forkproxy.context import WEIGHT_SCALE
from forkproxy.hashing import hash64
from forkproxy.http.request import Limits, RequestParser
from forkproxy.manager.healthcheck import Verdict
from forkproxy.shm.health import DOWN, UNKNOWN, UP, HealthTable, pack_state, server_key
from forkproxy.worker.balancer import (
    KeySpec,
    LeastConn,
    Peer,
    RandomTwo,
    RendezvousHash,
    RetryBudget,
    RoundRobin,
    Split,
)
from forkproxy.worker.upstream import Upstream


def peers(*weights):
    return [Peer(w, hash64(b"peer%d" % i)) for i, w in enumerate(weights)]


def shares(balancer, ps, n, key=None):
    c = Counter()
    for i in range(n):
        p = balancer.pick(ps, None, key(i) if key else None)
        c[ps.index(p)] += 1
    return [c[i] for i in range(len(ps))]


def req(headers=(), host=b"h"):
    p = RequestParser(Limits())
    head = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n"
    for k, v in headers:
        head += k + b": " + v + b"\r\n"
    p.feed(head + b"\r\n")
    return p.events[0][1]


# -- distributions -------------------------------------------------------------------


def test_round_robin_is_smooth_and_exact():
    ps = peers(5, 1, 1)
    seq = [ps.index(RoundRobin().pick(ps)) for _ in range(7)]
    assert seq == [0, 0, 1, 0, 2, 0, 0]  # nginx's smooth sequence, not a a a a a b c
    assert shares(RoundRobin(), peers(1, 2, 1), 4000) == [1000, 2000, 1000]


def test_least_conn_prefers_idle_relative_to_weight_and_rotates_ties():
    ps = peers(1, 1, 2)
    ps[0].active, ps[1].active, ps[2].active = 3, 1, 3
    assert LeastConn().pick(ps) is ps[1]  # 1/1 < 3/2 < 3/1
    ps[1].active = 2
    assert LeastConn().pick(ps) is ps[2]  # 3/2 < 2/1
    ps = peers(1, 2, 1)  # all idle: ties follow the weights exactly
    assert shares(LeastConn(), ps, 4000) == [1000, 2000, 1000]


def test_random_two_honours_weights_and_prefers_the_less_loaded():
    ps = peers(1, 2, 1)
    got = shares(RandomTwo(random.Random(7)), ps, 20000)
    for g, want in zip(got, (0.25, 0.5, 0.25), strict=True):
        assert abs(g / 20000 - want) < 0.02, got
    ps = peers(1, 1, 1)
    ps[0].active = 10
    got = shares(RandomTwo(random.Random(3)), ps, 3000)
    # the busy peer only wins when drawn twice, which the distinct draw prevents
    assert got[0] == 0 and min(got[1:]) > 1200, got


def test_consistent_hash_weights_stickiness_and_minimal_movement():
    ps = peers(1, 2, 1)
    rh = RendezvousHash()
    keys = [hash64(b"user-%d" % i) for i in range(20000)]
    got = shares(rh, ps, 20000, key=lambda i: keys[i])
    for g, want in zip(got, (0.25, 0.5, 0.25), strict=True):
        assert abs(g / 20000 - want) < 0.015, got
    before = [rh.pick(ps, None, k) for k in keys]
    assert before == [rh.pick(ps, None, k) for k in keys]  # sticky
    ps[1].usable = False  # down: only its keys move, spread by weight over the rest
    after = [rh.pick(ps, None, k) for k in keys]
    moved = [(b, a) for b, a in zip(before, after, strict=True) if a is not b]
    assert all(b is ps[1] for b, _ in moved)
    assert len(moved) == got[1]
    # a retry excludes the failed peer: the key's next-best peer, the same every time
    k = keys[0]
    first = rh.pick(ps, None, k)
    second = rh.pick(ps, [first], k)
    assert second is not first and second is rh.pick(ps, [first], k)
    ps[1].usable = True
    assert [rh.pick(ps, None, k) for k in keys] == before  # back: the same mapping


def test_hash_without_key_falls_back_to_round_robin():
    ps = peers(1, 1)
    assert shares(RendezvousHash(), ps, 100) == [50, 50]


def test_every_algorithm_skips_unusable_and_excluded_and_returns_none_when_empty():
    for b in (RoundRobin(), LeastConn(), RandomTwo(), RendezvousHash()):
        ps = peers(1, 1, 1)
        ps[0].usable = False
        picked = {b.pick(ps, [ps[1]], 12345) for _ in range(50)}
        assert picked == {ps[2]}, b.name
        assert b.pick(ps, [ps[1], ps[2]], 12345) is None, b.name


def test_slow_start_weight_shifts_shares():
    ps = peers(1, 1, 1)
    ps[2].eff_weight = WEIGHT_SCALE // 10  # ramping: 10% of its weight
    got = shares(RoundRobin(), ps, 2100)
    assert got == [1000, 1000, 100]


# -- keys ----------------------------------------------------------------------------


def test_key_specs():
    r = req([(b"X-User", b"alice"), (b"Cookie", b"a=1; sid=\"s-42\"; b=2")])
    assert KeySpec("header:x-user").raw(r, "1.2.3.4") == b"alice"
    assert KeySpec("header:X-Missing").raw(r, "1.2.3.4") is None
    assert KeySpec("cookie:sid").raw(r, "1.2.3.4") == b"s-42"
    assert KeySpec("cookie:SID").raw(r, "1.2.3.4") is None  # cookie names are case-sensitive
    assert KeySpec("ip").raw(r, "1.2.3.4") == b"1.2.3.4"
    assert KeySpec("header:Host").raw(r, "") == b"h"
    assert KeySpec("header:x-user", b"a").key(r, "") != KeySpec("header:x-user", b"b").key(r, "")
    for bad in ("header:", "cookie", "ip:x", "path:/"):
        with pytest.raises(ValueError):
            KeySpec(bad)


# -- splits --------------------------------------------------------------------------


class Up:
    split = False

    def __init__(self, name):
        self.name = name


def test_split_exact_without_key_and_override_header():
    v1, v2 = Up("v1"), Up("v2")
    s = Split([(v1, 95), (v2, 5)], None, "X-Canary")
    r = req()
    got = Counter(s.choose(r, "").name for _ in range(10000))
    assert got == {"v1": 9500, "v2": 500}
    assert s.choose(req([(b"x-canary", b"v2")]), "") is v2
    assert s.choose(req([(b"X-Canary", b"nope")]), "").name in ("v1", "v2")


def test_split_sticky_accurate_and_monotonic_when_the_canary_grows():
    v1, v2 = Up("v1"), Up("v2")
    key = KeySpec("header:X-User", Split.SALT)
    s5 = Split([(v1, 95), (v2, 5)], key)
    s20 = Split([(v1, 80), (v2, 20)], key)
    users = [req([(b"X-User", b"u%d" % i)]) for i in range(10000)]
    first = [s5.choose(r, "") for r in users]
    assert [s5.choose(r, "") for r in users] == first
    share = sum(t is v2 for t in first) / len(users)
    assert abs(share - 0.05) < 0.01, share
    grown = [s20.choose(r, "") for r in users]
    assert all(g is v2 for f, g in zip(first, grown, strict=True) if f is v2)  # nobody leaves v2
    assert abs(sum(t is v2 for t in grown) / len(users) - 0.20) < 0.015


# -- retry budget --------------------------------------------------------------------


def test_retry_budget_ratio_minimum_and_window():
    b = RetryBudget(0.2, 3, window=5.0)
    assert [b.allow(0.0) for _ in range(4)] == [True, True, True, False]  # the minimum
    for _ in range(100):
        b.request(1.0)
    allowed = sum(b.allow(1.0) for _ in range(100))
    assert allowed == 20  # 3 + 0.2 x 100 = 23, three already spent
    assert not b.can(2.0)
    assert b.can(12.0)  # two windows later the slate is clean
    assert b.denied >= 81


# -- health ----------------------------------------------------------------------------


def test_verdict_rise_and_fall():
    v = Verdict(rise=2, fall=3)
    assert v.observe(True, 10) and v.state == UP and v.since_ms == 0  # unknown -> up, no ramp
    assert not v.observe(False, 20) and not v.observe(False, 30)
    assert v.observe(False, 40) and v.state == DOWN and v.since_ms == 40
    assert not v.observe(True, 50) and v.state == DOWN
    assert not v.observe(False, 60)
    assert not v.observe(True, 70)
    assert v.observe(True, 80) and v.state == UP and v.since_ms == 80
    v = Verdict(rise=1, fall=2)
    assert not v.observe(False, 1) and v.state == UNKNOWN
    assert v.observe(False, 2) and v.state == DOWN


def _cfg(text: str):
    return config_mod.loads('[[listener]]\nlisten = "127.0.0.1:1"\nupstream = "a"\n' + text)


def test_health_table_assign_keeps_state_and_reclaims_when_full():
    t = HealthTable(entries=4)
    cfg = _cfg('[upstream.a]\nservers = [{ address = "127.0.0.1:1" }, { address = "127.0.0.1:2" }]\n')
    assert t.assign(cfg) == 2
    i = t.find("a", "127.0.0.1:2")
    t.publish(i, DOWN, 1234, True, False, 10, 2, 1234)
    assert t.assign(cfg) == 2 and t.find("a", "127.0.0.1:2") == i
    assert t.state(i) == (DOWN, 1234) and t.read(i)["failed"] == 1
    cfg2 = _cfg('[upstream.a]\nservers = [{ address = "127.0.0.1:2" }, { address = "127.0.0.1:3" }, '
                '{ address = "127.0.0.1:4" }, { address = "127.0.0.1:5" }]\n')
    assert t.assign(cfg2) == 4  # full: :1's entry was handed out again
    assert t.find("a", "127.0.0.1:1") == -1 and t.state(i) == (DOWN, 1234)
    assert server_key("a", "x") != server_key("b", "x")


def test_discovered_servers_have_a_region_of_their_own():
    """The helper assigns DNS-found servers' entries, the master the configured ones':
    neither hands out the other's entries, and a worker drops a verdict whose entry
    went to another server."""
    t = HealthTable(entries=2, discovered=2)
    cfg = _cfg('[upstream.a]\nservers = [{ address = "127.0.0.1:1" }]\n'
               'health_check = { interval = "1s" }\n')
    assert t.assign(cfg) == 1
    keys = [server_key("a", f"127.0.0.9:{p}") for p in (1, 2)]
    found = t.assign_discovered(keys)
    assert sorted(found.values()) == [2, 3] and t.discovered_index() == found
    t.publish(found[keys[0]], DOWN, 500, True, False, 10, 2, 500)
    assert t.assign_discovered(keys) == found  # kept, with its verdict
    up = _upstream('health_check = { interval = "1s" }', t, n=1)
    s = up._server("127.0.0.9:1", 1)
    up._set_servers([*up.servers, s])
    up._find_entries(up.servers, t.discovered_index())
    up.refresh(1.0)
    assert s.hidx == found[keys[0]] and not s.usable
    third = server_key("a", "127.0.0.9:3")
    again = t.assign_discovered([keys[1], third])  # full: :1's entry reclaimed
    assert again[third] == found[keys[0]] and t.state(again[third])[0] == 0
    up.refresh(2.0)
    assert s.hidx == -1 and s.usable  # not someone else's verdict
    assert t.assign(cfg) == 1 and t.find("a", "127.0.0.1:1") == 0  # the master's region


def _upstream(extra: str, health=None, n=3):
    servers = ", ".join(f'{{ address = "127.0.0.1:{p}" }}' for p in range(1, n + 1))
    cfg = _cfg(f"[upstream.a]\nservers = [{servers}]\n{extra}\n")
    if health is not None:
        health.assign(cfg)
    return Upstream("a", cfg.upstream["a"], health)


def test_passive_ejection_window_recovery_and_slow_start():
    up = _upstream('max_fails = 2\nfail_timeout = "10s"\nslow_start = "10s"')
    s = up.servers[0]
    s.failed(100.0)
    s.failed(111.0)  # outside the window: the count restarted
    assert s.usable
    s.failed(112.0)
    assert not s.usable and s.ejected_until == 122.0 and s.ejections == 1
    up.refresh(115.0)
    assert s.state_name(115.0) == "ejected"
    assert all(up.pick() is not s for _ in range(20))
    up.refresh(122.0)  # back, ramping from ~0
    assert s.usable and s.eff_weight == 1 and s.state_name(122.0) == "slow_start"
    up.refresh(127.0)
    assert s.eff_weight == WEIGHT_SCALE // 2
    up.refresh(132.5)
    assert s.eff_weight == WEIGHT_SCALE and s.state_name(132.5) == "up"


def test_single_server_is_never_ejected():
    up = _upstream("max_fails = 1", n=1)
    for t in range(5):
        up.servers[0].failed(float(t))
    assert up.pick() is up.servers[0]


def test_active_verdicts_from_the_table_and_shared_slow_start():
    t = HealthTable(entries=16)
    up = _upstream('slow_start = "4s"\nhealth_check = { interval = "1s" }', t)
    s = up.servers[1]
    i = t.find("a", s.address)
    t.q[i * 8 + 1] = pack_state(DOWN, 1000)
    up.refresh(5.0)
    assert not s.usable and s.state_name(5.0) == "down"
    assert {up.pick() for _ in range(10)} == {up.servers[0], up.servers[2]}
    t.q[i * 8 + 1] = pack_state(UP, 6000)  # up since t=6s (monotonic ms)
    up.refresh(7.0)
    assert s.usable and s.eff_weight == WEIGHT_SCALE // 4
    up.refresh(10.0)
    assert s.eff_weight == WEIGHT_SCALE
    plain = _upstream("", t)  # an upstream without health_check ignores the table
    assert all(x.hidx == -1 for x in plain.servers)


def test_config_validation_of_the_new_keys():
    base = '[[listener]]\nlisten = "127.0.0.1:1"\nupstream = "a"\n'
    ups = '[upstream.a]\nservers = [{ address = "127.0.0.1:1" }]\n'

    def problems(text):
        with pytest.raises(config_mod.ConfigError) as e:
            config_mod.loads(base + text)
        return "\n".join(e.value.problems)

    assert "hash: required" in problems(ups + 'balance = "hash"\n')
    assert "expected 'header:NAME'" in problems(ups + 'balance = "hash"\nhash = "path:/"\n')
    assert "only used with" in problems(ups + 'hash = "ip"\n')
    assert "retry_on" in problems(ups + 'retry_on = ["500"]\n')
    assert "give upstream or split" in problems(
        ups + '[[route]]\nupstream = "a"\nsplit = [{ upstream = "a", weight = 1 }]\n')
    assert "no upstream named 'v9'" in problems(
        ups + '[[route]]\nsplit = [{ upstream = "a" }, { upstream = "v9" }]\n')
    assert "route[0].upstream: required" in problems(ups + '[[route]]\nhost = "x"\n')
    cfg = config_mod.loads(base + ups + 'balance = "hash"\nhash = "cookie:sid"\nretries = 2\n'
                           'retry_on = ["connect_failure", "503"]\nmax_connections = 4\n'
                           'health_check = { path = "/h", interval = "500ms", rise = 1 }\n'
                           'tcp_keepalive = { idle = "30s" }\n'
                           '[[route]]\nsplit = [{ upstream = "a", weight = 3 }]\nhash = "ip"\n')
    up = cfg.upstream["a"]
    assert up.health_check.interval == 0.5 and up.health_check.fall == 3
    assert up.tcp_keepalive.idle == 30.0 and up.tcp_keepalive.count == 6
    assert cfg.route[0].split[0].weight == 3 and cfg.route[0].canary_header == "X-Canary"


def test_balancing_and_health_checks_load_no_random_module():
    """They use random.Random's C generator (_random): the random module's Python layer
    would be resident in every process of the tree for nothing (docs/BENCHMARKS.md)."""
    code = ("import sys\nimport forkproxy.worker.balancer, forkproxy.manager.healthcheck\n"
            "print('random' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
