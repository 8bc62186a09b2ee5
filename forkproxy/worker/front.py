"""The client side of an exchange, whatever the client's protocol.

An :class:`~forkproxy.worker.exchange.Exchange` forwards one request upstream and never
looks at how the client speaks: it reads the request body from, and writes the response
to, a *front end* through the interface below. The HTTP/1.1 connection
(:mod:`forkproxy.worker.http1`) is one front end per connection; an HTTP/2 stream is one
front end per stream. docs/ARCHITECTURE.md shows where this sits on the request path.

A response goes out as: any number of ``send_interim`` (1xx), then ``send_head``, then
``send_body`` pieces, then at most one ``send_trailers``, then ``end_body``; or, instead
of all that, ``send_error`` (or, for a gRPC request, ``send_trailers_only``).

Trailer fields, in both directions, are one representation whatever the protocol on
either side: a list of ``(name, value)`` byte pairs, names lower-case, already passed
through :func:`forkproxy.http.trailers.relayable_trailers` (no pseudo-header,
hop-by-hop, framing, routing or content-handling field; size-bounded), values free of
CR, LF, NUL and other controls. Response trailers come from the relayer (an HTTP/1.1
chunked body's trailer section; an HTTP/2 upstream's trailing HEADERS) through
``Exchange.relay_trailers``; request trailers are the front end's ``request_trailers``,
sent upstream in the last chunk of a chunked request body.
"""

from __future__ import annotations

from gevent import socket


class Deadline(socket.timeout):
    """Raised into a front end's greenlet by the worker's deadline sweeper.

    Sockets have no gevent timeout (a Timeout object and a libev timer per blocking
    call cost ~6% of a tiny request): before each blocking step the front end's
    ``deadline`` is set (a float store) and one sweeper greenlet per worker expires late
    ones. It subclasses socket.timeout so every timeout handler treats it alike."""


class ClientGone(Exception):
    """The client closed or reset the connection, or stopped reading (send_timeout)."""


class BodyAborted(Exception):
    """The client's request body failed mid-stream (timeout, too large, malformed): the
    exchange is void and the client gets ``status``; ``reason`` is the rejection kind."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"request body failed: {reason}")
        self.status = status
        self.reason = reason


class FrontEnd:
    """What an exchange needs from the client side. Subclasses set these attributes:

    - ``ws``: the WorkerState; ``listener``: the ListenerRuntime it came in on
      (name, scheme, host_fallback, default_upstream);
    - ``remote`` (str) and ``remote_b`` (bytes, or None until first needed): the client;
    - ``tls_resumed`` (None on plain text), ``tls_version``: for the request context;
    - ``deadline``: monotonic time past which the sweeper throws :class:`Deadline` into
      ``greenlet`` (the exchange sets it before each blocking step);
    - ``closing``: no further request will be read from this client.
    """

    __slots__ = ()

    #: the access log's ``protocol`` field
    protocol = "HTTP/1.1"
    #: the HTTP/2 stream id of the request (0: not HTTP/2), for the request context
    stream = 0
    #: the request's trailer fields (see above), once read_body() returned None; None:
    #: none (an HTTP/1.1 client's trailer section is checked and dropped by its parser)
    request_trailers = None

    def read_body(self):
        """The next piece of the request body (bytes-like), or None at its end.

        Raises BodyAborted (the client's body failed) or ClientGone."""
        raise NotImplementedError

    def body_buffered(self) -> bool:
        """Whether read_body() would return at once (a piece or the end is already
        held): the HTTP/2 upstream path then sends it without a greenlet of its own."""
        return False

    def send_continue(self) -> None:
        """The client sent ``Expect: 100-continue``: tell it to send the body."""
        raise NotImplementedError

    def send_interim(self, status: int, fields) -> None:
        """An interim (1xx, never 101) response from the upstream, before the final one;
        ``fields``: its (name, value) pairs, hop-by-hop fields removed. A front end whose
        client cannot take one (HTTP/1.0) drops it. Raises ClientGone."""

    def send_head(self, ex, first) -> None:
        """Start the response: ``ex`` carries the upstream's head (``status``,
        ``raw_head`` bytes of a head the fast path took, else ``rhead``, a parsed
        ResponseHead) and its ``framing``; ``first``: body bytes already read (may be
        empty), sent with the head where the protocol allows. Raises ClientGone."""
        raise NotImplementedError

    def send_body(self, data) -> None:
        """A piece of the response body (the front end frames it). Raises ClientGone."""
        raise NotImplementedError

    def send_trailers(self, fields) -> None:
        """The response's trailer section (see above), after the last body piece and
        before end_body(). Dropped where the response framing has no place for it.
        Raises ClientGone."""

    def end_body(self) -> bool:
        """The response body is complete; returns whether the client connection may
        carry another request. Raises ClientGone."""
        raise NotImplementedError

    def send_error(self, status: int) -> bool:
        """The proxy answers the request itself (no upstream, upstream failed...).
        Returns whether the client connection may carry another request."""
        raise NotImplementedError

    def send_trailers_only(self, fields) -> bool:
        """The proxy answers a gRPC request itself: status 200, no body, ``fields``
        (content-type, grpc-status, grpc-message) in the head (HTTP/2: one HEADERS
        frame with END_STREAM). Returns whether the client connection may carry another
        request."""
        raise NotImplementedError

    def splice_fd(self) -> int:
        """The client socket's fd when body bytes may be spliced to it, else -1."""
        return -1
