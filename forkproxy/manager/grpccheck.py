"""The ``type = "grpc"`` active health check: one call of the gRPC health protocol
(``grpc.health.v1.Health/Check``, grpc/doc/health-checking.md) over HTTP/2, on the same
client session the workers use towards HTTP/2 upstreams (forkproxy/http2/client.py).

The request message is ``HealthCheckRequest { string service = 1; }`` and the answer
``HealthCheckResponse { ServingStatus status = 1; }``, both encoded here by hand (two
protobuf fields: no protobuf library needed). A success is grpc-status 0 with status
SERVING (1) within the timeout; NOT_SERVING, an unknown service (grpc-status 5) or any
other answer is a failure.
"""

from __future__ import annotations

import struct

from forkproxy.http2 import client as h2c
from forkproxy.manager import healthcheck

PATH = b"/grpc.health.v1.Health/Check"
SERVING = 1
#: what the table records for a check that got a gRPC answer other than SERVING
NOT_SERVING_STATUS = 503


def request_message(service: str) -> bytes:
    """The length-prefixed HealthCheckRequest for ``service``."""
    name = service.encode()
    body = b"\x0a" + _varint(len(name)) + name if name else b""
    return struct.pack(">BI", 0, len(body)) + body


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def serving_status(data: bytes) -> int:
    """The status field of a length-prefixed HealthCheckResponse (0: absent or bad)."""
    if len(data) < 5 or data[0] != 0:
        return 0
    (n,) = struct.unpack(">I", data[1:5])
    msg = data[5:5 + n]
    i = 0
    while i < len(msg):
        key = msg[i]
        i += 1
        value, i = _read_varint(msg, i)
        if key == 0x08:
            return value
        if key & 7 == 2:  # a length-delimited field of a newer version: skipped
            i += value
        elif key & 7 != 0:
            return 0
    return 0


def _read_varint(msg: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while i < len(msg):
        b = msg[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return value, i


def check_grpc(sock, authority: str, service: str, scheme: bytes) -> bool:
    """One Health/Check call on a connected socket (plain or TLS with h2 agreed); the
    caller bounds it in time and closes the socket. True: SERVING."""
    session = h2c.ClientSession()
    try:
        sid = session.request([
            (b":method", b"POST"), (b":scheme", scheme), (b":authority", authority.encode()),
            (b":path", PATH), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
            (b"user-agent", b"forkproxy-health-check")], end_stream=False)
        session.send_data(sid, request_message(service))
        session.end(sid)
        data = bytearray()
        grpc_status = None
        while True:
            out = session.data_to_send()
            if out:
                sock.sendall(out)
            chunk = sock.recv(16384)
            if not chunk:
                return False
            session.receive(chunk)
            for kind, s, payload in session.events:
                if s != sid:
                    continue
                if kind == h2c.DATA:
                    data += payload
                    session.consume(sid, len(payload))
                elif kind in (h2c.HEAD, h2c.TRAILERS):
                    fields = payload[1] if kind == h2c.HEAD else payload
                    grpc_status = dict(fields).get(b"grpc-status", grpc_status)
                elif kind == h2c.CLOSED:
                    return grpc_status == b"0" and serving_status(bytes(data)) == SERVING
            session.events.clear()
    finally:
        session.close()


healthcheck.GRPC.update(call=check_grpc, not_serving=NOT_SERVING_STATUS)
