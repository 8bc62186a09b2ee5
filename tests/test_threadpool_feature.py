"""gevent's thread pool is a per-config feature (forkproxy/master/features.py): a config
that resolves nothing never loads it, one with health checks loads it in the master
before fork, and the checks resolve through it."""

from __future__ import annotations

import os

from fp import request, wait_for

#: gevent.threadpool's queue (gevent._threading imports gevent.queue's compiled module);
#: nothing else in a plain config's tree imports it
THREADPOOL_FILE = "/_gevent_cqueue."
HEALTH_CHECK = 'health_check = { interval = "100ms", timeout = "2s" }'


def maps_thread_pool(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return any(THREADPOOL_FILE in line for line in f)


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_a_config_that_resolves_nothing_never_loads_the_thread_pool(tmp_path, origin,
                                                                      proxies):
    p = proxies(tmp_path, origin.address, workers=2)
    before = origin.stats()["requests"]
    for _ in range(3):
        assert request(p.port, "GET", "/tiny")[0] == 200
    assert origin.stats()["requests"] >= before + 3  # (/stats counts itself too)
    tree = [p.pid, p.manager_pid(), *p.workers_pids()]
    assert len(tree) == 4 and None not in tree
    assert {pid: (maps_thread_pool(pid), threads(pid)) for pid in tree} == {
        pid: (False, 1) for pid in tree}


def test_health_checks_load_the_thread_pool_before_fork_and_resolve_through_it(
        tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=2, upstream_extra=HEALTH_CHECK)
    tree = [p.pid, p.manager_pid(), *p.workers_pids()]
    assert len(tree) == 4 and None not in tree
    assert {pid: maps_thread_pool(pid) for pid in tree} == {pid: True for pid in tree}
    start = origin.stats()["requests"]
    # the checks reach the origin (GET /healthz) with no client traffic, each after a
    # getaddrinfo in the manager's thread pool, which starts a thread there
    wait_for(lambda: origin.stats()["requests"] >= start + 3, timeout=30,
             what="three health checks")
    assert threads(p.manager_pid()) > 1
    assert request(p.port, "GET", "/tiny")[0] == 200
