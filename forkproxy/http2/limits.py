"""HTTP/2 connection limits (the ``[http2]`` config table) and the token buckets that
enforce the flood and rapid-reset bounds. A plain object: the hot path reads attributes."""

from __future__ import annotations

import time


class Http2Limits:
    """What one client connection may do; defaults mirror forkproxy/config.py's."""

    __slots__ = ("max_concurrent_streams", "initial_window_size", "max_frame_size",
                 "max_header_list_size", "header_table_size",
                 "max_continuations", "reset_burst", "reset_rate", "control_burst",
                 "control_rate", "max_outbound_ack", "max_settings", "send_buffer")

    def __init__(self, max_concurrent_streams=128, initial_window_size=65535,
                 max_frame_size=16384, max_header_list_size=32768, header_table_size=4096,
                 max_continuations=8, reset_burst=200,
                 reset_rate=33.0, control_burst=1000, control_rate=100.0,
                 max_outbound_ack=1000, max_settings=32, send_buffer=65536):
        self.max_concurrent_streams = max_concurrent_streams
        self.initial_window_size = initial_window_size
        self.max_frame_size = max_frame_size
        self.max_header_list_size = max_header_list_size
        self.header_table_size = header_table_size
        #: with max_frame_size, bounds a header block before END_HEADERS: at most
        #: (max_continuations + 1) * max_frame_size bytes are ever decoded for one block
        self.max_continuations = max_continuations
        self.reset_burst = reset_burst
        self.reset_rate = reset_rate
        self.control_burst = control_burst
        self.control_rate = control_rate
        self.max_outbound_ack = max_outbound_ack
        self.max_settings = max_settings
        #: response bytes queued per stream before the producer is told to pause
        self.send_buffer = send_buffer


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; take() is False when empty.
    Cheap enough for every received frame: one clock read per take."""

    __slots__ = ("burst", "rate", "tokens", "stamp", "clock")

    def __init__(self, burst: int, rate: float, clock=time.monotonic):
        self.burst = float(burst)
        self.rate = rate
        self.tokens = float(burst)
        self.clock = clock
        self.stamp = clock()

    def take(self) -> bool:
        now = self.clock()
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.stamp = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True
