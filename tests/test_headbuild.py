"""The upstream request head written in C (http/headbuild.py compiled) against the same
file run as Python: the same bytes for every shape of input, and the Python format for
what the C writer does not take."""

from __future__ import annotations

import random

import pytest
from puremod import pure_twin

from forkproxy.http import headbuild

pytestmark = pytest.mark.skipif(not headbuild.COMPILED,
                                reason="plain-Python job: no C head writer built")


def random_bytes(rnd: random.Random, most: int) -> bytes:
    return bytes(rnd.randrange(256) for _ in range(rnd.randrange(most + 1)))


def test_the_c_head_is_the_python_head():
    pure = pure_twin(headbuild)
    rnd = random.Random(11)
    for i in range(3000):
        headers = [(random_bytes(rnd, 12), random_bytes(rnd, 40))
                   for _ in range(rnd.choice((0, 1, 2, rnd.randrange(60))))]
        args = (rnd.choice(("GET", "POST", "M-SEARCH", "")), random_bytes(rnd, 30),
                random_bytes(rnd, 20), headers, rnd.choice((b"", random_bytes(rnd, 30))),
                random_bytes(rnd, 16), rnd.choice((b"http", b"https")), random_bytes(rnd, 20),
                rnd.choice((b"", b"traceparent: 00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01\r\n")),
                rnd.choice((b"\r\n", b"Content-Length: 12\r\n\r\n")))
        assert headbuild.request_head(*args) == pure.request_head(*args), i


@pytest.mark.parametrize("method, headers", [
    ("G\u00e9T", [(b"a", b"b")]),  # not ASCII: the Python format encodes it (UTF-8)
    ("GET", [(b"a", "b")]),  # a str value: the Python format refuses it
    ("GET", [[b"a", b"b"]]),  # a list, not a tuple: as Python formats it
    ("GET", ((b"a", b"b"),)),  # a tuple of fields, not a list
])
def test_parts_the_c_writer_does_not_take_go_the_python_way(method, headers):
    pure = pure_twin(headbuild)
    args = (method, b"/", b"h", headers, b"", b"1.2.3.4", b"http", b"id", b"", b"\r\n")
    try:
        want = pure.request_head(*args)
    except TypeError as e:
        with pytest.raises(TypeError, match=str(e)[:20]):
            headbuild.request_head(*args)
    else:
        assert headbuild.request_head(*args) == want
