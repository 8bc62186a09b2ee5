"""Servers found through DNS, as one worker follows them.

The manager resolves every ``resolve`` entry and writes the servers it found into the
shared resolved-servers table (forkproxy/shm/resolved.py); :class:`DnsFollower` reads
the slots of one upstream's entries. ``Upstream.refresh`` (every SWEEP_INTERVAL, not per
request) asks :meth:`DnsFollower.changed` (one 8-byte load per entry) and, only when a
slot's sequence moved, :meth:`DnsFollower.read` for the new list, which the upstream
swaps in (worker/upstream.py ``Upstream.follow``).
"""

from __future__ import annotations

from forkproxy.config import resolved_spec
from forkproxy.shm.resolved import format_address


class DnsFollower:
    """The resolve entries of one upstream: their slots and the servers last read."""

    __slots__ = ("table", "q", "slots", "seq_words", "seen", "found")

    def __init__(self, table, upstream: str, entries):
        self.table = table
        self.q = table.q
        slots = [table.find(upstream, resolved_spec(s)) for s in entries]
        self.slots = [i for i in slots if i >= 0]  # none only if the table was full
        self.seq_words = [table.seq_word(i) for i in self.slots]
        self.seen = [-1] * len(self.slots)  # sequence of the copy in found (-1: never read)
        self.found: list[list[tuple[str, int]]] = [[] for _ in self.slots]

    def changed(self) -> bool:
        """True when a slot was written since it was last read."""
        q = self.q
        return any(q[w] != seen for w, seen in zip(self.seq_words, self.seen, strict=True))

    def read(self) -> list[tuple[str, int]] | None:
        """[(address, weight)] of every entry, in config order; None if a slot was being
        written on every try (the caller keeps its servers and asks again later)."""
        table = self.table
        for i, slot in enumerate(self.slots):
            if table.seq(slot) == self.seen[i]:
                continue
            got = table.read(slot)
            if got is None:
                return None
            seq, records = got
            self.found[i] = [(format_address(host, port), w) for host, port, w in records]
            self.seen[i] = seq
        return [pair for servers in self.found for pair in servers]
