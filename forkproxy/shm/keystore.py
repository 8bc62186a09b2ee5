"""Ticket keys and OCSP staples in shared memory: one writer (master), many readers.

Why shared memory: every worker must encrypt with the same current key and decrypt with
every kept key, across reloads (HUP keeps the master) and binary upgrades (the memfd is
inherited by fd number across exec). Keys never touch disk (memfd) unless the operator
configures a ticket key file.

Consistency is a seqlock per section: the writer makes the section's sequence odd,
writes, then makes it even; a reader copies the section and retries when the sequence
was odd or changed. Sequence words are 8-byte aligned and accessed through a
``memoryview.cast('Q')`` (one ``mov`` on x86-64, see docs/ARCHITECTURE.md); x86-64 keeps stores and
loads in order. A reader re-reads only when a sequence moved, so the hot path is one
8-byte load.

Layout (little-endian, every section on its own 64-byte line)::

    0    header  magic "FPKEYST1" | version u32 | max_keys u32 | slots u32 |
                 staple_max u32 | size u64
    64   keys    seq u64 | generation u64 | count u32
    128          max_keys x 80-byte records (name 16 | hmac 32 | aes 32), current first
    ...  slot i  seq u64 | expires f64 (unix time) | length u32 | pad to 64 |
                 staple_max bytes of DER
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import struct
import time
from collections.abc import Sequence

__all__ = [
    "KEY_RECORD",
    "KeyFileError",
    "KeyStore",
    "KeyStoreError",
    "generate_key",
    "keys_to_keep",
    "load_ticket_key_file",
]

KEY_RECORD = 80
_MAGIC = b"FPKEYST1"
_VERSION = 1
_LINE = 64
_HEADER = struct.Struct("<8sIIIIQ")  # magic, version, max_keys, slots, staple_max, size
_KEYS_OFF = 64
_RECORDS_OFF = 128
_SLOT_HEAD = 64  # seq u64 @0, expires f64 @8, length u32 @16
_READ_RETRIES = 10_000


class KeyStoreError(RuntimeError):
    pass


class KeyFileError(ValueError):
    """A ticket key file is unusable; the message is meant for the operator."""


def generate_key() -> bytes:
    """A fresh 80-byte ticket key record from the kernel CSPRNG."""
    return os.urandom(KEY_RECORD)


def keys_to_keep(ticket_lifetime: float, rotation_interval: float) -> int:
    """How many previous keys cover ``ticket_lifetime`` with keys rotated every interval.

    A ticket issued just before a rotation must still decrypt ``ticket_lifetime`` later.
    """
    if rotation_interval <= 0:
        raise ValueError("rotation interval must be positive")
    return max(1, -(-int(ticket_lifetime) // int(rotation_interval)))


def _align(n: int) -> int:
    return (n + _LINE - 1) // _LINE * _LINE


def _layout_size(max_keys: int, slots: int, staple_max: int) -> tuple[int, int, int]:
    """(size, slots offset, slot stride)."""
    slots_off = _align(_RECORDS_OFF + max_keys * KEY_RECORD)
    stride = _SLOT_HEAD + _align(staple_max)
    return slots_off + slots * stride, slots_off, stride


class KeyStore:
    """The shared store. Create in the master before forking; workers read it.

    Writers: :meth:`rotate`, :meth:`set_keys` (keys section), :meth:`set_staple`,
    :meth:`clear_staple` (staple slots). One writing process per section at a time
    (the master for keys; the master or the OCSP helper for staples). Readers:
    :meth:`keys`, :meth:`staple`, :meth:`generation` (any number of processes, no
    locks); a worker should switch to :meth:`reader` after fork.
    """

    def __init__(self, fd: int | None, mm: mmap.mmap, *, writable: bool) -> None:
        self._fd = fd
        self._mm = mm
        self._writable = writable
        magic, version, self.max_keys, self.slots, self.staple_max, size = _HEADER.unpack_from(
            mm, 0
        )
        if magic != _MAGIC or version != _VERSION:
            raise KeyStoreError(f"not a forkproxy key store (magic {magic!r}, version {version})")
        expected, self._slots_off, self._stride = _layout_size(
            self.max_keys, self.slots, self.staple_max
        )
        if size != expected or len(mm) < size:
            raise KeyStoreError(f"key store size {len(mm)} does not match its header ({size})")
        self._q = memoryview(mm).cast("Q")  # 8-byte words: seqs and counters
        self._cache_seq = -1
        self._cache_keys: tuple[bytes, ...] = ()
        self._cache_gen = 0
        self._staple_cache: dict[int, tuple[int, bytes, float]] = {}

    # ------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        *,
        max_keys: int = 8,
        slots: int = 16,
        staple_max: int = 8192,
        memfd: bool = True,
    ) -> KeyStore:
        """A new, empty store (no keys yet: call :meth:`rotate` or :meth:`set_keys`).

        ``memfd``: back it by ``memfd_create`` (inheritable across exec by fd number,
        private to processes holding the fd, close-on-exec until the master passes it on);
        otherwise an anonymous shared mapping, inherited by fork only.
        """
        if not 1 <= max_keys <= 64:
            raise ValueError("max_keys must be 1..64")
        if not 0 <= slots <= 4096:
            raise ValueError("slots must be 0..4096")
        if not 0 < staple_max <= 1 << 20:
            raise ValueError("staple_max must be 1..1 MiB")
        size, _, _ = _layout_size(max_keys, slots, staple_max)
        fd: int | None = None
        if memfd:
            fd = os.memfd_create("forkproxy-keystore", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.fchmod(fd, 0o600)  # memfds are born 0777; these are the ticket keys
                os.ftruncate(fd, size)
                # readers must never see the file shrink under them (SIGBUS)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                os.close(fd)
                raise
        else:
            mm = mmap.mmap(-1, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        _HEADER.pack_into(mm, 0, _MAGIC, _VERSION, max_keys, slots, staple_max, size)
        return cls(fd, mm, writable=True)

    @classmethod
    def from_fd(cls, fd: int, *, readonly: bool = False) -> KeyStore:
        """Attach to a store inherited by fd number (binary upgrade: the new master).

        The fd is kept (not duplicated); the caller may pass it on again.
        """
        st = os.fstat(fd)
        if st.st_size < _HEADER.size:
            raise KeyStoreError(f"fd {fd} is too small to be a key store")
        prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
        mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, prot)
        try:
            store = cls(fd, mm, writable=not readonly)
        except BaseException:
            mm.close()
            raise
        if not readonly:
            store._repair()
        return store

    def reader(self) -> KeyStore:
        """A read-only mapping of the same store, for a worker (writes then fault
        instead of corrupting the master's keys). Unmaps this one; an anonymous mapping
        cannot be re-mapped and is returned as is."""
        if self._fd is None:
            return self
        ro = KeyStore.from_fd(self._fd, readonly=True)
        self._q.release()
        self._mm.close()
        self._fd = None
        return ro

    @property
    def fd(self) -> int | None:
        """The memfd (None for an anonymous mapping). Before ``exec``:
        ``os.set_inheritable(store.fd, True)`` and pass the number on (env or argv)."""
        return self._fd

    @property
    def size(self) -> int:
        return len(self._mm)

    def close(self) -> None:
        """Unmap (and close the memfd). Other processes keep their own mappings."""
        self._q.release()
        self._mm.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------ seqlock helpers

    def _check_writable(self) -> None:
        if not self._writable:
            raise KeyStoreError("this key store mapping is read-only")

    def _begin(self, word: int) -> int:
        seq = self._q[word]
        if seq & 1:  # a writer died mid-write: its half-written data is replaced now
            seq += 1
        self._q[word] = seq + 1
        return seq + 2

    def _end(self, word: int, seq: int) -> None:
        self._q[word] = seq

    def _repair(self) -> None:
        """A new writer taking over: leave no section marked as being written."""
        words = [_KEYS_OFF // 8] + [
            (self._slots_off + i * self._stride) // 8 for i in range(self.slots)
        ]
        for w in words:
            if self._q[w] & 1:
                self._q[w] += 1

    # ------------------------------------------------------------ ticket keys

    def set_keys(self, records: Sequence[bytes]) -> None:
        """Replace all keys (ticket_key_file): ``records[0]`` encrypts."""
        self._check_writable()
        recs = [bytes(r) for r in records]
        if not recs:
            raise ValueError("at least one ticket key is needed")
        if len(recs) > self.max_keys:
            raise ValueError(f"at most {self.max_keys} ticket keys fit in the store")
        for r in recs:
            if len(r) != KEY_RECORD:
                raise ValueError(f"ticket key records are {KEY_RECORD} bytes, got {len(r)}")
        w = _KEYS_OFF // 8
        gen = self._q[w + 1] + 1
        seq = self._begin(w)
        off = _RECORDS_OFF
        for r in recs:
            self._mm[off : off + KEY_RECORD] = r
            off += KEY_RECORD
        self._q[w + 1] = gen
        struct.pack_into("<I", self._mm, _KEYS_OFF + 16, len(recs))
        self._end(w, seq)

    def rotate(self, new_key: bytes | None = None, *, keep: int | None = None) -> bytes:
        """Push a new current key; keep up to ``keep`` previous ones (default: all that
        fit). Returns the new key's 16-byte name."""
        self._check_writable()
        key = generate_key() if new_key is None else bytes(new_key)
        if len(key) != KEY_RECORD:
            raise ValueError(f"ticket key records are {KEY_RECORD} bytes")
        limit = self.max_keys - 1 if keep is None else min(max(0, keep), self.max_keys - 1)
        old = [k for k in self._read_keys()[1] if k[:16] != key[:16]][:limit]
        self.set_keys([key, *old])
        return key[:16]

    def drop_old_keys(self, keep: int) -> None:
        """Age out all but ``keep`` previous keys (keep=0: only the current one)."""
        current = self._read_keys()[1]
        if current:
            self.set_keys(list(current[: 1 + max(0, keep)]))

    def _read_keys(self) -> tuple[int, tuple[bytes, ...], int]:
        q, mm, w = self._q, self._mm, _KEYS_OFF // 8
        for i in range(_READ_RETRIES):
            s1 = q[w]
            if s1 & 1:
                if i & 63 == 63:
                    os.sched_yield()  # the writer may be descheduled mid-write: let it run
                continue
            gen = q[w + 1]
            (count,) = struct.unpack_from("<I", mm, _KEYS_OFF + 16)
            count = min(count, self.max_keys)
            blob = mm[_RECORDS_OFF : _RECORDS_OFF + count * KEY_RECORD]
            if q[w] == s1:
                keys = tuple(blob[i : i + KEY_RECORD] for i in range(0, len(blob), KEY_RECORD))
                return s1, keys, gen
        raise KeyStoreError("key store is being written for too long (writer died?)")

    def keys(self) -> tuple[bytes, ...]:
        """The 80-byte records, current first. The same tuple object is returned while
        nothing changed (the ticket callback relies on that to skip work)."""
        seq = self._q[_KEYS_OFF // 8]
        if seq != self._cache_seq:
            try:
                self._cache_seq, self._cache_keys, self._cache_gen = self._read_keys()
            except KeyStoreError:
                return self._cache_keys  # keep serving the last consistent keys
        return self._cache_keys

    def generation(self) -> int:
        """How many times the keys were set or rotated (for metrics and logs)."""
        self.keys()
        return self._cache_gen

    # ------------------------------------------------------------ OCSP staples

    def _slot_off(self, slot: int) -> int:
        if not 0 <= slot < self.slots:
            raise IndexError(f"staple slot {slot} out of range (0..{self.slots - 1})")
        return self._slots_off + slot * self._stride

    def set_staple(self, slot: int, der: bytes, expires: float) -> None:
        """Publish the DER OCSP response for certificate ``slot``, valid until
        ``expires`` (unix time, the response's nextUpdate)."""
        self._check_writable()
        off = self._slot_off(slot)
        der = bytes(der)
        if not der:
            raise ValueError("empty staple: use clear_staple()")
        if len(der) > self.staple_max:
            raise ValueError(f"staple of {len(der)} bytes exceeds {self.staple_max}")
        w = off // 8
        seq = self._begin(w)
        data = off + _SLOT_HEAD
        self._mm[data : data + len(der)] = der
        struct.pack_into("<dI", self._mm, off + 8, float(expires), len(der))
        self._end(w, seq)

    def clear_staple(self, slot: int) -> None:
        """No staple for ``slot`` (revoked, invalid, or no responder)."""
        self._check_writable()
        off = self._slot_off(slot)
        w = off // 8
        seq = self._begin(w)
        struct.pack_into("<dI", self._mm, off + 8, 0.0, 0)
        self._end(w, seq)

    def staple_entry(self, slot: int) -> tuple[bytes, float] | None:
        """(DER, expires) as published, expired or not; None if none."""
        off = self._slot_off(slot)
        w = off // 8
        seq = self._q[w]
        cached = self._staple_cache.get(slot)
        if cached is not None and cached[0] == seq:
            _, der, expires = cached
        else:
            for i in range(_READ_RETRIES):
                s1 = self._q[w]
                if s1 & 1:
                    if i & 63 == 63:
                        os.sched_yield()
                    continue
                expires, n = struct.unpack_from("<dI", self._mm, off + 8)
                n = min(n, self.staple_max)
                der = self._mm[off + _SLOT_HEAD : off + _SLOT_HEAD + n]
                if self._q[w] == s1:
                    self._staple_cache[slot] = (s1, der, expires)
                    break
            else:
                if cached is None:
                    return None
                _, der, expires = cached
        return (der, expires) if der else None

    def staple(self, slot: int, now: float | None = None) -> bytes | None:
        """The DER to staple for ``slot`` now, or None (none, or expired: never stale)."""
        entry = self.staple_entry(slot)
        if entry is None:
            return None
        der, expires = entry
        if (time.time() if now is None else now) >= expires:
            return None
        return der


def load_ticket_key_file(path: str) -> list[bytes]:
    """Read an nginx-style ticket key file: raw 80-byte records, the first encrypts.

    Refuses files that group or others can read or write: whoever reads the keys can
    decrypt recorded TLS 1.2 sessions.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot open ticket key file: {e.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: ticket key file is not a regular file")
        if st.st_mode & 0o066:
            raise KeyFileError(
                f"{path}: ticket key file is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run chmod 600 on it"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(1 << 20)
    finally:
        os.close(fd)
    if not data:
        raise KeyFileError(f"{path}: ticket key file is empty")
    if len(data) == 48:
        raise KeyFileError(
            f"{path}: 48-byte (AES-128) ticket keys are not supported; "
            f"use 80 bytes (openssl rand 80 > {path})"
        )
    if len(data) % KEY_RECORD:
        raise KeyFileError(
            f"{path}: ticket key file must hold whole {KEY_RECORD}-byte records, "
            f"got {len(data)} bytes"
        )
    records = [data[i : i + KEY_RECORD] for i in range(0, len(data), KEY_RECORD)]
    names = [r[:16] for r in records]
    if len(set(names)) != len(names):
        raise KeyFileError(f"{path}: two ticket keys share a 16-byte name")
    return records
