"""Trace export in the manager: sampling decided once a request has ended, a bounded
queue, and a greenlet that sends batches over OTLP/HTTP (protobuf) to ``[tracing]
endpoint``.

Sampling (:meth:`Tracer.offer_batch`, once per batch of ring records, compiled:
sampling.py): at the head by the traceparent's flag or ``sample_ratio``, at the tail (which
only a proxy that saw the whole request can apply) errors and requests slower than
``sample_slower_than``.

The queue holds encoded export requests: a sampled request's spans are written (spans.py)
once ``ENCODE_AT`` sampled requests are waiting (at 100% sampling in the batch of records
they came in, while the records are fresh), and the export greenlet only sends. At low
ratios a batch of records holds one or two sampled requests: writing them at once ran
the whole encoding path, out of the caches after the worker's 10 ms, for each of them
(~15 µs per batch in a running manager); gathered, it runs once per ``ENCODE_AT``. The
queue is bounded (``queue_size`` requests): when the collector is down or slow, requests
beyond it are dropped and counted, and so are those of an export request the collector
refused or did not answer within ``export_timeout``. Nothing here ever makes
the collector greenlets (or the workers, who never wait on the manager) wait.
"""

from __future__ import annotations

import socket
from collections import deque

import gevent
import msgspec
from gevent import socket as gsocket
from gevent.event import Event

from forkproxy import __version__
from forkproxy import tlsnames as gssl  # create_default_context: gevent.ssl's, bound with TLS
from forkproxy.config import Endpoint, TracingConfig, parse_endpoint
from forkproxy.context import RequestContext
from forkproxy.http.tracecontext import ratio_threshold
from forkproxy.manager.metrics import TextWriter
from forkproxy.manager.sampling import TraceState, sample_batch

#: longest response body read from the collector (OTLP answers are small)
MAX_RESPONSE = 64 * 1024
#: after a failed export, wait this long (doubling up to MAX_BACKOFF) before the next one
BACKOFF = 1.0
MAX_BACKOFF = 30.0
#: sampled requests gathered before their spans are written (fewer: at the export)
ENCODE_AT = 64


class ExportError(Exception):
    pass


