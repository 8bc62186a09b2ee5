"""An HTTP/2 response held back by its client's socket goes on when the client reads again.

A stream queues response bytes and wakes the connection's greenlet, which frames and
writes them; above send_buffer queued bytes the stream waits (its upstream read pauses)
until the connection framed them. While the connection is blocked writing to a client
that does not read, a stream fed by a slow upstream keeps queuing until it passes
send_buffer and waits: when the write completes, the connection must frame what the
stream queued meanwhile, though the client sends nothing (its windows are wide open: no
WINDOW_UPDATE wakes the connection). The 1 GiB curl download stalled there now and then
(then send_timeout: RST_STREAM INTERNAL_ERROR); this client and origin make the same
interleaving certain."""

from __future__ import annotations

import socket
import time

import h2.connection
import h2.events
import h2.settings
from fp import wait_for
from h2client import client_config
from hostile import RecordingOrigin

H2C = 'protocols = ["http/1.1", "h2c"]'
#: the largest window HTTP/2 allows: the client never has to send a WINDOW_UPDATE
MAX_WINDOW = 2**31 - 1
BODY = 32 << 20
#: the slow upstream's pieces: several fit under send_buffer (64 KiB), so the stream
#: is mostly waiting for its upstream, not for the connection, when a write blocks
PIECE = 32 << 10


class DripOrigin(RecordingOrigin):
    """An upstream slower than the proxy: ``/drip/N`` answers N bytes (Content-Length)
    in PIECE-byte writes about a millisecond apart."""

    def respond(self, conn, seen):
        n = int(seen.path.split("/")[2])
        sock = conn.sock
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
        piece = b"d" * PIECE
        try:
            while n > 0:
                sock.sendall(piece[:n])
                n -= len(piece)
                time.sleep(0.001)  # the upstream's pace, not a wait for the proxy
        except OSError:
            pass


def tcp_queues() -> list[tuple[int, int, int, int]]:
    """(local port, remote port, send queue, receive queue) of every IPv4 TCP socket."""
    out = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, queues = fields[1], fields[2], fields[4]
            tx, rx = queues.split(":")
            out.append((int(local.split(":")[1], 16), int(remote.split(":")[1], 16),
                        int(tx, 16), int(rx, 16)))
    return out


def held_back(proxy_port: int, client_port: int, origin_port: int) -> bool:
    """The worker's socket to the client holds bytes the client did not read, and a MiB
    of the slow upstream's waits unread by the worker: its stream stopped reading (it
    waits above send_buffer; a stream reading keeps up with this upstream)."""
    to_client = upstream_unread = 0
    for local, remote, tx, rx in tcp_queues():
        if local == proxy_port and remote == client_port:
            to_client += tx
        elif remote == origin_port:  # the worker's end of the upstream connection
            upstream_unread += rx
        elif local == origin_port:  # the origin's end
            upstream_unread += tx
    return to_client > 0 and upstream_unread >= 1 << 20


def read_to_end(sock, conn, sid: int) -> tuple[int, bool, int | None]:
    """Read stream ``sid`` to its end (bytes, ended, reset code); the client answers
    SETTINGS and PINGs but never sends a WINDOW_UPDATE."""
    received, ended, reset = 0, False, None
    while not ended and reset is None:
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            break
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                received += len(ev.data)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                ended = True
            elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                reset = ev.error_code
        pending = conn.data_to_send()
        if pending:
            sock.sendall(pending)
    return received, ended, reset


def test_a_response_held_by_a_client_that_paused_reading_goes_on(tmp_path, proxies):
    origin = DripOrigin()
    try:
        p = proxies(tmp_path, origin.address, listener_extra=H2C,
                    server_extra='send_timeout = "10s"')
        sock = socket.create_connection(("127.0.0.1", p.port), timeout=30)
        try:
            conn = h2.connection.H2Connection(client_config())
            conn.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE:
                                             MAX_WINDOW})
            conn.initiate_connection()
            conn.increment_flow_control_window(MAX_WINDOW - 65535)
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"),
                                    (b":authority", b"127.0.0.1"),
                                    (b":path", b"/drip/%d" % BODY)], end_stream=True)
            sock.sendall(conn.data_to_send())
            events = []
            while not any(isinstance(ev, h2.events.ResponseReceived) for ev in events):
                data = sock.recv(65536)
                assert data, "the connection closed before the response head"
                events += conn.receive_data(data)
            first = sum(len(ev.data) for ev in events
                        if isinstance(ev, h2.events.DataReceived))
            sock.sendall(conn.data_to_send())  # the ACK of the worker's SETTINGS
            # from here on the client sends nothing, and reads nothing until the worker
            # is blocked writing to it and its stream waits above send_buffer
            wait_for(lambda: held_back(p.port, sock.getsockname()[1], origin.port),
                     timeout=30, what="the worker held back by the client")
            received, ended, reset = read_to_end(sock, conn, sid)
        finally:
            sock.close()
    finally:
        origin.stop()
    assert (first + received, ended, reset) == (BODY, True, None), (
        f"{first + received} of {BODY} bytes, reset {reset}\n"
        + "\n".join(line for line in p.log().splitlines() if "send timed out" in line))
