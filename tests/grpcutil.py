"""Test helpers for gRPC: a real grpcio server with generic handlers on raw bytes (no protoc),
on loopback, over h2c or TLS with a test CA; and clients for it.

The service is ``test.Echo``:

- ``Unary``: the request back; the client's ``x-*`` metadata comes back as initial metadata
  (so a test sees that it reached the server) and ``x-trailer: done`` as trailing metadata;
- ``NotFound``: aborts with NOT_FOUND and the details ``no such thing: <request>``;
- ``Stream``: server streaming, ``int(request)`` messages ``b"0"``, ``b"1"``, ...;
- ``Flood``: server streaming, ``int(request)`` messages of :data:`FLOOD_MESSAGE` bytes,
  each counted in ``seen.flooded`` when grpcio took it (so a test sees backpressure);
- ``Collect``: client streaming, the number of messages and bytes received;
- ``PingPong``: bidi, ``b"pong " + message`` for each message, in order;
- ``Slow``: answers after :data:`SLOW_SECONDS` unless the call ends first (deadline, cancel);
  the server records which calls were cancelled.

:class:`StallingOrigin` is an h2c server (the h2 library) that takes requests and never
answers them: a deadline that fires there is the proxy's own.

Every message size limit is :data:`MAX_MESSAGE` on both sides (4 MiB messages pass).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trustme

SERVICE = "test.Echo"
SLOW_SECONDS = 2.0
FLOOD_MESSAGE = 256 * 1024
MAX_MESSAGE = 16 * 1024 * 1024
MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]


@dataclass
class Seen:
    """What the server saw, for tests to assert on."""

    calls: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    flooded: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str) -> None:
        with self.lock:
            self.calls.append(method)


def _echo_metadata(context: grpc.ServicerContext) -> None:
    echoed = tuple((k, v) for k, v in context.invocation_metadata() if k.startswith("x-"))
    context.send_initial_metadata(echoed)
    context.set_trailing_metadata((("x-trailer", "done"),))


class Handlers:
    """The methods of test.Echo, each recording its call in ``seen``."""

    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.seen.add("Unary")
        _echo_metadata(context)
        return request

    def not_found(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.seen.add("NotFound")
        context.abort(grpc.StatusCode.NOT_FOUND, f"no such thing: {request.decode()}")
        raise AssertionError("abort returns only by raising")

    def stream(self, request: bytes, context: grpc.ServicerContext):
        self.seen.add("Stream")
        for i in range(int(request)):
            yield b"%d" % i

    def flood(self, request: bytes, context: grpc.ServicerContext):
        self.seen.add("Flood")
        message = b"f" * FLOOD_MESSAGE
        for _ in range(int(request)):
            yield message
            self.seen.flooded += 1  # grpcio asks for the next one once it took this one

    def collect(self, requests, context: grpc.ServicerContext) -> bytes:
        self.seen.add("Collect")
        count = size = 0
        for message in requests:
            count += 1
            size += len(message)
        return b"%d %d" % (count, size)

    def ping_pong(self, requests, context: grpc.ServicerContext):
        self.seen.add("PingPong")
        for message in requests:
            yield b"pong " + message

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.seen.add("Slow")
        ended = threading.Event()
        context.add_callback(ended.set)
        if ended.wait(SLOW_SECONDS):
            with self.seen.lock:
                self.seen.cancelled.append("Slow")
            return b""
        return b"slow " + request

    def generic(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "NotFound": grpc.unary_unary_rpc_method_handler(self.not_found),
            "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
            "Flood": grpc.unary_stream_rpc_method_handler(self.flood),
            "Collect": grpc.stream_unary_rpc_method_handler(self.collect),
            "PingPong": grpc.stream_stream_rpc_method_handler(self.ping_pong),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
        })


@dataclass
class Certs:
    """A test CA and a localhost certificate from it (trustme), as PEM bytes."""

    ca_pem: bytes
    cert_chain_pem: bytes
    key_pem: bytes
    paths: dict[str, str]  # the same as files in a directory: "ca", "cert", "key"

    @classmethod
    def create(cls, directory) -> Certs:
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        pems = {"ca": ca.cert_pem.bytes(),
                "cert": b"".join(b.bytes() for b in leaf.cert_chain_pems),
                "key": leaf.private_key_pem.bytes()}
        paths = {name: f"{directory}/grpc-{name}.pem" for name in pems}
        for name, data in pems.items():
            with open(paths[name], "wb") as f:
                f.write(data)
        return cls(pems["ca"], pems["cert"], pems["key"], paths)


class GrpcServer:
    """test.Echo on 127.0.0.1 (a free port), h2c or, with ``certs``, TLS (ALPN h2).

    Runs on grpcio's own threads in the test process; :meth:`stop` ends every call and
    joins them, and a stopped server's port refuses connections."""

    def __init__(self, certs: Certs | None = None, workers: int = 16) -> None:
        self.seen = Seen()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                                  handlers=[Handlers(self.seen).generic()],
                                  options=[*MESSAGE_OPTIONS, ("grpc.so_reuseport", 0)])
        if certs is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            creds = grpc.ssl_server_credentials([(certs.key_pem, certs.cert_chain_pem)])
            self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        if not self.port:
            raise RuntimeError("grpc server could not bind a loopback port")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=None).wait(30)


