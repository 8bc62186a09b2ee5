"""Issue 17: CPU pinning, read back from the kernel. Each worker's Cpus_allowed_list in
/proc/PID/status is compared with what its slot (fp-worker-N, /proc/PID/comm) must get, for
cpu_affinity = "auto", an explicit list and "off", with workers_per_core = 2, across
TTIN/TTOU and a replaced worker. A pinning the kernel refuses (a cpuset cgroup without that
CPU) is logged with the CPU and the reason, and the worker still serves."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import needs_root
from fp import request, wait_for

CPUS = sorted(os.sched_getaffinity(0))
CPUSET_V1 = "/sys/fs/cgroup/cpuset"

pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason=f"needs 2 usable CPUs, has {CPUS}")


def _cpu_list(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


def _slot(pid: int) -> int:
    with open(f"/proc/{pid}/comm") as f:
        name = f.read().strip()
    assert name.startswith("fp-worker-"), name
    return int(name.rsplit("-", 1)[1])


def _mapping(p) -> dict[int, str]:
    """slot -> Cpus_allowed_list of the worker serving it."""
    return {_slot(pid): _cpu_list(pid) for pid in p.workers_pids()}


def _wait_mapping(p, want: dict[int, str]) -> None:
    got: list = []

    def matches():
        try:
            got[:] = [_mapping(p)]
        except (OSError, AssertionError):  # a worker exiting while we read
            return False
        return got[0] == want
    try:
        wait_for(matches, timeout=30, what=f"workers pinned as {want}")
    except AssertionError as e:
        raise AssertionError(f"{e}: got {got[0] if got else None}") from None


def _all() -> str:
    return f"{CPUS[0]}-{CPUS[-1]}" if list(range(CPUS[0], CPUS[-1] + 1)) == CPUS else \
        ",".join(map(str, CPUS))


def test_auto_pins_one_worker_per_cpu_and_ttin_ttou_keep_the_mapping(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers='"auto"',
                server_extra='cpu_affinity = "auto"')
    n = len(CPUS)
    _wait_mapping(p, {i: str(CPUS[i]) for i in range(n)})
    p.send(signal.SIGTTIN)  # slot n: round robin again from the first CPU
    _wait_mapping(p, {i: str(CPUS[i % n]) for i in range(n + 1)})
    p.send(signal.SIGTTOU)
    _wait_mapping(p, {i: str(CPUS[i]) for i in range(n)})
    victim = next(pid for pid in p.workers_pids() if _slot(pid) == 1)
    os.kill(victim, signal.SIGKILL)  # the replacement serves slot 1 on the same CPU
    wait_for(lambda: victim not in p.workers_pids() and len(p.workers_pids()) == n,
             timeout=30, what="a replacement worker")
    _wait_mapping(p, {i: str(CPUS[i]) for i in range(n)})
    assert request(p.port, "GET", "/tiny")[2] == b"ok"
    assert not [e for e in p.log_events() if e.get("event") == "cannot pin the worker to its CPU"]
    p.stop()


def test_workers_per_core_two(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers='"auto"',
                server_extra='workers_per_core = 2\ncpu_affinity = "auto"')
    n = len(CPUS)
    _wait_mapping(p, {i: str(CPUS[i % n]) for i in range(2 * n)})
    p.send(signal.SIGTTOU)
    _wait_mapping(p, {i: str(CPUS[i % n]) for i in range(2 * n - 1)})
    p.send(signal.SIGTTIN)
    _wait_mapping(p, {i: str(CPUS[i % n]) for i in range(2 * n)})
    p.stop()


def test_explicit_list(tmp_path, origin, proxies):
    order = [CPUS[1], CPUS[0]]
    p = proxies(tmp_path, origin.address, workers=3,
                server_extra=f"cpu_affinity = [{order[0]}, {order[1]}]")
    _wait_mapping(p, {0: str(order[0]), 1: str(order[1]), 2: str(order[0])})
    p.send(signal.SIGTTIN)
    _wait_mapping(p, {0: str(order[0]), 1: str(order[1]), 2: str(order[0]), 3: str(order[1])})
    p.stop()


def test_off_leaves_workers_on_every_cpu(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=2, server_extra='cpu_affinity = "off"')
    _wait_mapping(p, {0: _all(), 1: _all()})
    p.send(signal.SIGTTIN)
    _wait_mapping(p, {0: _all(), 1: _all(), 2: _all()})
    p.stop()


@needs_root("a cpuset cgroup")
def test_refused_pinning_is_logged_with_cpu_and_reason(tmp_path, origin, proxies):
    """The master is moved into a cpuset without the second CPU; the worker respawned for
    slot 1 then cannot be pinned there: it says so, and serves unpinned."""
    if not os.access(os.path.join(CPUSET_V1, "cpuset.cpus"), os.W_OK):
        pytest.skip(f"needs a writable cgroup v1 cpuset at {CPUSET_V1}")
    p = proxies(tmp_path, origin.address, workers=2, server_extra='cpu_affinity = "auto"')
    _wait_mapping(p, {0: str(CPUS[0]), 1: str(CPUS[1])})
    group = os.path.join(CPUSET_V1, f"forkproxy-test-{os.getpid()}")
    os.mkdir(group)
    try:
        for name, value in (("cpuset.cpus", str(CPUS[0])),
                            ("cpuset.mems", _read(os.path.join(CPUSET_V1, "cpuset.mems")))):
            _write(os.path.join(group, name), value)
        _write(os.path.join(group, "cgroup.procs"), str(p.proc.pid))
        victim = next(pid for pid in p.workers_pids() if _slot(pid) == 1)
        os.kill(victim, signal.SIGKILL)
        failed = wait_for(lambda: [e for e in p.log_events()
                                   if e.get("event") == "cannot pin the worker to its CPU"], timeout=30,
                          what="the failed pinning logged")
        assert failed[0]["cpu"] == CPUS[1] and failed[0]["error"] == "Invalid argument", failed
        wait_for(lambda: len(p.workers_pids()) == 2, timeout=30, what="a replacement worker")
        assert _mapping(p)[1] == str(CPUS[0])  # unpinned: all its cpuset allows
        assert request(p.port, "GET", "/tiny")[2] == b"ok"
        p.stop()
    finally:
        for pid in _read(os.path.join(group, "cgroup.procs")).split():
            try:
                _write(os.path.join(CPUSET_V1, "cgroup.procs"), pid)
            except OSError:
                pass  # exited meanwhile
        os.rmdir(group)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)
