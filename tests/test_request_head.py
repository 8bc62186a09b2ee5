"""The request-head fast path (RequestParser._fast) against llhttp: for any bytes, the
events (and every field of a parsed Request) are the same whether the fast path took the
head or llhttp's callbacks did."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forkproxy.http import headscan, request
from forkproxy.http.request import END, ERROR, HEAD, Limits, Request, RequestParser

WRK = b"GET /tiny HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
BROWSER = (b"GET /static/app.js?v=3 HTTP/1.1\r\nHost: www.example.com\r\n"
           b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0\r\nAccept: */*\r\n"
           b"Accept-Encoding: gzip, deflate, br\r\nConnection: keep-alive\r\n"
           b"Cookie: a=b; c=d\r\nX-Forwarded-For: 10.0.0.1\r\nX-Request-Id: abc\r\n\r\n")


def _events(data: bytes, fast: bool, limits: Limits | None = None):
    p = RequestParser(limits or Limits())
    if not fast:
        p._boundary = False  # as if llhttp were inside a message: the fast path is skipped
    p.feed(memoryview(bytearray(data)))  # the worker feeds a view of its shared buffer
    out = []
    for kind, item in p.events:
        if kind == HEAD:
            out.append((kind, {k: getattr(item, k) for k in Request.__slots__}))
        elif kind == ERROR:
            out.append((kind, item.status))
        else:
            out.append((kind, item))
    return out


def _same(data: bytes, limits: Limits | None = None):
    fast = _events(data, True, limits)
    assert fast == _events(data, False, limits), data
    return fast


@pytest.mark.parametrize("data", [WRK, BROWSER, WRK.replace(b"1.1", b"1.0"),
                                  b"HEAD / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
                                  b"GET /?a=%20 HTTP/1.1\r\nhost:x\r\nConnection: close\r\n\r\n"])
def test_common_requests_take_the_fast_path_with_the_same_result(data):
    p = RequestParser(Limits())
    p.feed(data)
    assert p._boundary  # llhttp never saw the head
    events = _same(data)
    assert [k for k, _ in events] == [HEAD, END]


def test_the_fast_path_leaves_limits_to_llhttp():
    for limits in (Limits(header_count=1), Limits(request_line=10), Limits(header_size=30),
                   Limits(headers_total=40)):
        events = _same(BROWSER, limits)
        assert events[-1][0] == ERROR and events[-1][1] in (414, 431), (limits, events)


_METHOD = st.sampled_from([b"GET", b"HEAD", b"POST", b"get", b"CONNECT", b"GET "])
_TARGET = st.sampled_from([b"/", b"/a?b=c", b"/#f", b"http://x/y", b"*", b"/a b", b"/\x00",
                           b"/\xff", b"/%41<>", b"", b"/a\\b", b"/{}|^`"])
_VERSION = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1"])
_FIELD = st.tuples(
    st.sampled_from([b"Host", b"host", b"Connection", b"X-Request-Id", b"X-Forwarded-For",
                     b"Content-Length", b"Transfer-Encoding", b"Expect", b"Upgrade", b"TE",
                     b"X-A", b"X A", b"X(A)", b"Content_Length", b""]),
    st.sampled_from([b":", b" :", b": ", b":\t"]),
    st.sampled_from([b"x", b"a.example:80", b"close", b"keep-alive", b"Upgrade", b"0",
                     b"chunked", b"100-continue", b"a b ", b"\x00", b"\x7f", b"a\rb",
                     b"a\nb", b"\xff", b"close, te", b"[::1]:8", b"a/b", b""]),
)


@settings(max_examples=600, deadline=None)
@given(method=_METHOD, target=_TARGET, version=_VERSION, fields=st.lists(_FIELD, max_size=5),
       tail=st.sampled_from([b"", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"ab"]))
def test_property_fast_path_agrees_with_llhttp(method, target, version, fields, tail):
    data = (method + b" " + target + b" " + version + b"\r\n"
            + b"".join(n + c + v + b"\r\n" for n, c, v in fields) + b"\r\n" + tail)
    _same(data)


_OK_FIELD = st.tuples(
    st.sampled_from([b"Host", b"host", b"HOST", b"Connection", b"X-Request-Id",
                     b"X-Forwarded-For", b"X-A", b"Accept", b"Content-Length", b"Upgrade"]),
    st.sampled_from([b":", b": ", b":\t", b":  "]),
    st.sampled_from([b"x", b"a.example:80", b"[::1]:8", b"close", b"keep-alive", b"Close",
                     b"text/html, */*", b"a b ", b"caf\xc3\xa9", b"1.2.3.4", b"0", b"a\tb"]),
)


@settings(max_examples=600, deadline=None)
@given(method=st.sampled_from([b"GET", b"HEAD"]),
       target=st.sampled_from([b"/", b"/a?b=c&d=%20", b"/x/y.js", b"/@:;=+,$!*'()~"]),
       version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
       fields=st.lists(_OK_FIELD, max_size=5), flip=st.integers(-1, 200),
       byte=st.sampled_from([0, 9, 10, 13, 32, 35, 58, 127, 255]))
def test_property_near_valid_requests_agree(method, target, version, fields, flip, byte):
    """Mostly valid heads (the fast path takes many) with at most one byte replaced."""
    data = bytearray(method + b" " + target + b" " + version + b"\r\n"
                     + b"".join(n + c + v + b"\r\n" for n, c, v in fields) + b"\r\n")
    if 0 <= flip < len(data) - 4:
        data[flip] = byte
    _same(bytes(data))


def test_a_repeated_head_gives_an_equal_but_separate_request():
    first = _events(BROWSER, True)
    p = RequestParser(Limits())
    p.feed(BROWSER)
    req = p.events[0][1]
    req.headers.append((b"X-Mutated", b"1"))  # the proxy's own changes stay with this request
    req.request_id = b"assigned"
    assert _events(BROWSER, True) == first == _events(BROWSER, False)
    small = Limits(header_count=2)  # other limits: judged again, not taken from the last one
    assert _events(BROWSER, True, small) == _events(BROWSER, False, small)
    assert _events(BROWSER, True, small)[-1][0] == ERROR


def test_the_scan_sets_apart_the_fields_the_fast_path_acts_on():
    """headscan hands over the fields the fast path acts on by their names: the same
    names, or a field would be forwarded that the fast path must judge (or the reverse)."""
    assert set(request._FAST_FIELDS) == headscan.REQUEST_SPECIAL
