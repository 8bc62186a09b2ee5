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

    def make(*args, **kwargs) -> Proxy:
        p = Proxy(*args, **kwargs)
        started.append(p)
        return p

    yield make
    for p in started:
        p.kill_all()
