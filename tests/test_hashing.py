"""forkproxy/hashing.py takes blake2b from _blake2 (hashlib would load libcrypto in every
process): the very function hashlib.blake2b is, so balancing maps every key as before."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from fp import ROOT

from forkproxy.hashing import hash64


def test_hash64_is_hashlibs_blake2b():
    for salt in (b"", b"peer", b"health-key-salt!"):
        for i in range(2000):
            data = b"user-%d" % i
            want = int.from_bytes(
                hashlib.blake2b(data, digest_size=8, person=salt).digest(), "little")
            assert hash64(data, salt) == want


def test_importing_hashing_loads_no_libcrypto():
    code = ("import sys, forkproxy.hashing; "
            "print(any(m in sys.modules for m in ('hashlib', '_hashlib', 'ssl', '_ssl')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "False"
