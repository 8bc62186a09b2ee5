"""A real OTLP/HTTP trace receiver on loopback for tests: decodes each export request
with the opentelemetry-proto classes and keeps the spans; it can be made slow or failing."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def attrs(span) -> dict:
    """A span's (or resource's) attributes as a plain dict."""
    out = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value"))
    return out


class Receiver:
    def __init__(self):
        self.spans: list = []
        self.requests: list[ExportTraceServiceRequest] = []
        self.content_types: list[str] = []
        self.delay = 0.0
        self.status = 200
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.delay:
                    time.sleep(receiver.delay)
                req = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    receiver.requests.append(req)
                    receiver.content_types.append(self.headers["Content-Type"])
                    if receiver.status == 200:
                        for rs in req.resource_spans:
                            for ss in rs.scope_spans:
                                receiver.spans.extend(ss.spans)
                out = ExportTraceServiceResponse().SerializeToString()
                try:
                    self.send_response(receiver.status)
                    self.send_header("Content-Type", "application/x-protobuf")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except OSError:
                    pass  # the exporter gave up waiting (a slow-collector test)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def server_spans(self) -> list:
        with self.lock:
            return [s for s in self.spans if s.kind == s.SPAN_KIND_SERVER]

    def children_of(self, span_id: bytes) -> dict:
        with self.lock:
            return {s.name: s for s in self.spans if s.parent_span_id == span_id}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
