"""The head scanners in C (http/headscan.py compiled) against the same file run as Python
(its regexes): the same verdict, the same tuple and the same bytes for thousands of heads
built near the grammar's edges, and for every head of the smuggling corpus."""

from __future__ import annotations

import random

import pytest
from puremod import pure_twin
from test_smuggling import BROKEN_BODIES, CONNECTION_NAMED, CORPUS, EXTRA, RESPONSES

from forkproxy.http import headscan

pytestmark = pytest.mark.skipif(not headscan.COMPILED,
                                reason="plain-Python job: no C head scanner built")

#: the bytes a mutation puts in: the grammar's separators, blanks, CTLs, DEL, obs-text,
#: digits and letters whose case matters
EDGE_BYTES = b"\r\n\t :\x00\x01\x1f\x7f\x80\xff0 19aAzZ-_,;/?#%\"<>\\()@{}~^|`'"

STATUS_LINES = [
    b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 204 ", b"HTTP/1.1 404 Not Found",
    b"HTTP/1.1 599 x", b"HTTP/1.1 100 Continue", b"HTTP/1.1 101 Switching Protocols",
    b"HTTP/1.1 103 Early Hints", b"HTTP/1.1 199 x", b"HTTP/1.1 600 Odd", b"HTTP/1.1 099 x",
    b"HTTP/1.1 200", b"HTTP/1.2 200 OK", b"HTTP/2.0 200 OK", b"http/1.1 200 OK",
    b"HTTP/1.1 20 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1 200 caf\xc3\xa9\t!", b"HTTP/1.1 200 O\x01K",
]
#: names near the hop-by-hop list, Content-Length and Connection, in several cases
NAMES = [
    b"Server", b"Date", b"Content-Type", b"ETag", b"X-Obs", b"Set-Cookie",
    b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"Content-Lengths", b"Content-Lengt",
    b"Content_Length", b"Connection", b"connection", b"CONNECTION", b"Connectio", b"X-Connection",
    b"Keep-Alive", b"keep-alive", b"Keep-Alivee", b"Proxy-Connection", b"TE", b"te", b"Te", b"T",
    b"TES", b"Trailer", b"trailers", b"Transfer-Encoding", b"TRANSFER-ENCODING", b"Upgrade",
    b"upgradE", b"Proxy-Authenticate", b"proxy-authorization", b"Proxy-Authorizations",
    b"Host", b"HOST", b"Hosts", b"User-Agent", b"Cookie", b"X-Request-Id", b"x-request-ID",
    b"X-Forwarded-For", b"traceparent", b"TraceState", b"tracestat", b"Expect", b"EXPECT",
    b"Transfer_Encoding", b"content_length", b"Content-Type",
]
LENGTHS = [
    b"0", b"2", b"12345", b"007", b"00", b"0 ", b" 5", b"\t5", b"5 ", b"", b"+5", b"-1", b"1_0",
    b"0x3", b"3, 3", b"1 2", b"9" * 18, b"1" + b"0" * 17, b"9" * 19, b"1" + b"0" * 18, b"\xd9\xa3",
]
CONNECTIONS = [
    b"close", b"keep-alive", b"Close", b"KEEP-ALIVE", b" keep-alive ", b"\tclose\t", b"x-trace",
    b"close, x-up", b"keep-alive, close", b"", b"closed", b"keep_alive", b"upgrade",
]


def edgy(rnd: random.Random, choices: list[bytes]) -> bytes:
    """One of the first four (plain) choices mostly, any of them sometimes: a head has a
    few edges, not only edges."""
    return rnd.choice(choices[:4] if rnd.random() < 0.85 else choices)


def field(rnd: random.Random) -> bytes:
    name = edgy(rnd, NAMES)
    low = name.lower()
    if low == b"content-length":
        value = edgy(rnd, LENGTHS)
    elif low == b"connection":
        value = edgy(rnd, CONNECTIONS)
    else:
        value = bytes(rnd.choice(b"abcXYZ09 \t:;,=/\x80\xff") for _ in range(rnd.randrange(30)))
    blanks = rnd.choice((b"", b" ", b" ", b"\t", b"  \t "))
    return name + edgy(rnd, [b":", b":", b":", b":", b" :", b"\t:"]) + blanks + value


