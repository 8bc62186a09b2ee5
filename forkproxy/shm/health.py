"""The health table: one 64-byte entry per upstream server, in an anonymous shared mapping.

Created by the master before any fork (MAP_SHARED|MAP_ANONYMOUS, like the worker table:
inherited by every child, never visible in /dev/shm, gone with the last process). Who
writes what:

* the master assigns entries (the KEY word) for every configured server of the config
  it loads, at start and on each reload, before it forks the workers of that config and
  before it signals the helper process; it assigns only in the first ``entries``;
* the helper process (forkproxy/manager/healthcheck.py) runs the active checks and is
  the only writer of the other words; it also assigns the entries of servers found
  through DNS (which appear and vanish without the master), only in the last
  ``discovered`` entries: each region has a single writer of its KEY words;
* workers only read the STATE word, every SWEEP_INTERVAL (forkproxy/worker/upstream.py
  ``Upstream.refresh``), never per request.

Entry layout (each field an aligned 8-byte word, written with one store, so a reader
never sees a torn value; see docs/ARCHITECTURE.md, "Measured facts"):

  word 0  KEY          hash64(b"UPSTREAM\\0HOST:PORT"), never 0; 0 = a free entry
  word 1  STATE        (since_ms << 2) | state; state 0 = unknown (no verdict yet,
                       treated as up), 1 = up, 2 = down; since_ms = CLOCK_MONOTONIC
                       milliseconds (one clock for all processes) of the last change, 0
                       when a server came up without having been down (no slow start)
  word 2  CHECKS       checks done
  word 3  FAILED       checks that failed
  word 4  LATENCY_US   duration of the last check, microseconds
  word 5  LAST_STATUS  HTTP status of the last check; 0 = none, 1 = timed out,
                       2 = connection failed, 3 = bad response, 4 = TLS handshake
                       failed (certificate not verified, ...)
  word 6  CHANGES      up/down transitions
  word 7  CHECKED_MS   CLOCK_MONOTONIC milliseconds of the last check

State and its time share one word on purpose: a worker that sees "up" also sees when
the server came up, which is where its slow start begins (the same in every worker).

An entry stays assigned to its key while the master lives (a reload keeps the state of
servers that stay, a server that DNS drops and lists again keeps its verdict); only when
a region is full are the entries of servers absent from the new config (or from DNS's
current answers) handed out again. A reader that keeps an entry's index checks that
the KEY word is still its server's before trusting the STATE word.
"""

from __future__ import annotations

import mmap

from forkproxy.hashing import hash64
from forkproxy.shm.slots import assign_slots

ENTRY = 64
WORDS = ENTRY // 8
KEY, STATE, CHECKS, FAILED, LATENCY_US, LAST_STATUS, CHANGES, CHECKED_MS = range(8)

UNKNOWN, UP, DOWN = 0, 1, 2
STATE_NAMES = {UNKNOWN: "unknown", UP: "up", DOWN: "down"}
#: LAST_STATUS values below 100
ST_NONE, ST_TIMEOUT, ST_CONNECT, ST_BAD, ST_TLS = 0, 1, 2, 3, 4
_RESULTS = {ST_NONE: "none", ST_TIMEOUT: "timeout", ST_CONNECT: "connect failed",
            ST_BAD: "bad response", ST_TLS: "TLS handshake failed"}


def server_key(upstream: str, address: str) -> int:
    return hash64(upstream.encode() + b"\0" + address.encode()) or 1


def pack_state(state: int, since_ms: int) -> int:
    return (since_ms << 2) | state


def unpack_state(word: int) -> tuple[int, int]:
    """(state, since_ms)."""
    return word & 3, word >> 2


