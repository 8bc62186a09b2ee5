"""Issue 17: where forkproxy runs is said plainly. The shared-memory rings are correct only
on x86-64 (TSO ordering, atomic 8-byte stores from Python): the ring refuses other CPUs,
and `forkproxy check`, README and OPERATIONS say so with the reason."""

from __future__ import annotations

import os
import platform
import subprocess

from fp import PY, ROOT

from forkproxy import config, preflight
from forkproxy.shm.ring import platform_support

BASE = ('[[listener]]\nlisten = "127.0.0.1:1"\nupstream = "a"\n'
        '[upstream.a]\nservers = [{ address = "127.0.0.1:2" }]\n')


def test_other_cpus_are_refused_with_the_reason():
    for machine in ("aarch64", "armv7l", "ppc64le", "riscv64"):
        ok, text = platform_support(machine)
        assert not ok
        assert machine in text and "x86-64 Linux only" in text
        assert "TSO" in text and "8-byte" in text and "atomic" in text
    assert platform_support("x86_64")[0] and platform_support("AMD64")[0]


def test_check_reports_the_platform():
    lines = preflight.report(config.loads(BASE), machine="aarch64")
    assert lines[0].startswith("error: platform: aarch64 is not supported"), lines
    assert preflight.failed(lines)
    lines = preflight.report(config.loads(BASE), machine="x86_64")
    assert lines[0].startswith("info: platform: x86_64") and not preflight.failed(lines)


def test_forkproxy_check_prints_it(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text(BASE)
    r = subprocess.run([PY, "-m", "forkproxy", "check", "-c", str(conf)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    supported = platform.machine().lower() in ("x86_64", "amd64")
    assert r.returncode == (0 if supported else 1), r.stdout + r.stderr
    line = [ln for ln in r.stdout.splitlines() if "platform:" in ln]
    assert line and "x86-64 Linux only" in line[0], r.stdout


def test_docs_say_it():
    for doc in ("README.md", os.path.join("docs", "OPERATIONS.md")):
        with open(os.path.join(ROOT, doc)) as f:
            text = f.read()
        assert "x86-64" in text and "TSO" in text, doc
        assert "forkproxy check" in text, doc
