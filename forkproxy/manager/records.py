"""What the manager does with each batch of ring records: metrics, then the access log.

Split from the manager process so that the same code runs in ``scripts/replay-bench``,
which measures how many records per second one core can take through it.
"""

from __future__ import annotations

from forkproxy.manager.accesslog import AccessLog
from forkproxy.manager.metrics import Metrics
from forkproxy.manager.rawbatch import RawBatch
from forkproxy.manager.tracing import Tracer


class RecordSink:
    """``on_batch(records)``: the Collector's callback (the list is reused: not kept);
    ``on_raw_batch(batch)``: the one it calls instead when rawbatch is compiled."""

    def __init__(self, metrics: Metrics, accesslog: AccessLog, tracer: Tracer | None = None):
        self.metrics = metrics
        self.accesslog = accesslog
        self.tracer = tracer  # span export: each request is offered to its sampler

    def on_batch(self, items: list) -> None:
        self.metrics.observe_batch(items)
        self.accesslog.write_batch(items)
        tracer = self.tracer
        if tracer is not None and tracer.enabled:
            tracer.offer_batch(items)

    def on_raw_batch(self, batch: RawBatch) -> None:
        """The same for a batch of records as bytes (the Collector's compiled path,
        manager/rawbatch.py): the metrics and the JSON lines from C structs; the console
        format gets the batch decoded by msgspec; the tracer samples and writes spans from
        the C structs in the same pass (rawspans.RawTrace, Tracer.offer_raw)."""
        log = self.accesslog
        json = log.enabled and log.fmt == "json"
        tracer = self.tracer
        if tracer is not None and not tracer.enabled:
            tracer = None
        batch.sink = log.write_view if json else None
        data = batch.process(self.metrics, json, tracer)
        if json:
            log.write_lines(data, batch.lines)
        elif log.enabled:
            log.write_batch(batch.records())
        if tracer is not None:
            tracer.offer_raw(batch, traced=True)
