"""An HTTP/2 origin for the HTTP/2 upstream tests, on the h2 library (a thread per
connection and per slow stream), run as its own process:

    python tests/h2origin.py PORT [--max-streams N] [--goaway-after N] [--cert C --key K]

h2c with prior knowledge, or h2 over TLS (ALPN h2) with --cert/--key. Paths:

- ``/stats``: JSON: connections that sent bytes, streams seen, the most streams open at once
  on one connection, PINGs received;
- ``/echo``: the request body back, streamed as it arrives (with its length);
- ``/big/N``: N bytes of response body;
- ``/slow/MS``: answers after MS milliseconds;
- ``/reset``: RST_STREAM (INTERNAL_ERROR) instead of a response;
- ``/trailers``: a body, then trailers (grpc-status: 0);
- ``/mute``: the connection stops answering anything (PING included) from now on;
- anything else: 200 with the path, and the ``x-request-id`` it got.

--goaway-after N: each connection sends GOAWAY after its Nth request, with the last
stream id it processed, then finishes those and closes; requests above are refused.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

STATS = {"closed": 0, "errors": [], "connections": 0, "streams": 0, "max_open": 0, "pings": 0, "goaways": 0,
         "refused_seen": 0}
LOCK = threading.Lock()


class Conn:
    def __init__(self, sock, args):
        self.sock = sock
        self.args = args
        cfg = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(cfg)
        self.lock = threading.RLock()
        self.open = set()
        self.requests = 0
        self.pending: dict[int, bytearray] = {}  # echo bytes waiting for window
        self.ended: set[int] = set()  # request ended: finish the echo once drained
        self.muted = False
        self.goaway_sent = False
        self.goaway_last = 0
        self.counted = False
        self.paths: dict[int, bytes] = {}

    def flush(self):
        data = self.h2.data_to_send()
        if data and not self.muted:
            try:
                self.sock.sendall(data)
            except OSError:
                pass

    def run(self):
        with self.lock:
            if self.args.max_streams:  # in the first SETTINGS frame
                self.h2.local_settings = h2.settings.Settings(
                    client=False, initial_values={
                        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.args.max_streams})
            self.h2.initiate_connection()
            self.flush()
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            if not self.requests and not self.h2.streams:
                with LOCK:  # an HTTP/2 connection (not a port probe) once bytes came
                    STATS["connections"] += self.counted is False
                self.counted = True
            if self.muted:
                continue
            with self.lock:
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    with LOCK:
                        STATS["errors"].append(repr(e)[:200])
                    self.flush()
                    break
                for ev in events:
                    self.event(ev)
                self.flush()
            if self.goaway_sent and not self.open:
                break
        with LOCK:
            STATS["closed"] += 1
        try:
            self.sock.close()
        except OSError:
            pass

    def event(self, ev):
        if isinstance(ev, h2.events.RequestReceived):
            self.request(ev)
        elif isinstance(ev, h2.events.DataReceived):
            self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if self.paths.get(ev.stream_id) == b"/echo":
                self.pending.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                self.drain(ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            sid = ev.stream_id
            if self.paths.get(sid) == b"/echo":
                self.ended.add(sid)
                self.drain(sid)
        elif isinstance(ev, h2.events.WindowUpdated):
            for sid in list(self.pending):
                self.drain(sid)
        elif isinstance(ev, h2.events.PingReceived):
            with LOCK:
                STATS["pings"] += 1
        elif isinstance(ev, h2.events.StreamReset):
            self.open.discard(ev.stream_id)
            self.pending.pop(ev.stream_id, None)

    def request(self, ev):
        sid = ev.stream_id
        if self.goaway_sent and sid > self.goaway_last:
            with LOCK:
                STATS["refused_seen"] += 1  # the client should not have sent it: ignored
            return
        headers = dict(ev.headers)
        path = headers[b":path"].partition(b"?")[0]
        self.paths[sid] = path
        self.open.add(sid)
        self.requests += 1
        with LOCK:
            STATS["streams"] += 1
            STATS["max_open"] = max(STATS["max_open"], len(self.open))
        if path == b"/mute":
            self.muted = True
            return
        if self.args.goaway_after and self.requests == self.args.goaway_after:
            # written by hand: h2's own GOAWAY would close its state machine, and the
            # streams up to this one must still be answered
            self.flush()
            frame = GoAwayFrame(0)
            frame.last_stream_id = sid
            frame.error_code = 0
            try:
                self.sock.sendall(frame.serialize())
            except OSError:
                pass
            self.goaway_sent = True
            self.goaway_last = sid
            with LOCK:
                STATS["goaways"] += 1
        if path == b"/echo":
            self.h2.send_headers(sid, [(b":status", b"200")])
            return
        if path.startswith(b"/slow/"):
            threading.Thread(target=self.slow, args=(sid, int(path[6:])), daemon=True).start()
            return
        if path == b"/reset":
            self.h2.reset_stream(sid, 2)
            self.open.discard(sid)
            return
        if path == b"/stats":
            with LOCK:
                body = json.dumps(STATS).encode()
            self.respond(sid, body)
            return
        if path.startswith(b"/big/"):
            self.pending[sid] = bytearray(b"x" * int(path[5:]))
            self.ended.add(sid)
            self.h2.send_headers(sid, [(b":status", b"200")])
            self.drain(sid)
            return
        if path == b"/trailers":
            self.h2.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
            self.h2.send_data(sid, b"body")
            self.h2.send_headers(sid, [(b"grpc-status", b"0"), (b"grpc-message", b"fine")],
                                 end_stream=True)
            self.open.discard(sid)
            return
        rid = headers.get(b"x-request-id", b"")
        self.respond(sid, b"path=" + path + b" rid=" + rid + b" host=" + headers.get(b":authority", b""))

    def respond(self, sid, body):
        self.h2.send_headers(sid, [(b":status", b"200"), (b"content-length", b"%d" % len(body))])
        self.h2.send_data(sid, body, end_stream=True)
        self.open.discard(sid)

    def slow(self, sid, ms):
        time.sleep(ms / 1000)
        with self.lock:
            try:
                self.respond(sid, b"slow")
            except h2.exceptions.StreamClosedError:
                pass
            self.flush()

    def drain(self, sid):
        buf = self.pending.get(sid)
        if buf is None:
            return
        try:
            while buf:
                window = min(self.h2.local_flow_control_window(sid),
                             self.h2.max_outbound_frame_size)
                if window <= 0:
                    return
                chunk = bytes(buf[:window])
                del buf[:window]
                self.h2.send_data(sid, chunk)
            if sid in self.ended:
                self.h2.end_stream(sid)
                self.pending.pop(sid, None)
                self.open.discard(sid)
        except h2.exceptions.StreamClosedError:
            self.pending.pop(sid, None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--max-streams", type=int, default=0)
    ap.add_argument("--goaway-after", type=int, default=0)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    args = ap.parse_args()
    ctx = None
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        ctx.set_alpn_protocols(["h2"])
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", args.port))
    lsock.listen(128)
    while True:
        sock, _ = lsock.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(sock, ctx, args), daemon=True).start()


def serve(sock, ctx, args):
    if ctx is not None:
        try:
            sock = ctx.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError):
            sock.close()
            return
    Conn(sock, args).run()


if __name__ == "__main__":
    main()