class HealthTable:
    def __init__(self, entries: int = 1024, discovered: int = 1024):
        self.entries = entries  # the configured servers' region: [0, entries)
        self.discovered = discovered  # DNS-found servers': [entries, entries + discovered)
        self._map = mmap.mmap(-1, (entries + discovered) * ENTRY)
        self.q = memoryview(self._map).cast("Q")

    # -- master --------------------------------------------------------------------------

    def assign(self, cfg) -> int:
        """Give every configured server of ``cfg`` an entry (servers found through DNS
        get theirs from the helper: :meth:`assign_discovered`); returns how many
        entries of the configured region are in use."""
        wanted = [server_key(name, s.address)
                  for name, up in cfg.upstream.items() for s in up.servers
                  if not s.resolve]
        return len(self._assign(wanted, 0, self.entries))

    # -- the helper process --------------------------------------------------------------

    def assign_discovered(self, keys: list[int]) -> dict[int, int]:
        """Give every key (servers DNS lists now) an entry of the discovered region,
        keeping known keys' entries and verdicts; returns {key: entry} of the region."""
        return self._assign(keys, self.entries, self.entries + self.discovered)

    def _assign(self, wanted: list[int], lo: int, hi: int) -> dict[int, int]:
        q = self.q

        def clear(i: int) -> None:
            q[i * WORDS + KEY] = 0

        def install(i: int, key: int) -> None:
            base = i * WORDS
            for w in range(1, WORDS):
                q[base + w] = 0
            q[base + KEY] = key  # last: the entry is valid once the key is set

        free = [i for i in range(lo, hi) if q[i * WORDS + KEY] == 0]
        free.reverse()
        return assign_slots(wanted, self.index(lo, hi), free, clear, install, "health table")

    # -- everyone ------------------------------------------------------------------------

    def index(self, lo: int = 0, hi: int = -1) -> dict[int, int]:
        """{key: entry} of the assigned entries (of [lo, hi) when given; one strided
        copy of the KEY words, not a load per entry)."""
        if hi < 0:
            hi = self.entries + self.discovered
        keys = self.q[lo * WORDS + KEY:hi * WORDS:WORDS].tolist()
        return {k: lo + n for n, k in enumerate(keys) if k}

    def discovered_index(self) -> dict[int, int]:
        """{key: entry} of the servers found through DNS (what a worker looks up when
        DNS gives it a server: the helper may assign the entry a moment later)."""
        return self.index(self.entries, self.entries + self.discovered)

    def key(self, i: int) -> int:
        return self.q[i * WORDS + KEY]

    def find(self, upstream: str, address: str) -> int:
        """The entry of a server, -1 if it has none."""
        return self.index().get(server_key(upstream, address), -1)

    def state(self, i: int) -> tuple[int, int]:
        """(state, since_ms) of entry i."""
        w = self.q[i * WORDS + STATE]
        return w & 3, w >> 2

    def state_word(self, i: int) -> int:
        return self.q[i * WORDS + STATE]

    def read(self, i: int) -> dict:
        q = self.q
        base = i * WORDS
        state, since = unpack_state(q[base + STATE])
        last = q[base + LAST_STATUS]
        return {
            "state": STATE_NAMES[state],
            "since_ms": since,
            "checks": q[base + CHECKS],
            "failed": q[base + FAILED],
            "latency_us": q[base + LATENCY_US],
            "last_status": last,
            "last_result": _RESULTS.get(last, str(last)),
            "changes": q[base + CHANGES],
            "checked_ms": q[base + CHECKED_MS],
        }

    # -- the helper process (the checker) -------------------------------------------------

    def publish(self, i: int, state: int, since_ms: int, changed: bool, ok: bool,
                latency_us: int, status: int, now_ms: int) -> None:
        q = self.q
        base = i * WORDS
        q[base + CHECKS] += 1
        if not ok:
            q[base + FAILED] += 1
        q[base + LATENCY_US] = latency_us
        q[base + LAST_STATUS] = status
        q[base + CHECKED_MS] = now_ms
        if changed:
            q[base + CHANGES] += 1
        q[base + STATE] = pack_state(state, since_ms)
