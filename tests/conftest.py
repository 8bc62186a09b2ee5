"""Shared fixtures: a built-in origin and a factory of real forkproxy masters, each
stopped (and checked for leftovers) at the end of the test."""

from __future__ import annotations

import pytest
from fp import Origin, Proxy


@pytest.fixture
def origin():
    o = Origin()
    yield o
    o.stop()


@pytest.fixture
def proxies():
    """Call proxies(tmp_path, upstreams, ...) -> Proxy; all are cleaned up."""
    started: list[Proxy] = []

    def make(*args, start: bool = True, **kwargs) -> Proxy:
        p = Proxy(*args, start=False, **kwargs)
        started.append(p)  # registered before start: a failed start is cleaned up too
        if start:
            p.start()
        return p

    yield make
    for p in started:
        p.kill_all()
