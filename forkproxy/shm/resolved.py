"""The resolved-servers table: the servers DNS gave for each ``resolve`` entry.

One slot per server entry with ``resolve`` (an A/AAAA name or an SRV name) of every
upstream, in an anonymous shared mapping created by the master before any fork (like
the health table: inherited by every child, never in /dev/shm). Who writes what:

* the master assigns slots (their keys) for the entries of the config it loads, at
  start and on each reload, before it forks that config's workers and signals the
  manager; a slot keeps its servers across reloads, so a new generation starts with
  the last good set;
* the manager (forkproxy/manager/discovery.py) resolves each entry every ``resolve``
  interval and is the only writer of a slot's servers;
* workers read a slot in ``Upstream.refresh`` (every SWEEP_INTERVAL, never per request):
  one 8-byte load of SEQ, and a copy of the records only when it moved.

Layout (words are aligned 8-byte words, each written with one store): first the key
array, one word per slot: hash64(b"DNS\\0UPSTREAM\\0SPEC"), never 0; 0 = a free slot.
The keys sit apart from the slots so that finding a slot (the master's assignment, every
reader's ``index``) reads one page, not a word of every slot: the shared mapping's pages
become resident when first read, and the scan of 256 keys 2,112 bytes apart made all
528 KiB of it resident in the master and the manager, DNS or not. Then the slots, SLOT
bytes each:

  word 0  SEQ     seqlock sequence: odd while the manager writes the records
  word 1  COUNT   records in use
  64      MAX_RECORDS records of RECORD bytes: address (16 bytes, inet_pton; an IPv4
          address in the first 4), port u16, family u8 (4 or 6), pad, weight u32

The seqlock: the writer makes SEQ odd, writes COUNT and the records, makes SEQ even; a
reader loads SEQ, copies COUNT and the records, loads SEQ again and keeps the copy only
if both loads were the same even number. x86-64 keeps stores in program order and loads
in program order (see docs/ARCHITECTURE.md, "The ring"), which is all this needs; a
reader that loses the race keeps its old set and tries again at its next refresh.
"""

from __future__ import annotations

import mmap
import socket
import struct

from forkproxy.config import resolved_spec
from forkproxy.hashing import hash64
from forkproxy.shm.slots import assign_slots

MAX_RECORDS = 64
RECORD = 32
HEADER = 64
SLOT = HEADER + MAX_RECORDS * RECORD
SEQ, COUNT = range(2)
_REC = struct.Struct("<16sHBxI8x")
assert _REC.size == RECORD
#: a reader gives up (keeps its old set until the next refresh) after this many torn copies
READ_TRIES = 8


def slot_key(upstream: str, spec: str) -> int:
    return hash64(b"DNS\0" + upstream.encode() + b"\0" + spec.encode()) or 1


def format_address(host: str, port: int) -> str:
    """"HOST:PORT", "[V6]:PORT": the form of a configured address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def encode_records(records: list[tuple[str, int, int]]) -> bytes:
    """[(ip, port, weight)] -> the records' bytes (at most MAX_RECORDS)."""
    out = bytearray()
    for host, port, weight in records[:MAX_RECORDS]:
        if ":" in host:
            out += _REC.pack(socket.inet_pton(socket.AF_INET6, host), port, 6, weight)
        else:
            out += _REC.pack(socket.inet_pton(socket.AF_INET, host), port, 4, weight)
    return bytes(out)


def decode_records(data: bytes) -> list[tuple[str, int, int]]:
    out = []
    for raw, port, family, weight in _REC.iter_unpack(data):
        if family == 6:
            host = socket.inet_ntop(socket.AF_INET6, raw)
        else:
            host = socket.inet_ntop(socket.AF_INET, raw[:4])
        out.append((host, port, weight))
    return out


class ResolvedTable:
    def __init__(self, slots: int = 256):
        self.slots = slots
        self.keys_bytes = -(-slots * 8 // HEADER) * HEADER  # the key array, slot-aligned
        self._map = mmap.mmap(-1, self.keys_bytes + slots * SLOT)
        self.mv = memoryview(self._map)
        self.q = self.mv.cast("Q")

    def _base(self, i: int) -> int:
        return self.keys_bytes + i * SLOT

    def _word(self, i: int, w: int) -> int:
        return self._base(i) // 8 + w

    def seq_word(self, i: int) -> int:
        """Index in ``q`` of slot i's sequence (a reader's one load per refresh)."""
        return self._word(i, SEQ)

    # -- master --------------------------------------------------------------------------

    def assign(self, cfg) -> int:
        """Give every ``resolve`` entry of ``cfg`` a slot; see :meth:`assign_keys`."""
        return self.assign_keys([slot_key(name, resolved_spec(s))
                                 for name, up in cfg.upstream.items()
                                 for s in up.servers if s.resolve])

    def assign_keys(self, keys: list[int]) -> int:
        """Give every key a slot (keeping the slots of known keys and their servers);
        returns how many slots are in use. RuntimeError when full."""
        q = self.q

        def clear(i: int) -> None:
            q[i] = 0

        def install(i: int, key: int) -> None:
            self.publish(i, [])
            q[i] = key  # last: the slot is valid once the key is set

        free = [i for i, k in enumerate(q[:self.slots].tolist()) if k == 0]
        free.reverse()
        have = assign_slots(keys, self.index(), free, clear, install,
                            "resolved-servers table")
        return len(have)

    # -- everyone ------------------------------------------------------------------------

    def index(self) -> dict[int, int]:
        """{key: slot} of the assigned slots."""
        return {k: i for i, k in enumerate(self.q[:self.slots].tolist()) if k}

    def find(self, upstream: str, spec: str) -> int:
        """The slot of an entry, -1 if it has none."""
        return self.index().get(slot_key(upstream, spec), -1)

    def seq(self, i: int) -> int:
        """The slot's sequence: a reader re-reads the records only when it moved."""
        return self.q[self._word(i, SEQ)]

    def read(self, i: int) -> tuple[int, list[tuple[str, int, int]]] | None:
        """(seq, [(ip, port, weight)]) of slot i; None if every try raced a write."""
        q = self.q
        w_seq = self._word(i, SEQ)
        base = self._base(i) + HEADER
        for _ in range(READ_TRIES):
            s1 = q[w_seq]
            if s1 & 1:
                continue
            n = min(q[self._word(i, COUNT)], MAX_RECORDS)
            data = bytes(self.mv[base:base + n * RECORD])
            if q[w_seq] == s1:
                return s1, decode_records(data)
        return None

    # -- manager ---------------------------------------------------------------------------

    def publish(self, i: int, records: list[tuple[str, int, int]]) -> None:
        """Write slot i's servers (the manager; the master for a fresh slot)."""
        q = self.q
        w_seq = self._word(i, SEQ)
        data = encode_records(records)
        base = self._base(i) + HEADER
        q[w_seq] = q[w_seq] | 1  # odd: readers retry
        self.mv[base:base + len(data)] = data
        q[self._word(i, COUNT)] = len(data) // RECORD
        q[w_seq] = q[w_seq] + 1  # even again, and moved
