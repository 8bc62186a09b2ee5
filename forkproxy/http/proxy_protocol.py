"""Sans-IO PROXY protocol v1 and v2 parser (HAProxy's proxy-protocol.txt).

An L4 balancer (HAProxy ``send-proxy``/``send-proxy-v2``, AWS NLB, keepalived/LVS with
a PROXY-speaking relay, ...) prepends one header to each TCP connection so the client's
address survives the hop. With ``proxy_protocol = true`` on a listener, every
connection must start with such a header; a connection without one is an error (the
spec forbids guessing: otherwise any client could forge its address).

Formats
-------
v1 (text), at most 107 bytes including the CRLF::

    PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\\r\\n
    PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\\r\\n
    PROXY UNKNOWN\\r\\n            (anything up to the CRLF is ignored)

v2 (binary): the 12-byte signature ``\\r\\n\\r\\n\\x00\\r\\nQUIT\\n``, one byte of
version (high nibble, must be 2) and command (low nibble: 0 LOCAL, 1 PROXY), one byte of
address family (high nibble: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX) and transport (low
nibble: 0 UNSPEC, 1 STREAM, 2 DGRAM), a big-endian 16-bit length of what follows, then
the addresses (12 bytes for INET, 36 for INET6, 216 for UNIX) and TLVs (skipped here;
their raw bytes are kept on the header object).

API
---
``parse(buf) -> (consumed, src) | None``
    ``None``: ``buf`` is a valid prefix, read more bytes. Otherwise ``consumed`` is the
    header's length (bytes after it belong to the application protocol) and ``src`` is
    the client's ``(ip, port)``, or ``None`` when the header carries no usable address
    (v2 LOCAL — health checks from the balancer itself —, v1 UNKNOWN, v2 UNSPEC/UNIX):
    then the connection's own peer address is the one to use.
    Raises :class:`ProxyProtocolError` (a ``ValueError``) for anything else; it is the
    only exception ``parse`` raises, for any input.
``parse_header(buf) -> ProxyHeader | None``
    The same, with every field (version, command, family, src, dst, tlvs).
``recv_header(sock, timeout, wait_readable=None) -> ProxyHeader``
    Reads exactly one header off a connected stream socket and nothing more, using
    ``MSG_PEEK`` then ``recv`` of exactly ``consumed`` bytes, so the bytes that follow
    (a TLS ClientHello or an HTTP request) stay in the kernel for whoever reads next —
    ``ssl.wrap_socket`` included. For gevent, pass ``gevent.socket.wait_read``.
``build_v1(src, dst)`` / ``build_v2(src, dst, local=False, tlvs=b"")``
    Encoders, for tests and clients.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import NamedTuple

__all__ = [
    "MAX_V1_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "build_v1",
    "build_v2",
    "parse",
    "parse_header",
    "recv_header",
]

V1_PREFIX = b"PROXY "
MAX_V1_LENGTH = 107  # "PROXY UNKNOWN ffff:...:ffff ffff:...:ffff 65535 65535\r\n"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = 16  # signature + ver/cmd + fam/proto + length

LOCAL, PROXY = "LOCAL", "PROXY"
_V2_FAMILIES = {0x0: ("UNSPEC", 0), 0x1: ("INET", 12), 0x2: ("INET6", 36), 0x3: ("UNIX", 216)}
_V2_TRANSPORTS = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header (close the connection)."""


class ProxyHeader(NamedTuple):
    """One parsed header. ``src``/``dst`` are ``(ip, port)`` or None (no IP addresses)."""

    version: int  # 1 or 2
    command: str  # "PROXY" or "LOCAL" (v1 is always "PROXY")
    family: str  # v1: "TCP4" "TCP6" "UNKNOWN"; v2: "INET" "INET6" "UNIX" "UNSPEC"
    src: tuple[str, int] | None
    dst: tuple[str, int] | None
    consumed: int  # header length in bytes
    tlvs: bytes = b""  # v2 only: the raw TLV area, not interpreted


def parse(buf: bytes) -> tuple[int, tuple[str, int] | None] | None:
    """``(consumed, src or None)``, ``None`` if more bytes are needed; raises
    :class:`ProxyProtocolError` if ``buf`` does not start with a valid header."""
    hdr = parse_header(buf)
    if hdr is None:
        return None
    return hdr.consumed, hdr.src


def parse_header(buf: bytes) -> ProxyHeader | None:
    """Parse one header at the start of ``buf``; ``None`` means "need more bytes"."""
    buf = bytes(buf) if not isinstance(buf, bytes) else buf
    if not buf:
        return None
    if buf[0] == 0x50:  # "P"
        return _parse_v1(buf)
    if buf[0] == 0x0D:  # "\r"
        return _parse_v2(buf)
    raise ProxyProtocolError(f"not a PROXY protocol header (starts with {buf[:8]!r})")


