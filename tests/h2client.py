"""A raw HTTP/2 client on the h2 library that drives forkproxy.http2.session.ServerSession
sans-IO (bytes in, bytes out, no socket). h2 is the test oracle: its own outbound
validation is switched off so the client can send what a hostile one would, and frames
h2 refuses to build are built with hyperframe, HPACK-encoded with the client's encoder
(so the server's decoder state stays in step)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hpack
from hyperframe.frame import ContinuationFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame

from forkproxy.http2.session import CLOSED, DATA, END, REQUEST

KINDS = {REQUEST: "REQUEST", DATA: "DATA", END: "END", CLOSED: "CLOSED"}

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.test"),
       (b":path", b"/a")]


def client_config(**kw) -> h2.config.H2Configuration:
    return h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False, split_outbound_cookies=False,
        validate_inbound_headers=False, **kw)


class RawClient:
    """One client connection to one ServerSession."""

    def __init__(self, session, *, handshake: bool = True):
        self.session = session
        self.conn = h2.connection.H2Connection(client_config())
        self.events: list = []  # what the client saw (h2 events)
        self.yielded: list = []  # what the session yielded ((kind, sid, payload))
        self.frames: list = []  # every frame the server sent (hyperframe), in order
        self._partial = b""
        self._decoder = hpack.Decoder()
        self.heads: dict[int, list[dict]] = {}  # every header block the server sent, decoded
        self.conn.initiate_connection()
        if handshake:
            self.pump()

    def pump(self, rounds: int = 20) -> list:
        """Move bytes both ways until both sides are quiet; returns the new h2 events."""
        new = []
        for _ in range(rounds):
            data = self.conn.data_to_send()
            if data:
                self.session.receive(data)
            self._collect()
            out = self.session.data_to_send()
            if out:
                self._parse(out)
                try:
                    new += self.conn.receive_data(out)
                except h2.exceptions.ProtocolError as e:  # the server's GOAWAY closed it
                    new.append(e)
            if not data and not out:
                break
        for ev in new:
            if isinstance(ev, h2.events.DataReceived) and ev.flow_controlled_length:
                try:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                except h2.exceptions.StreamClosedError:
                    pass
        self.events += new
        return new

    def _parse(self, data: bytes) -> None:
        buf = self._partial + data
        while len(buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(buf[:9]))
            if len(buf) < 9 + length:
                break
            frame.parse_body(memoryview(buf[9:9 + length]))
            self.frames.append(frame)
            if isinstance(frame, HeadersFrame):  # forkproxy never splits its blocks
                fields = self._decoder.decode(frame.data, raw=True)
                self.heads.setdefault(frame.stream_id, []).append(dict(fields))
            buf = buf[9 + length:]
        self._partial = buf

    def raw(self, data: bytes) -> list:
        """Bytes the h2 library would not send, straight to the server."""
        self.session.receive(data)
        self._collect()
        return self.pump()

    def _collect(self) -> None:
        events = self.session.events
        while events:
            self.yielded.append(events.popleft())

    def send(self, headers, body: bytes | None = None, *, end_stream: bool | None = None,
             sid: int | None = None) -> int:
        sid = sid or self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=body is None if end_stream is None
                               else end_stream)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=True)
        return sid

    def headers_frames(self, sid: int, headers, *, continuations: int = 0,
                       end_stream: bool = True) -> bytes:
        """A HEADERS frame split into 1 + ``continuations`` frames (hyperframe)."""
        block = self.conn.encoder.encode(headers)
        n = continuations + 1
        size = max(1, -(-len(block) // n))
        pieces = [block[i:i + size] for i in range(0, len(block), size)] or [b""]
        pieces += [b""] * (n - len(pieces))
        frames = []
        for i, piece in enumerate(pieces):
            flags = set()
            if i == n - 1:
                flags.add("END_HEADERS")
            if i == 0:
                if end_stream:
                    flags.add("END_STREAM")
                frames.append(HeadersFrame(sid, data=piece, flags=flags).serialize())
            else:
                frames.append(ContinuationFrame(sid, data=piece, flags=flags).serialize())
        return b"".join(frames)

    # -- what happened -------------------------------------------------------------------

    def requests(self) -> list:
        return [p for k, _, p in self.yielded if k == REQUEST]

    def kinds(self, sid: int | None = None) -> list[str]:
        return [KINDS[k] for k, s, _ in self.yielded if sid is None or s == sid]

    def body(self, sid: int) -> bytes:
        return b"".join(p for k, s, p in self.yielded if k == DATA and s == sid)

    def resets(self) -> dict[int, int]:
        """RST_STREAM frames the server sent: stream id -> error code."""
        return {f.stream_id: f.error_code for f in self.frames if isinstance(f, RstStreamFrame)}

    def goaways(self) -> list:
        """GOAWAY frames the server sent, in order."""
        return [f for f in self.frames if isinstance(f, GoAwayFrame)]

    def goaway(self):
        """The last GOAWAY the server sent, or None."""
        frames = self.goaways()
        return frames[-1] if frames else None

    def responses(self) -> dict[int, dict]:
        """The final response head of each stream the server answered."""
        out = {}
        for sid, blocks in self.heads.items():
            for block in blocks:
                status = block.get(b":status", b"")
                if status and not status.startswith(b"1"):
                    out[sid] = block
                    break
        return out


class SocketClient:
    """The h2 library as a client over a real socket (h2c prior knowledge), permissive
    like RawClient: for protocol violations sent through a real proxy."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0):
        import socket

        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.conn = h2.connection.H2Connection(client_config())
        self.conn.initiate_connection()
        self.events: list = []
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send(self, headers, body: bytes | None = None, *, end_stream: bool | None = None) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=body is None if end_stream is None
                               else end_stream)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=True)
        self.flush()
        return sid

    def wait(self, sid: int) -> dict:
        """Read until stream ``sid`` ended or was reset (or the connection ended):
        {"status", "headers", "body", "reset", "goaway", "trailers", "interim"}; interim:
        the 1xx header blocks before the final one, in order; trailers: a dict or None."""
        out = {"status": None, "headers": {}, "body": b"", "reset": None, "goaway": None,
               "trailers": None, "interim": []}
        while True:
            for ev in self.events:
                if getattr(ev, "stream_id", None) == sid:
                    if isinstance(ev, h2.events.ResponseReceived):
                        out["headers"] = dict(ev.headers)
                        out["status"] = int(out["headers"][b":status"])
                    elif isinstance(ev, h2.events.DataReceived):
                        out["body"] += ev.data
                    elif isinstance(ev, h2.events.InformationalResponseReceived):
                        out["interim"].append(dict(ev.headers))
                    elif isinstance(ev, h2.events.TrailersReceived):
                        out["trailers"] = dict(ev.headers)
                    elif isinstance(ev, h2.events.StreamReset):
                        out["reset"] = ev.error_code
                        return out
                    elif isinstance(ev, h2.events.StreamEnded):
                        return out
                if isinstance(ev, h2.events.ConnectionTerminated):
                    out["goaway"] = ev.error_code
                    return out
            self.events = []
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                out["goaway"] = out["goaway"] if out["goaway"] is not None else -1
                return out
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.DataReceived) and ev.flow_controlled_length:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                self.events.append(ev)
            self.flush()

    def close(self) -> None:
        self.sock.close()
