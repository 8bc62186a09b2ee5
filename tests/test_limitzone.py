"""The per-client-IP limit zone (forkproxy/shm/limitzone.py) without a proxy around it:
GCRA arithmetic with a fake clock, collisions, and the shared tables across forked
processes (the way the master creates them before forking its workers)."""

from __future__ import annotations

import os
import time

import pytest

from forkproxy.config import parse_rate
from forkproxy.shm import limitzone
from forkproxy.shm.limitzone import ClientLimits, LimitZone

MS = 1_000_000


@pytest.fixture
def clock(monkeypatch):
    now = [10**12]
    monkeypatch.setattr(limitzone.time, "monotonic_ns", lambda: now[0])
    return now


def test_parse_rate():
    assert parse_rate("100r/s") == 100.0
    assert parse_rate(" 600r/m ") == 10.0
    assert parse_rate("0.5r/s") == 0.5
    for bad in ("100", "100r/h", "r/s", "0r/s", "-1r/s", "", None):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_burst_then_rate(clock):
    z = LimitZone(1024, 4, rate=True, conns=False)
    interval, burst = 10 * MS, 5
    tol = (burst + 1) * interval
    assert [z.allow("a", interval, tol) for _ in range(8)] == [True] * 6 + [False] * 2
    clock[0] += interval - 1
    assert not z.allow("a", interval, tol)
    clock[0] += 1
    assert z.allow("a", interval, tol) and not z.allow("a", interval, tol)
    assert z.allow("b", interval, tol)  # another client has its own bucket
    clock[0] += 10 * interval  # idle: the bucket refills to the burst, not beyond
    assert sum(z.allow("a", interval, tol) for _ in range(20)) == burst + 1
    z.release()


def test_pair_eviction_is_lossy_in_the_clients_favour(clock):
    z = LimitZone(1024, 4, rate=True, conns=False)
    interval, tol = 10 * MS, 10 * MS  # burst 0: one request per 10 ms
    pair = z._pair_mask
    same = [k for k in (f"10.0.{i // 256}.{i % 256}" for i in range(20000))
            if (hash(k) & (2**64 - 1) | 1) >> 1 & pair == 0][:3]
    assert len(same) == 3
    a, b, c = same
    assert z.allow(a, interval, tol) and z.allow(b, interval, tol)  # both ways used
    assert not z.allow(a, interval, tol)
    clock[0] += 1
    assert z.allow(c, interval, tol)  # evicts the way whose bucket is older (a's)
    assert z.allow(a, interval, tol)  # a starts afresh: allowed, never wrongly refused
    z.release()


def test_connections_count_min_and_clear_column():
    z = LimitZone(1024, 3, rate=False, conns=True)
    z.bind(1)
    assert all(z.open("1.2.3.4", 3) for _ in range(3))
    assert not z.open("1.2.3.4", 3) and z.count("1.2.3.4") == 3
    assert z.open("5.6.7.8", 3) and z.count("5.6.7.8") == 1
    z.close("1.2.3.4")
    assert z.count("1.2.3.4") == 2 and z.open("1.2.3.4", 3)
    many = [f"10.1.{i // 256}.{i % 256}" for i in range(3000)]  # 3 clients per slot
    for k in many[:300]:
        z.open(k, 10**6)
    exact = sum(z.count(k) == 1 for k in many[:300])
    assert exact > 0.6 * 300, exact  # count-min: a client is exact unless both slots collide
    for k in many[300:]:
        z.open(k, 10**6)
    assert all(z.count(k) >= 1 for k in many)  # overloaded: over-counts, never under
    z.clear_column(1)  # the master, after reaping the worker that owned column 1
    assert z.count("1.2.3.4") == 0 and all(z.count(k) == 0 for k in many)
    z.close("1.2.3.4")  # never below zero
    assert z.count("1.2.3.4") == 0
    z.release()


def _fork(fn) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    return pid


def test_shared_across_forked_processes():
    """Two processes sharing one bucket admit at most burst + 1 + rate x (the time they
    were asking) between them, and their connection counts add up (each writes only its
    own column)."""
    z = LimitZone(4096, 4, rate=True, conns=True)
    rate, burst, seconds = 200.0, 20, 1.0
    interval = int(1e9 / rate)
    tol = (burst + 1) * interval
    r, w = os.pipe()
    done_r, done_w = os.pipe()  # closed by the parent when it has looked at the counts
    start = time.monotonic() + 0.2

    def hammer(col):
        def run():
            os.close(done_w)
            z.bind(col)
            for _ in range(5):
                z.open("9.9.9.9", 100)
            while time.monotonic() < start:
                pass
            n = 0
            first = time.monotonic()
            end = start + seconds
            while time.monotonic() < end:  # ~10x the rate each, with "request work" between
                n += z.allow("9.9.9.9", interval, tol)
                time.sleep(0.0005)
            last = time.monotonic()  # after the last allow() returned
            os.write(w, b"%d %.6f %.6f\n" % (n, first, last))
            os.read(done_r, 1)  # keep the column's connections open while the parent looks
        return run

    pids = [_fork(hammer(0)), _fork(hammer(1))]
    os.close(w)
    os.close(done_r)
    got = b""
    while got.count(b"\n") < 2:
        got += os.read(r, 64)
    reports = [line.split() for line in got.decode().splitlines()]
    allowed = sum(int(n) for n, _, _ in reports)
    asking = max(float(last) for _, _, last in reports) - min(float(f) for _, f, _ in reports)
    z.bind(2)
    assert z.count("9.9.9.9") == 10
    os.close(done_w)
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(r)
    # the bound comes from the time the two really were asking (longer on a loaded machine,
    # where a process can be descheduled between its clock check and its allow()). The
    # table is lossy in the client's favour (forkproxy/shm/limitzone.py): a process
    # preempted between loading and storing a bucket undoes the other's admissions, which
    # a loaded machine makes more frequent (5% extra seen beside stress-ng; 17% in the
    # module's pathological case). One bucket per process would admit about twice `most`.
    most = burst + 1 + rate * asking
    assert allowed <= 1.3 * most, (allowed, most, asking)
    # a bucket that refills: far more than the burst (fewer than `most` only if a loaded
    # machine kept both processes from asking for longer than the burst's worth of time)
    assert allowed >= 0.5 * (burst + 1 + rate * seconds), (allowed, most, asking)
    z.clear_column(0)
    z.clear_column(1)
    assert z.count("9.9.9.9") == 0
    z.release()


def test_client_limits_view():
    class Cfg:
        status = 503
        per_ip_connections = 2
        rate = "10r/s"
        burst = 0

    z = LimitZone(1024, 2, rate=True, conns=True)
    z.bind(0)
    cl = ClientLimits(z, Cfg)
    assert cl.status == 503 and cl.interval == 100_000_000 and cl.tolerance == 100_000_000
    assert cl.allow_request("x") and not cl.allow_request("x")
    assert cl.open("x") and cl.open("x") and not cl.open("x")
    cl.close("x")
    assert cl.open("x")
    Cfg.rate, Cfg.per_ip_connections = "", 0
    off = ClientLimits(z, Cfg)
    assert all(off.allow_request("x") for _ in range(100)) and off.open("x")
    z.release()