def mutate(rnd: random.Random, head: bytes) -> bytes:
    """Insert, remove or replace a few bytes (most of them the grammar's edges)."""
    b = bytearray(head)
    for _ in range(rnd.choice((0, 0, 0, 1, 1, 2, 3))):
        i = rnd.randrange(len(b) + 1)
        new = rnd.choice(EDGE_BYTES) if rnd.random() < 0.8 else rnd.randrange(256)
        op = rnd.randrange(3)
        if op == 0:
            b.insert(i, new)
        elif i < len(b):
            if op == 1:
                del b[i]
            else:
                b[i] = new
    return bytes(b)


def response_head(rnd: random.Random) -> bytes:
    fields = [field(rnd) for _ in range(rnd.randrange(8))]
    if rnd.random() < 0.3:
        fields.insert(rnd.randrange(len(fields) + 1), b"Connection: " + edgy(rnd, CONNECTIONS))
    if rnd.random() < 0.7:  # most heads framed by a Content-Length, as origins send
        fields.insert(rnd.randrange(len(fields) + 1), b"Content-Length: " + edgy(rnd, LENGTHS))
    return mutate(rnd, edgy(rnd, STATUS_LINES) + b"\r\n" + b"".join(f + b"\r\n" for f in fields)
                  + b"\r\n")


TARGETS = [
    b"/", b"/tiny", b"/static/app.js?v=3", b"/a%20b", b"/~x/!$&'()*+,;=:@", b"/a#frag",
    b"/a b", b"/\"q\"", b"/<x>", b"/\\", b"/caf\xc3\xa9", b"/{}", b"*", b"http://x/a", b"",
    b"/" + b"a" * 300,
]
METHODS = [b"GET", b"HEAD", b"GET", b"HEAD", b"POST", b"get", b"GETS", b"HEA", b"OPTIONS", b"GET "]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/1.", b"http/1.1",
            b"HTTP/1.1 "]


def request_head(rnd: random.Random) -> bytes:
    fields = [field(rnd) for _ in range(rnd.choice((0, 1, 3, rnd.randrange(20))))]
    line = edgy(rnd, METHODS) + b" " + edgy(rnd, TARGETS) + b" " + edgy(rnd, VERSIONS)
    return mutate(rnd, line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n")


def corpus_heads() -> list[bytes]:
    """Every raw message of the smuggling corpus, whole and cut after its head."""
    raws = [case[1] for case in CORPUS]
    for cases in (RESPONSES, BROKEN_BODIES, EXTRA, CONNECTION_NAMED):
        raws += cases.values()
    heads = []
    for raw in raws:
        heads.append(raw)
        end = raw.find(b"\r\n\r\n")
        if end >= 0:
            heads.append(raw[:end + 4])
    return heads


@pytest.mark.parametrize("scan, make, seed", [
    ("judge_response_head", response_head, 16),
    ("scan_request_head", request_head, 11),
])
def test_the_c_scan_is_the_python_scan(scan, make, seed):
    c_scan, py_scan = getattr(headscan, scan), getattr(pure_twin(headscan), scan)
    rnd = random.Random(seed)
    taken = 0
    for i in range(20000):
        head = make(rnd)
        got = c_scan(head)
        assert got == py_scan(head), (i, head)
        taken += got is not None
    assert 2000 < taken < 18000  # both verdicts are common: the heads sit at the edges


def test_the_smuggling_corpus_scans_the_same():
    pure = pure_twin(headscan)
    heads = corpus_heads()
    assert len(heads) > 100
    for head in heads:
        assert headscan.judge_response_head(head) == pure.judge_response_head(head), head
        assert headscan.scan_request_head(head) == pure.scan_request_head(head), head


def test_the_random_heads_have_every_field_the_request_fast_path_acts_on():
    assert {name.lower() for name in NAMES} >= headscan.REQUEST_SPECIAL


def test_a_head_without_a_connection_line_is_relayed_as_it_came():
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
    assert headscan.judge_response_head(head)[3] is head  # no copy when nothing changes


@pytest.mark.parametrize("head", [
    bytearray(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"),
    memoryview(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
])
def test_what_is_not_bytes_goes_the_python_way(head):
    pure = pure_twin(headscan)
    for judge in ("judge_response_head", "scan_request_head"):
        try:
            want = getattr(pure, judge)(head)
        except TypeError:
            with pytest.raises(TypeError):
                getattr(headscan, judge)(head)
        else:
            assert getattr(headscan, judge)(head) == want