def channel(port: int, certs: Certs | None = None, host: str = "127.0.0.1") -> grpc.Channel:
    """A client channel to ``port``: h2c, or TLS verified against the test CA for the name
    ``localhost`` (grpcio offers ALPN h2 only)."""
    target = f"{host}:{port}"
    if certs is None:
        return grpc.insecure_channel(target, options=MESSAGE_OPTIONS)
    creds = grpc.ssl_channel_credentials(root_certificates=certs.ca_pem)
    return grpc.secure_channel(target, creds, options=[
        *MESSAGE_OPTIONS, ("grpc.ssl_target_name_override", "localhost")])


class EchoClient:
    """Callables for each method of test.Echo on one channel (bytes in, bytes out)."""

    def __init__(self, ch: grpc.Channel) -> None:
        self.channel = ch
        path = f"/{SERVICE}/"
        self.unary = ch.unary_unary(path + "Unary")
        self.not_found = ch.unary_unary(path + "NotFound")
        self.stream = ch.unary_stream(path + "Stream")
        self.collect = ch.stream_unary(path + "Collect")
        self.ping_pong = ch.stream_stream(path + "PingPong")
        self.slow = ch.unary_unary(path + "Slow")

    def close(self) -> None:
        self.channel.close()


def wait_ready(ch: grpc.Channel, timeout: float) -> None:
    grpc.channel_ready_future(ch).result(timeout=timeout)


def timed(fn, *args, **kwargs):
    """(result or the RpcError raised, seconds taken)."""
    t0 = time.monotonic()
    try:
        out = fn(*args, **kwargs)
    except grpc.RpcError as e:
        out = e
    return out, time.monotonic() - t0


def frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed)."""
    return struct.pack(">BI", 0, len(message)) + message


def unframe(body: bytes) -> list[bytes]:
    """The messages of a gRPC response body."""
    out, at = [], 0
    while at < len(body):
        _, length = struct.unpack(">BI", body[at:at + 5])
        out.append(body[at + 5:at + 5 + length])
        at += 5 + length
    return out


def widen_windows(client, size: int) -> None:
    """Give an h2client.SocketClient's connection and new streams a ``size`` window: h2
    acknowledges received data whenever half a window is consumed, so a 64 KiB window
    means two WINDOW_UPDATE frames per 32 KiB read."""
    client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: size})
    client.conn.increment_flow_control_window(size - client.conn.inbound_flow_control_window)
    client.flush()


def drain(client, sid: int) -> dict:
    """Read stream ``sid`` of an h2client.SocketClient to its end, keeping the body as a
    list of chunks (SocketClient.wait's ``+=`` is quadratic for tens of MiB):
    {"status", "body", "trailers", "reset"}."""
    chunks: list[bytes] = []
    out = {"status": None, "body": b"", "trailers": {}, "reset": None}
    conn, ended = client.conn, False
    while not ended:
        data = client.sock.recv(1 << 20)
        if not data:
            break
        for ev in conn.receive_data(data):
            if getattr(ev, "stream_id", None) != sid:
                continue
            if isinstance(ev, h2.events.ResponseReceived):
                out["status"] = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived):
                chunks.append(ev.data)
                conn.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.TrailersReceived):
                out["trailers"] = dict(ev.headers)
            elif isinstance(ev, h2.events.StreamReset):
                out["reset"] = ev.error_code
                ended = True
            elif isinstance(ev, h2.events.StreamEnded):
                ended = True
        client.flush()
    out["body"] = b"".join(chunks)
    return out


def grpc_request(path: str, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    """Request headers of a gRPC call over h2c, as a raw HTTP/2 client sends them."""
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"grpc.test"),
            (b":path", path.encode()), (b"content-type", b"application/grpc"),
            (b"te", b"trailers"), *extra]


class StallingOrigin:
    """An h2c origin that reads requests and never answers; it records each stream it
    saw open and each one the peer abandoned (reset it, or closed the connection), so a
    test sees the proxy give up upstream."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.opened: list[int] = []
        self.abandoned: list[int] = []
        self.conns: list[socket.socket] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        h2c.initiate_connection()
        mine: list[int] = []
        try:
            conn.sendall(h2c.data_to_send())
            while data := conn.recv(65536):
                for ev in h2c.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        self.opened.append(ev.stream_id)
                        mine.append(ev.stream_id)
                    elif isinstance(ev, h2.events.StreamReset) and ev.stream_id in mine:
                        self.abandoned.append(ev.stream_id)
                        mine.remove(ev.stream_id)
                    elif isinstance(ev, h2.events.DataReceived):
                        h2c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                conn.sendall(h2c.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            pass
        finally:
            if not self.stopping:
                self.abandoned += mine
            conn.close()

    def stop(self) -> None:
        self.stopping = True
        self.listener.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(10)
