"""Per-config features (forkproxy/master/features.py): a config without HTTP/2 loads
none of it in any process; a reload that brings HTTP/2 in serves it."""

from __future__ import annotations

import signal
import subprocess

from fp import wait_for

H2C = 'protocols = ["http/1.1", "h2c"]'
HTTP2_FILES = ("libnghttp2", "_cffi_backend")


def mapped_http2(pid: int) -> list[str]:
    """The HTTP/2 engine's files mapped by pid (its libnghttp2 and cffi's backend)."""
    with open(f"/proc/{pid}/maps") as f:
        return sorted({line.split()[-1] for line in f
                       if any(name in line for name in HTTP2_FILES)})


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True,
                          timeout=60)


def reloads_done(p) -> int:
    return sum(1 for e in p.log_events() if e.get("event") == "reload complete")


def test_http2_is_loaded_only_for_configs_that_use_it(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=2)
    tree = [p.pid, p.manager_pid(), *p.workers_pids()]
    assert len(tree) == 4 and None not in tree
    assert {pid: mapped_http2(pid) for pid in tree} == {pid: [] for pid in tree}
    r2 = curl("--http2-prior-knowledge", f"http://127.0.0.1:{p.port}/tiny")
    assert r2.returncode != 0  # a plain listener: HTTP/1.1 only

    old_workers = set(p.workers_pids())
    p.listener_extra = H2C
    p.write_config()
    p.send(signal.SIGHUP)
    wait_for(lambda: reloads_done(p) == 1, timeout=30, what="the reload")
    wait_for(lambda: not old_workers & set(p.workers_pids()), timeout=30,
             what="the old workers gone")
    url = f"http://127.0.0.1:{p.port}/tiny"
    r2 = curl("--http2-prior-knowledge", "-w", " %{http_version}", url)
    assert (r2.returncode, r2.stdout) == (0, b"ok 2"), r2.stderr
    r1 = curl("--http1.1", "-w", " %{http_version}", url)
    assert (r1.returncode, r1.stdout) == (0, b"ok 1.1"), r1.stderr
    for pid in [p.pid, *p.workers_pids()]:
        assert any("libnghttp2" in path for path in mapped_http2(pid)), pid


def test_a_config_with_http2_loads_it_before_forking(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=1, listener_extra=H2C)
    r2 = curl("--http2-prior-knowledge", "-w", " %{http_version}",
              f"http://127.0.0.1:{p.port}/tiny")
    assert (r2.returncode, r2.stdout) == (0, b"ok 2"), r2.stderr
    for pid in [p.pid, p.manager_pid(), *p.workers_pids()]:
        assert any("libnghttp2" in path for path in mapped_http2(pid)), pid
