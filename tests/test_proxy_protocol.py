"""PROXY protocol v1/v2 parser: valid headers, LOCAL/UNKNOWN, truncation, garbage, limits,
fuzzing (only ProxyProtocolError ever escapes), and the peek-based socket reader."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forkproxy.http import proxy_protocol as pp
from forkproxy.http.proxy_protocol import (
    MAX_V1_LENGTH,
    V2_SIGNATURE,
    ProxyProtocolError,
    build_v1,
    build_v2,
    parse,
    parse_header,
    recv_header,
)

REQ = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


# -- v1 --------------------------------------------------------------------------------


def test_v1_tcp4():
    line = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
    assert parse(line + REQ) == (len(line), ("192.0.2.1", 56324))
    hdr = parse_header(line)
    assert hdr.version == 1 and hdr.command == "PROXY" and hdr.family == "TCP4"
    assert hdr.dst == ("198.51.100.2", 443)


def test_v1_tcp6():
    line = b"PROXY TCP6 2001:db8::1 2001:db8:0:0:0:0:0:2 1 65535\r\n"
    consumed, src = parse(line + REQ)
    assert consumed == len(line)
    assert src == ("2001:db8::1", 1)
    assert parse_header(line).dst == ("2001:db8::2", 65535)


def test_v1_unknown_ignores_the_rest_of_the_line():
    assert parse(b"PROXY UNKNOWN\r\n" + REQ) == (15, None)
    line = b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n"
    assert parse(line) == (len(line), None)


def test_v1_longest_header_is_accepted_and_one_more_byte_is_not():
    v6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {v6} {v6} 65535 65535\r\n".encode()
    assert len(line) == 104
    assert parse(line)[0] == 104
    longest = b"PROXY UNKNOWN " + b"x" * (MAX_V1_LENGTH - 16) + b"\r\n"
    assert len(longest) == MAX_V1_LENGTH
    assert parse(longest) == (MAX_V1_LENGTH, None)
    too_long = b"PROXY UNKNOWN " + b"x" * (MAX_V1_LENGTH - 15) + b"\r\n"
    with pytest.raises(ProxyProtocolError, match="no CRLF within 107"):
        parse(too_long)


def test_v1_without_crlf_after_107_bytes_is_an_error_not_a_wait():
    with pytest.raises(ProxyProtocolError, match="no CRLF"):
        parse(b"PROXY UNKNOWN " + b"a" * 200)


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",  # missing port
    b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443 9\r\n",  # extra field
    b"PROXY TCP4  192.0.2.1 198.51.100.2 56324 443\r\n",  # double space
    b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443 \r\n",  # trailing space
    b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",  # v6 address in TCP4
    b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",  # v4 address in TCP6
    b"PROXY TCP4 192.0.2.01 198.51.100.2 1 2\r\n",  # leading zero in an octet
    b"PROXY TCP4 192.0.2.256 198.51.100.2 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",  # port out of range
    b"PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n",  # leading zero in a port
    b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 2\r\n",
    b"PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n",  # scope id
    b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
    b"PROXY tcp4 192.0.2.1 198.51.100.2 1 2\r\n",
    b"PROXY\r\n",
    b"PROXY \r\n",
    b"PROXY TCP4 192.0.2.1\x00 198.51.100.2 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",
])
def test_v1_malformed(line):
    with pytest.raises(ProxyProtocolError):
        parse(line)


def test_v1_prefixes_need_more():
    line = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
    for i in range(len(line)):
        assert parse(line[:i]) is None, line[:i]


def test_v1_bad_byte_fails_before_the_crlf_arrives():
    with pytest.raises(ProxyProtocolError, match="invalid byte"):
        parse(b"PROXY TCP4 1\x16\x03")
    with pytest.raises(ProxyProtocolError, match="CR not followed by LF"):
        parse(b"PROXY TCP4\rX")


# -- v2 --------------------------------------------------------------------------------


def test_v2_inet():
    hdr = build_v2(("192.0.2.1", 56324), ("198.51.100.2", 443))
    assert len(hdr) == 16 + 12
    assert parse(hdr + REQ) == (28, ("192.0.2.1", 56324))
    h = parse_header(hdr)
    assert (h.version, h.command, h.family, h.dst) == (2, "PROXY", "INET", ("198.51.100.2", 443))


def test_v2_inet6():
    hdr = build_v2(("2001:db8::1", 5), ("2001:db8::2", 443))
    assert len(hdr) == 16 + 36
    assert parse(hdr + REQ) == (52, ("2001:db8::1", 5))


def test_v2_tlvs_are_skipped_and_kept_raw():
    tlvs = b"\x01\x00\x02h2" + b"\x04\x00\x00"  # ALPN "h2" + NOOP
    hdr = build_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=tlvs)
    h = parse_header(hdr + REQ)
    assert h.consumed == 16 + 12 + len(tlvs)
    assert h.src == ("192.0.2.1", 1)
    assert h.tlvs == tlvs


def test_v2_local_uses_the_real_peer():
    hdr = build_v2(None, local=True)
    assert parse(hdr + REQ) == (16, None)
    assert parse_header(hdr).command == "LOCAL"
    # LOCAL with an address block (some balancers send one): ignored, fully consumed
    body = bytes(12)
    hdr = V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x11, len(body)) + body
    assert parse(hdr) == (28, None)


def test_v2_unspec_and_unix_carry_no_ip():
    assert parse(build_v2(None)) == (16, None)
    body = b"/run/a.sock".ljust(108, b"\0") + b"/run/b.sock".ljust(108, b"\0")
    hdr = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x31, len(body)) + body
    h = parse_header(hdr)
    assert (h.family, h.src, h.consumed) == ("UNIX", None, 16 + 216)


def test_v2_prefixes_need_more():
    hdr = build_v2(("2001:db8::1", 5), ("2001:db8::2", 443), tlvs=b"\x04\x00\x01x")
    for i in range(len(hdr)):
        assert parse(hdr[:i]) is None, i


@pytest.mark.parametrize("hdr,match", [
    (V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "version"),
    (V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), "version"),
    (V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "command"),
    (V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12), "family"),
    (V2_SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12), "family"),
    (V2_SIGNATURE + b"\x21\x11\x00\x0b" + bytes(11), "too short"),
    (V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), "too short"),
    (V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "DGRAM"),
    (b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + bytes(12), "not a PROXY"),
])
def test_v2_malformed(hdr, match):
    with pytest.raises(ProxyProtocolError, match=match):
        parse(hdr)


def test_v2_wrong_version_fails_before_the_length_arrives():
    with pytest.raises(ProxyProtocolError, match="version"):
        parse(V2_SIGNATURE + b"\x11")


# -- neither ---------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    REQ, b"\x16\x03\x01\x02\x00", b"proxy TCP4", b"PROXZ", b"\r\n\r\nGET", b"\x00",
])
def test_garbage_is_rejected_at_once(data):
    with pytest.raises(ProxyProtocolError, match="not a PROXY protocol header"):
        parse(data)


def test_empty_needs_more():
    assert parse(b"") is None
    assert parse(memoryview(b"PRO")) is None


# -- fuzzing ---------------------------------------------------------------------------

addr4 = st.ip_addresses(v=4).map(str)
addr6 = st.ip_addresses(v=6).map(str)
port = st.integers(0, 65535)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    try:
        res = parse(data)
    except ProxyProtocolError:
        return
    if res is not None:
        consumed, src = res
        assert 0 < consumed <= len(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"PROXY ", V2_SIGNATURE]), st.binary(max_size=300))
def test_fuzz_after_a_valid_prefix(prefix, data):
    try:
        res = parse(prefix + data)
    except ProxyProtocolError:
        return
    if res is not None:
        assert 0 < res[0] <= len(prefix) + len(data)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.tuples(addr4, addr4), st.tuples(addr6, addr6)), port, port,
       st.sampled_from([1, 2]), st.binary(max_size=64), st.integers(0, 8))
def test_fuzz_round_trip_and_mutations(addrs, sport, dport, version, tail, flip):
    src, dst = (addrs[0], sport), (addrs[1], dport)
    hdr = build_v1(src, dst) if version == 1 else build_v2(src, dst)
    assert parse(hdr + tail) == (len(hdr), src)
    # every strict prefix asks for more
    assert parse(hdr[: len(hdr) // 2]) is None
    # a flipped byte is either still a valid header or a ProxyProtocolError
    mutated = bytearray(hdr)
    i = (flip * 7919) % len(mutated)
    mutated[i] ^= 0xFF
    try:
        parse(bytes(mutated) + tail)
    except ProxyProtocolError:
        pass


# -- reading from a socket -------------------------------------------------------------


def _pair():
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    client = socket.create_connection(lsock.getsockname())
    server, _ = lsock.accept()
    lsock.close()
    return client, server


def test_recv_header_leaves_the_request_on_the_socket():
    client, server = _pair()
    with client, server:
        hdr = build_v2(("203.0.113.9", 4242), ("127.0.0.1", 80))
        client.sendall(hdr + REQ)
        h = recv_header(server, 2.0)
        assert h.src == ("203.0.113.9", 4242)
        server.settimeout(2)
        assert server.recv(4096) == REQ


def test_recv_header_across_trickled_segments_without_spinning():
    client, server = _pair()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    line = build_v1(("192.0.2.7", 1000), ("192.0.2.8", 80))
    calls = []

    def wait(fd, timeout=None):
        calls.append(fd)
        pp._poll_readable(fd, timeout)

    def trickle():
        for i in range(len(line)):
            client.send(line[i:i + 1])
            time.sleep(0.003)
        client.send(REQ)

    t = threading.Thread(target=trickle)
    t.start()
    try:
        h = recv_header(server, 5.0, wait_readable=wait)
    finally:
        t.join()
    with client, server:
        assert h.src == ("192.0.2.7", 1000)
        # at most one wake-up per segment (SO_RCVLOWAT), never a busy loop
        assert len(calls) <= len(line) + 1
        assert server.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
        server.settimeout(2)
        data = b""
        while len(data) < len(REQ):
            data += server.recv(4096)
        assert data == REQ


def test_recv_header_large_v2_tlvs():
    client, server = _pair()
    with client, server:
        tlvs = b"\x04" + struct.pack("!H", 3000) + bytes(3000)
        hdr = build_v2(("2001:db8::5", 1), ("2001:db8::6", 2), tlvs=tlvs)
        client.sendall(hdr + b"X")
        h = recv_header(server, 2.0)
        assert h.consumed == len(hdr) and h.src == ("2001:db8::5", 1)
        assert server.recv(10) == b"X"


def test_recv_header_errors():
    client, server = _pair()
    with client, server:
        client.sendall(REQ)
        with pytest.raises(ProxyProtocolError):
            recv_header(server, 2.0)
    client, server = _pair()
    with client, server:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            recv_header(server, 0.2)
        assert time.monotonic() - t0 >= 0.19  # not before its timeout
    client, server = _pair()
    with client, server:
        client.sendall(b"PROXY TCP4 1.2")
        client.shutdown(socket.SHUT_WR)
        with pytest.raises(ProxyProtocolError, match="closed"):
            recv_header(server, 3.0)  # "closed", not a timeout: it did not wait
    client, server = _pair()
    with client, server:
        client.close()
        with pytest.raises(ProxyProtocolError, match="closed"):
            recv_header(server, 2.0)
