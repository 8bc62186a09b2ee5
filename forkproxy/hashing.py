"""Stable hashes: the same value in every process and after every restart. The workers'
balancer scores peers with them (worker/balancer.py) and the health table keys its
entries by them (shm/health.py), so both must see the very same function."""

from __future__ import annotations

# hashlib's own blake2b (hashlib.blake2b is _blake2.blake2b): hashlib itself loads
# _hashlib, which maps and initialises libcrypto (~3.4 MiB) in every process
from _blake2 import blake2b

_M64 = (1 << 64) - 1
_U53 = 2.0**-53


def hash64(data: bytes, salt: bytes = b"") -> int:
    """A stable 64-bit hash (the same in every process and after every restart)."""
    return int.from_bytes(blake2b(data, digest_size=8, person=salt).digest(), "little")


def mix64(x: int) -> int:
    """splitmix64's finalizer: a cheap bijective scramble of a 64-bit integer."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def unit(x: int) -> float:
    """A 64-bit hash as a float in the open interval (0, 1)."""
    return ((x >> 11) + 0.5) * _U53