class OTLPClient:
    """One keep-alive HTTP/1.1 connection to the collector, on gevent sockets."""

    def __init__(self, endpoint: Endpoint, timeout: float):
        self.endpoint = endpoint
        self.timeout = timeout
        self.sock = None
        host = endpoint.host
        authority = f"[{host}]" if ":" in host else host
        self.head = (f"POST {endpoint.path} HTTP/1.1\r\nHost: {authority}:{endpoint.port}\r\n"
                     f"Content-Type: application/x-protobuf\r\n"
                     f"User-Agent: forkproxy/{__version__}\r\n").encode()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def _connect(self):
        ep = self.endpoint
        sock = gsocket.create_connection((ep.host, ep.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ep.tls:  # gevent's SSL sockets are cooperative; the system's CA store
            sock = gssl.create_default_context().wrap_socket(sock, server_hostname=ep.host)
        return sock

    def post(self, body: bytes | memoryview) -> int:
        """Send one export request; returns the HTTP status (raises ExportError)."""
        timer = gevent.Timeout.start_new(self.timeout)
        try:
            for attempt in (0, 1):  # a pooled connection the collector closed: once more
                fresh = self.sock is None
                try:
                    if fresh:
                        self.sock = self._connect()
                    # the body is a view of the encoder's buffer: sent as it is
                    self._send(self.head + b"Content-Length: %d\r\n\r\n" % len(body), body)
                    return self._read_response()
                except gevent.Timeout as t:
                    if t is not timer:
                        raise
                    self.close()
                    raise ExportError(f"no answer within {self.timeout:g}s")
                except (OSError, ExportError) as e:
                    self.close()
                    if fresh or attempt:
                        raise ExportError(str(e) or type(e).__name__)
            raise ExportError("unreachable")
        finally:
            timer.close()

    def _send(self, head: bytes, body) -> None:
        """The head and the body in one system call when the socket takes them (plain
        TCP: one sendmsg; the head's own segment and the collector's wake-up for it
        are saved), the rest by sendall."""
        sock = self.sock
        if self.endpoint.tls:  # an SSL socket has no sendmsg
            sock.sendall(head)
            sock.sendall(body)
            return
        sent = sock.sendmsg((head, body))
        if sent < len(head):
            sock.sendall(head[sent:])
            sock.sendall(body)
        elif sent < len(head) + len(body):
            sock.sendall(body[sent - len(head):])

    def _read_response(self) -> int:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = self.sock.recv(16384)
            if not data:
                raise ExportError("connection closed before a response")
            buf += data
            if len(buf) > MAX_RESPONSE:
                raise ExportError("response head too large")
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            raise ExportError(f"bad status line {lines[0][:80]!r}")
        length = None
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and b"close" in value.lower():
                close = True
            elif name == b"transfer-encoding":
                close = True  # not worth parsing chunks of a reply we ignore: reconnect
        if length is None or length > MAX_RESPONSE:
            close = True
        else:
            while len(rest) < length:
                data = self.sock.recv(16384)
                if not data:
                    raise ExportError("connection closed in the response body")
                rest += data
        if close:
            self.close()
        return status


class Tracer:
    """Sampling, the bounded queue, the export greenlet and their counters."""

    def __init__(self, cfg: TracingConfig | None = None, logger=None):
        self.logger = logger
        #: the rules and the queue's counts as the compiled record path reads them
        #: (``queued``, ``sampled`` and ``dropped_queue`` are its fields)
        self.state = TraceState()
        #: export requests ready to send, each with its number of requests
        self.batches: deque[tuple[bytes, int]] = deque()
        #: sampled requests whose spans are not written yet (fewer than ENCODE_AT)
        self.pending: list = []
        self.wake = Event()
        self.greenlet: gevent.Greenlet | None = None
        self.client: OTLPClient | None = None
        self.encoder = None  # spans.SpanEncoder once an endpoint is configured
        self.cfg = cfg
        self.enabled = False
        self.exported = 0
        self.dropped_export = 0
        self.requests_ok = 0
        self.requests_failed = 0
        self.failures = 0  # export requests failed, and batches lost in encoding
        self.threshold = 0
        self.slower_than = 0.0
        self.queue_size = 1
        self.batch_size = 1
        if cfg is not None:
            self.configure(cfg)

    def configure(self, cfg: TracingConfig) -> None:
        """Start, change or stop the export (manager start and reload)."""
        endpoint = parse_endpoint(cfg.endpoint) if cfg.endpoint else None
        if endpoint is not None and (self.encoder is None or self.cfg is not cfg):
            # protobuf and the OTLP classes (~6 MiB) only in a manager that exports
            from forkproxy.manager.spans import SpanEncoder

            if self.encoder is not None:
                self._encode_pending()
                if self.encoder.count:
                    self._close_batch()  # the old service name's spans go as they are
            self.encoder = SpanEncoder(cfg.service_name)
        old = self.client
        if old is not None and (endpoint is None or old.endpoint != endpoint
                                or old.timeout != cfg.export_timeout):
            old.close()
            self.client = None
        if endpoint is not None and self.client is None:
            self.client = OTLPClient(endpoint, cfg.export_timeout)
        self.cfg = cfg
        self.enabled = endpoint is not None
        self.threshold = ratio_threshold(cfg.sample_ratio)
        self.slower_than = cfg.sample_slower_than
        self.queue_size = cfg.queue_size
        self.batch_size = cfg.batch_size
        st = self.state
        st.set_rules(self.threshold, self.slower_than, self.batch_size, self.queue_size)
        st.enc = self.encoder
        st.filler = self.encoder.filler if self.encoder is not None else None
        if not self.enabled:
            self.dropped_export += self.queued
            self.batches.clear()
            self.pending = []
            if self.encoder is not None:
                self.encoder.discard()
            self.queued = 0

    @property
    def queued(self) -> int:
        """Sampled requests not yet sent: in ``batches``, in the encoder's open batch
        and in ``pending``."""
        return self.state.queued

    @queued.setter
    def queued(self, n: int) -> None:
        self.state.queued = n

    @property
    def sampled(self) -> int:
        """Requests a sampling rule kept."""
        return self.state.sampled

    @sampled.setter
    def sampled(self, n: int) -> None:
        self.state.sampled = n

    @property
    def dropped_queue(self) -> int:
        """Sampled requests dropped because the queue was full."""
        return self.state.dropped

    @dropped_queue.setter
    def dropped_queue(self, n: int) -> None:
        self.state.dropped = n

    def start(self) -> None:
        if self.greenlet is None:
            self.greenlet = gevent.spawn(self._loop)

    def stop(self, flush_timeout: float = 2.0) -> None:
        """Send what is queued (bounded by ``flush_timeout``), then stop."""
        if self.greenlet is None:
            return
        self.greenlet.kill(block=True, timeout=1.0)
        self.greenlet = None
        if self.enabled and self.queued:
            with gevent.Timeout(flush_timeout, False):
                while self.queued:
                    self._send_batch()
        if self.client is not None:
            self.client.close()

    # -- per request (from Manager.on_batch) --------------------------------------------

    def offer_batch(self, items: list) -> None:
        """Keep the request records in ``items`` that a sampling rule selects, and write
        their spans into export requests of ``batch_size`` requests once ENCODE_AT are
        waiting; never waits. Called only while export is enabled (RecordSink.on_batch
        checks). Writing them here rather than in the export greenlet keeps at most
        ENCODE_AT records alive."""
        pending = self.pending
        before = len(pending)
        sampled, dropped = sample_batch(items, pending, self.queue_size - self.queued,
                                        self.threshold, self.slower_than)
        self.sampled += sampled
        self.dropped_queue += dropped
        self.queued += len(pending) - before
        if len(pending) >= ENCODE_AT:
            self._encode_pending()

    def offer_raw(self, batch, traced: bool = False) -> None:
        """offer_batch for a batch of records as bytes (manager/rawbatch.py, compiled):
        the rules decided and the spans written from the C structs (rawspans.RawTrace),
        with no object per request; only records the scanner does not take come back
        decoded, for offer_batch. ``traced``: RawBatch.process did it in its pass."""
        if traced:  # the usual case: nothing left to do unless the pass left something
            t = batch.tr
            if t.error is None and not t.objs:
                return
        elif self.encoder.filler is None:  # an encoder without the compiled fill
            self.offer_batch(batch.records())
            return
        else:
            batch.trace(self)
            t = batch.tr
        if t.error is not None:  # a bug in encoding: count, never break the record path
            lost = self.encoder.discard()
            self.queued -= lost
            self._failed(lost, f"encoding: {t.error!r}")
            t.error = None
        if t.objs:
            objs = t.objs
            t.objs = []
            self.offer_batch(objs)

    def _encode_pending(self) -> None:
        """Writes the spans of the pending requests into the open export request(s)."""
        kept = self.pending
        if not kept:
            return
        self.pending = []
        enc = self.encoder
        size = self.batch_size
        at = 0
        try:
            while at < len(kept):
                room = size - enc.count
                part = kept if not at and len(kept) <= room else kept[at:at + room]
                enc.append(part)
                at += len(part)
                if enc.count >= size:
                    self._close_batch()
        except Exception as e:  # a bug in encoding: count, never break the record path
            lost = enc.discard() + len(kept) - at
            self.queued -= lost
            self._failed(lost, f"encoding: {e!r}")

    def offer(self, ctx: RequestContext) -> None:
        """offer_batch for one record."""
        self.offer_batch([ctx])

    def _close_batch(self) -> None:
        n = self.encoder.count
        self.batches.append((self.encoder.finish(), n))
        self.wake.set()

    # -- export ---------------------------------------------------------------------------

    def _loop(self) -> None:
        backoff = 0.0
        while True:
            if backoff:  # after a failure: wait, whatever the queue (it drops when full)
                gevent.sleep(backoff)
            else:  # a full batch wakes us early
                self.wake.wait(self.cfg.export_interval if self.cfg else 1.0)
            self.wake.clear()
            while self.queued and self.enabled:
                ok = self._send_batch()  # the ready ones, or after the interval a partial one
                if not ok:
                    backoff = min(max(BACKOFF, backoff * 2), MAX_BACKOFF)
                    break
                backoff = 0.0
                if not self.batches:
                    break

    def _send_batch(self) -> bool:
        """Send the oldest export request ready, else the open one (a partial batch)."""
        if not self.batches:
            if self.encoder is None:
                return True
            self._encode_pending()
            if not self.batches:
                if not self.encoder.count:
                    return True
                self._close_batch()
        body, n = self.batches.popleft()
        self.queued -= n
        if self.client is None:
            return True
        try:
            status = self.client.post(body)
        except Exception as e:  # ExportError, or a bug: count, never crash
            status = 0
            error = str(e)
        else:
            error = f"HTTP {status}"
        finally:
            self.encoder.recycle(body)
        if 200 <= status < 300:
            self.exported += n
            self.requests_ok += 1
            return True
        self.requests_failed += 1
        self._failed(n, error)
        return False

    def _failed(self, n: int, error: str) -> None:
        """``n`` sampled requests' spans lost: counted, and logged on the 1st, 2nd, 4th,
        8th... failure (a down collector does not flood the log)."""
        self.dropped_export += n
        self.failures += 1
        if self.logger is not None and self.failures & (self.failures - 1) == 0:
            self.logger.warning("trace export failed, spans dropped", spans=n, error=error,
                                failures=self.failures)

    # -- metrics ----------------------------------------------------------------------------

    def counts(self) -> TracerCounts:
        return TracerCounts(self.sampled, self.exported, self.dropped_queue,
                            self.dropped_export, self.requests_ok, self.requests_failed,
                            self.queued)


class TracerCounts(msgspec.Struct, array_like=True, gc=False):
    """A Tracer's counters as plain data: the manager adds its shards' to its own."""

    sampled: int = 0
    exported: int = 0
    dropped_queue: int = 0
    dropped_export: int = 0
    requests_ok: int = 0
    requests_failed: int = 0
    queue: int = 0

    def add(self, other: TracerCounts) -> None:
        for name in self.__struct_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def render_into(self, w: TextWriter) -> None:
        w.family("forkproxy_trace_requests_sampled_total", "counter",
                 "Requests kept for export by the head or tail sampling rules.")
        w.sample("forkproxy_trace_requests_sampled_total", (), self.sampled)
        w.family("forkproxy_trace_spans_exported_total", "counter",
                 "Requests whose spans the collector accepted (one server span each, plus "
                 "its phase spans).")
        w.sample("forkproxy_trace_spans_exported_total", (), self.exported)
        w.family("forkproxy_trace_spans_dropped_total", "counter",
                 "Sampled requests whose spans were not exported, by reason (queue_full: "
                 "the bounded queue was full; export_failed: the collector refused, failed "
                 "or did not answer in time).")
        w.sample("forkproxy_trace_spans_dropped_total", (("reason", "queue_full"),),
                 self.dropped_queue)
        w.sample("forkproxy_trace_spans_dropped_total", (("reason", "export_failed"),),
                 self.dropped_export)
        w.family("forkproxy_trace_export_requests_total", "counter",
                 "OTLP export requests by result.")
        w.sample("forkproxy_trace_export_requests_total", (("result", "success"),),
                 self.requests_ok)
        w.sample("forkproxy_trace_export_requests_total", (("result", "failure"),),
                 self.requests_failed)
        w.family("forkproxy_trace_queue_length", "gauge", "Sampled requests waiting for export.")
        w.sample("forkproxy_trace_queue_length", (), self.queue)
