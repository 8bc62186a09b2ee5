"""The less frequent parts of an HTTP/2 stream's front end: interim responses, trailers,
and the answers the proxy gives itself.

:class:`~forkproxy.worker.h2stream.Http2Stream` (the per-stream front end of an exchange)
inherits them; they live here to keep the connection module within the worker module
size. The stream provides ``conn`` (its Http2Connection: ``session`` and ``wake``),
``stream`` (its id), ``responded``, ``ended`` (the response is complete),
``trailers`` (response trailers waiting for end_body()) and ``exchange``.
"""

from __future__ import annotations

import time

from forkproxy.context import T_END
from forkproxy.http2.translate import response_fields as h2_fields
from forkproxy.worker import grpc
from forkproxy.worker.front import FrontEnd

_PLAIN_TEXT = b"content-type", b"text/plain"
#: the status recorded for a request whose client went away first (nginx's 499)
CLIENT_CLOSED = 499


class Http2FrontEnd(FrontEnd):
    """Interim responses, trailers and error answers on one HTTP/2 stream."""

    __slots__ = ()

    protocol = "HTTP/2"

    def send_continue(self) -> None:
        self.conn.session.interim(self.stream, 100)
        self.conn.wake.set()

    def send_interim(self, status: int, fields) -> None:
        """A HEADERS frame without END_STREAM, before the final response's."""
        self.conn.session.interim(self.stream, status, h2_fields(fields, None))
        self.conn.wake.set()

    def send_trailers(self, fields) -> None:
        """Kept for end_body(): the session sends them as the final HEADERS frame, with
        END_STREAM, once the body's DATA is out."""
        self.trailers = fields

    def send_error(self, status: int) -> bool:
        return self._answer(status, [_PLAIN_TEXT], b"%d\n" % status)

    def send_trailers_only(self, fields) -> bool:
        """One HEADERS frame with END_STREAM: :status 200 and ``fields``."""
        return self._answer(200, fields, b"")

    def _answer(self, status: int, fields, body: bytes) -> bool:
        if not self.responded:
            self.responded = self.ended = True
            self.conn.session.respond(self.stream, status, fields, end_stream=not body,
                                      body=body)
            self.conn.wake.set()
        return False

    def abandoned(self) -> None:
        """The stream's greenlet was ended before its exchange was (the connection
        closed while the upstream was still answering): recorded like nginx's 499, so
        the access log and the metrics see the request (a gRPC call as CANCELLED)."""
        ex = self.exchange
        if ex is None or ex.req is None or ex.times[T_END]:
            return  # recorded already
        ex.times[T_END] = time.monotonic()
        if ex.req.grpc and ex.grpc_status < 0:
            ex.grpc_status = grpc.CANCELLED
        ex.record(CLIENT_CLOSED, ex.bytes_out, "client gone")
