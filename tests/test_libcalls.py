"""The libc calls os has no binding for (forkproxy/libcalls.py), compiled and as plain
Python (the same file loaded as Python), each doing its real work: the name ps shows,
the signal a process gets when its parent dies, writeback of a file range, malloc_trim."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from fp import alive, wait_for
from puremod import pure_twin

from forkproxy import libcalls


def builds() -> list:
    """The module as imported, and its Python twin when the imported one is compiled."""
    return [libcalls, pure_twin(libcalls)] if libcalls.COMPILED else [libcalls]


ORPHAN = r"""
import os, signal, sys, time
sys.path[:0] = [{root!r}, {tests!r}]
from puremod import pure_twin
from forkproxy import libcalls
mod = pure_twin(libcalls) if {pure!r} else libcalls
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    mod.set_pdeathsig(signal.SIGKILL)
    mod.set_name("fp-orphan-test")
    os.write(w, b"%d\n" % os.getpid())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.1)
    os._exit(3)
os.close(w)
print(os.read(r, 64).decode().strip(), flush=True)
"""


@pytest.mark.parametrize("pure", [False, True] if libcalls.COMPILED else [False])
def test_set_pdeathsig_and_set_name_reach_the_kernel(pure):
    """A child that asked for SIGKILL on its parent's death dies when the parent exits,
    and ps saw the name it gave itself (cut to 15 bytes)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(libcalls.__file__)))
    code = ORPHAN.format(root=root, tests=os.path.dirname(os.path.abspath(__file__)),
                         pure=pure)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    child = int(parent.stdout.readline())
    try:
        with open(f"/proc/{child}/comm") as f:
            assert f.read().strip() == "fp-orphan-test"[:15]
        parent.wait(timeout=60)  # the parent returns once it printed the pid
        wait_for(lambda: not alive(child), timeout=60, what="the orphan's SIGKILL")
    finally:
        if alive(child):
            os.kill(child, 9)
        parent.stdout.close()


@pytest.mark.parametrize("mod", builds(), ids=lambda m: "compiled" if m.COMPILED else "python")
def test_start_writeback_writes_back_and_reports_errors(mod, tmp_path):
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"x" * 100_000)
        assert mod.has_sync_file_range()
        mod.start_writeback(fd, 0, 100_000)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as err:
        mod.start_writeback(fd, 0, 100)  # closed
    assert err.value.errno == 9  # EBADF, with its message
    assert "Bad file descriptor" in str(err.value)


TRIM = r"""
import sys
sys.path[:0] = [{root!r}, {tests!r}]
from puremod import pure_twin
from forkproxy import libcalls
mod = pure_twin(libcalls) if {pure!r} else libcalls
assert mod.has_malloc_trim()

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

blocks = [bytearray(1000) for _ in range(40_000)]  # 40 MB of malloc, below its mmap size
sentinel = bytearray(1000)  # above them: free() alone cannot shrink the heap
del blocks
before = rss()
mod.malloc_trim()
print(before - rss())
"""


@pytest.mark.parametrize("pure", [False, True] if libcalls.COMPILED else [False])
def test_malloc_trim_gives_freed_heap_pages_back(pure):
    root = os.path.dirname(os.path.dirname(os.path.abspath(libcalls.__file__)))
    code = TRIM.format(root=root, tests=os.path.dirname(os.path.abspath(__file__)), pure=pure)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert int(out) > 20_000_000  # most of the 40 MB freed went back to the OS


def test_the_compiled_build_does_not_load_ctypes():
    """What libcalls is compiled for: no ctypes in a process that runs no TLS."""
    if not libcalls.COMPILED:
        pytest.skip("plain-Python job: libcalls uses ctypes there by design")
    code = ("import sys\nimport forkproxy.cli, forkproxy.master.arbiter\n"
            "print('ctypes' in sys.modules, '_ctypes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]