# -- v1 ----------------------------------------------------------------------------------


def _parse_v1(buf: bytes) -> ProxyHeader | None:
    head = buf[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(head):
        raise ProxyProtocolError(f"not a PROXY protocol header (starts with {buf[:8]!r})")
    end = buf.find(b"\r\n", 0, MAX_V1_LENGTH)
    if end < 0:
        window = buf[:MAX_V1_LENGTH]
        cr = window.find(b"\r")
        if 0 <= cr < len(window) - 1:
            raise ProxyProtocolError("PROXY v1: CR not followed by LF")
        _check_v1_chars(window.rstrip(b"\r"))
        if len(buf) >= MAX_V1_LENGTH:
            raise ProxyProtocolError(f"PROXY v1: no CRLF within {MAX_V1_LENGTH} bytes")
        return None
    line = buf[:end]
    _check_v1_chars(line)
    consumed = end + 2
    text = line.decode("ascii")
    parts = text.split(" ")
    if len(parts) < 2 or parts[0] != "PROXY":
        raise ProxyProtocolError(f"PROXY v1: malformed line {text!r}")
    proto = parts[1]
    if proto == "UNKNOWN":
        # the spec: the receiver must ignore anything after UNKNOWN up to the CRLF
        return ProxyHeader(1, PROXY, "UNKNOWN", None, None, consumed)
    if proto not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"PROXY v1: unknown protocol {proto!r} "
                                 "(expected TCP4, TCP6 or UNKNOWN)")
    if len(parts) != 6:
        raise ProxyProtocolError(f"PROXY v1: expected 'PROXY {proto} SRC DST SPORT DPORT', "
                                 f"got {text!r}")
    cls = ipaddress.IPv4Address if proto == "TCP4" else ipaddress.IPv6Address
    src_ip = _v1_addr(cls, parts[2], "source")
    dst_ip = _v1_addr(cls, parts[3], "destination")
    sport = _v1_port(parts[4], "source")
    dport = _v1_port(parts[5], "destination")
    return ProxyHeader(1, PROXY, proto, (src_ip, sport), (dst_ip, dport), consumed)


def _check_v1_chars(line: bytes) -> None:
    for b in line:
        if b < 0x20 or b > 0x7E:
            raise ProxyProtocolError(f"PROXY v1: invalid byte 0x{b:02x} in header line")


def _v1_addr(cls, text: str, what: str) -> str:
    try:
        if "%" in text:  # no IPv6 scope ids in the spec's grammar
            raise ValueError(text)
        return str(cls(text))
    except ValueError:
        kind = "IPv4" if cls is ipaddress.IPv4Address else "IPv6"
        raise ProxyProtocolError(f"PROXY v1: {what} address {text!r} is not an {kind} address")


def _v1_port(text: str, what: str) -> int:
    if not text.isdigit() or not text.isascii() or len(text) > 5 or (
            len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyProtocolError(f"PROXY v1: {what} port {text!r} is not 0-65535")
    return int(text)


# -- v2 ----------------------------------------------------------------------------------


def _parse_v2(buf: bytes) -> ProxyHeader | None:
    n = min(len(buf), len(V2_SIGNATURE))
    if buf[:n] != V2_SIGNATURE[:n]:
        raise ProxyProtocolError(f"not a PROXY protocol header (starts with {buf[:8]!r})")
    if len(buf) < V2_HEADER:
        if len(buf) > 12 and buf[12] >> 4 != 2:
            raise ProxyProtocolError(f"PROXY v2: unsupported version {buf[12] >> 4}")
        return None
    ver_cmd, fam_proto, length = struct.unpack_from("!BBH", buf, 12)
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2: unsupported version {ver_cmd >> 4}")
    cmd = ver_cmd & 0x0F
    if cmd not in (0, 1):
        raise ProxyProtocolError(f"PROXY v2: unknown command {cmd}")
    fam = _V2_FAMILIES.get(fam_proto >> 4)
    transport = _V2_TRANSPORTS.get(fam_proto & 0x0F)
    if fam is None or transport is None:
        raise ProxyProtocolError(f"PROXY v2: unknown address family/transport 0x{fam_proto:02x}")
    family, addr_len = fam
    if cmd == 1 and length < addr_len:
        raise ProxyProtocolError(f"PROXY v2: length {length} is too short for {family} "
                                 f"addresses ({addr_len} bytes)")
    consumed = V2_HEADER + length
    if len(buf) < consumed:
        return None
    body = buf[V2_HEADER:consumed]
    if cmd == 0:
        # LOCAL: the balancer's own connection (health check); the address block, if
        # any, must be ignored and the real peer address used
        return ProxyHeader(2, LOCAL, family, None, None, consumed, b"")
    if family in ("INET", "INET6") and transport != "STREAM":
        raise ProxyProtocolError(f"PROXY v2: {family} over {transport} on a TCP listener")
    src = dst = None
    if family == "INET":
        s, d, sp, dp = struct.unpack_from("!4s4sHH", body)
        src = (str(ipaddress.IPv4Address(s)), sp)
        dst = (str(ipaddress.IPv4Address(d)), dp)
    elif family == "INET6":
        s, d, sp, dp = struct.unpack_from("!16s16sHH", body)
        src = (str(ipaddress.IPv6Address(s)), sp)
        dst = (str(ipaddress.IPv6Address(d)), dp)
    # UNIX and UNSPEC carry no IP address: the connection's own peer address applies
    return ProxyHeader(2, PROXY, family, src, dst, consumed, bytes(body[addr_len:]))


# -- reading from a socket ---------------------------------------------------------------


def _poll_readable(fd: int, timeout: float | None) -> None:
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLPRI)
    if not p.poll(None if timeout is None else max(0, int(timeout * 1000))):
        raise TimeoutError("timed out waiting for the PROXY protocol header")


def recv_header(sock: socket.socket, timeout: float,
                wait_readable: Callable[..., object] | None = None) -> ProxyHeader:
    """Read exactly one PROXY header from ``sock`` within ``timeout`` seconds.

    Peeks (``MSG_PEEK``) until the header is complete, then consumes exactly its length,
    so nothing after it is taken off the socket. While a header is incomplete,
    ``SO_RCVLOWAT`` is raised so the socket only polls readable once more bytes have
    arrived (no busy loop on a header split across segments); it is reset to 1 after.
    ``sock`` must be a TCP socket (poll honours SO_RCVLOWAT there).
    ``wait_readable(fd, timeout=seconds)`` must block (or yield, under gevent) until the
    fd is readable and raise ``TimeoutError`` when the time is up; the default uses
    ``poll(2)``. Raises :class:`ProxyProtocolError`, ``TimeoutError`` or ``OSError``.
    """
    wait = wait_readable or _poll_readable
    fd = sock.fileno()
    deadline = time.monotonic() + timeout
    want = 232  # enough for any v1 header and v2 INET/INET6 headers with small TLVs
    lowat = 1
    seen = -1
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out waiting for the PROXY protocol header")
            wait(fd, timeout=remaining)
            buf = sock.recv(want, socket.MSG_PEEK)
            if not buf:
                raise ProxyProtocolError("connection closed before the PROXY protocol header")
            hdr = parse_header(buf)
            if hdr is not None:
                break
            if len(buf) == seen:
                # readable with SO_RCVLOWAT above what is queued: end of stream
                raise ProxyProtocolError("connection closed inside the PROXY protocol header")
            seen = len(buf)
            if len(buf) >= V2_HEADER and buf[:12] == V2_SIGNATURE:
                want = V2_HEADER + struct.unpack_from("!H", buf, 14)[0]
            if len(buf) < want:
                lowat = len(buf) + 1
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
        got = 0
        while got < hdr.consumed:  # the bytes are queued already: recv does not wait
            chunk = sock.recv(hdr.consumed - got)
            if not chunk:
                raise ProxyProtocolError("connection closed inside the PROXY protocol header")
            got += len(chunk)
        return hdr
    finally:
        if lowat != 1:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass


# -- encoders ------------------------------------------------------------------------


def build_v1(src: tuple[str, int] | None, dst: tuple[str, int] | None = None) -> bytes:
    """``PROXY TCP4|TCP6 ...\\r\\n``, or ``PROXY UNKNOWN\\r\\n`` when src is None."""
    if src is None:
        return b"PROXY UNKNOWN\r\n"
    ip = ipaddress.ip_address(src[0])
    dst = dst or (("0.0.0.0" if ip.version == 4 else "::"), 0)
    proto = "TCP4" if ip.version == 4 else "TCP6"
    return f"PROXY {proto} {ip} {ipaddress.ip_address(dst[0])} {src[1]} {dst[1]}\r\n".encode()


def build_v2(src: tuple[str, int] | None, dst: tuple[str, int] | None = None, *,
             local: bool = False, tlvs: bytes = b"") -> bytes:
    """A v2 header: PROXY with INET/INET6 addresses, or LOCAL (or UNSPEC if src is None)."""
    if local or src is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20 if local else 0x21, 0x00,
                                          len(tlvs)) + tlvs
    ip = ipaddress.ip_address(src[0])
    dst = dst or (("0.0.0.0" if ip.version == 4 else "::"), 0)
    dip = ipaddress.ip_address(dst[0])
    if ip.version != dip.version:
        raise ValueError("source and destination must be of the same IP version")
    fam = 0x11 if ip.version == 4 else 0x21
    addrs = ip.packed + dip.packed + struct.pack("!HH", src[1], dst[1])
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, fam, len(addrs) + len(tlvs)) + addrs + tlvs

