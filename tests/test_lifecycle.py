"""Issue 3: the daemon lifecycle with real processes and real signals."""

from __future__ import annotations

import datetime
import os
import pwd
import signal
import socket
import subprocess
import threading
import time

from conftest import needs_root
from fp import PY, ROOT, alive, children_of, free_port, port_open, request, wait_for
from load import Load


def gen_events(p, event: str, pid: int | None = None) -> list[dict]:
    return [e for e in p.log_events() if e.get("event") == event
            and (pid is None or e.get("pid") == pid)]


def test_twenty_hups_under_load_lose_nothing(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=2)
    base = Load(p.port).start()
    time.sleep(3)  # a baseline window of steady load (a measurement, not synchronisation)
    baseline = base.stop()
    load = Load(p.port).start()
    for _ in range(20):
        p.send(signal.SIGHUP)
        time.sleep(1)
    # every HUP starts a generation; HUPs that arrive while the previous generation is
    # still starting (a loaded machine) are folded into the next: the last one completes
    wait_for(lambda: len(gen_events(p, "reloading")) == 20, timeout=30,
             what="20 'reloading' events")
    wait_for(lambda: any(e.get("generation") == 21 for e in gen_events(p, "reload complete")),
             timeout=30, what="the last generation (21) to complete")
    result = load.stop()
    print(f"\nbaseline: {baseline.summary()}\nduring 20 HUPs: {result.summary()}")
    assert result.failed == 0, result.errors
    assert result.ok > 200
    # old generations gone: exactly the configured workers remain
    wait_for(lambda: len(p.workers_pids()) == 2, timeout=30,
             what=f"old workers to exit (left: {p.workers_pids()})")
    p.stop()


def test_invalid_config_on_hup_keeps_serving(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=1)
    workers = set(p.workers_pids())
    good = p.config_text()
    p.write_config(good.replace("[upstream.app]", "[upstream.app]\nbogus_key = 1"))
    p.send(signal.SIGHUP)
    wait_for(lambda: gen_events(p, "reload failed: invalid config, keeping the running one"),
             what="the reload error in the log")
    err = gen_events(p, "reload failed: invalid config, keeping the running one")[0]
    assert any("upstream.app.bogus_key: unknown key" in e for e in err["errors"])
    assert request(p.port, "GET", "/tiny")[2] == b"ok"
    assert set(p.workers_pids()) == workers
    p.write_config(good)
    p.stop()


def test_sigkill_worker_under_load_is_replaced(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=2)
    load = Load(p.port, keepalive_threads=4, close_threads=2).start()
    wait_for(lambda: load.result.ok >= 100, timeout=60, what="load running")
    before = set(p.workers_pids())
    victim = sorted(before)[0]
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(set(p.workers_pids()) - before) == 1, timeout=30,
             what="a replacement worker")
    replaced_in = time.monotonic() - t0
    ok = load.result.ok
    wait_for(lambda: load.result.ok >= ok + 100, timeout=60, what="load served after it")
    result = load.stop()
    print(f"\nreplaced in {replaced_in * 1000:.0f} ms; {result.summary()}")
    # only the killed worker's in-flight requests may fail: at most one per client thread
    assert result.failed <= 6, result.errors
    p.stop()


def test_quit_lets_a_slow_request_finish(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=1)
    out = {}

    def slow():
        out["resp"] = request(p.port, "GET", "/sleep/1500")

    t = threading.Thread(target=slow)
    t.start()
    wait_for(lambda: origin.stats()["requests"] >= 1, what="the slow request to reach the origin")
    t0 = time.monotonic()
    code = p.stop(signal.SIGQUIT)
    t.join(10)
    assert code == 0
    assert out["resp"][0] == 200 and out["resp"][2] == b"slept\n"
    assert time.monotonic() - t0 > 0.5  # the master waited for the request


def test_ttin_ttou_change_worker_count(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=1)
    assert len(p.workers_pids()) == 1
    p.send(signal.SIGTTIN)
    wait_for(lambda: len(p.workers_pids()) == 2, what="a second worker")
    p.send(signal.SIGTTIN)
    wait_for(lambda: len(p.workers_pids()) == 3, what="a third worker")
    p.send(signal.SIGTTOU)
    wait_for(lambda: len(p.workers_pids()) == 2, what="one worker fewer")
    for _ in range(10):
        assert request(p.port, "GET", "/tiny")[2] == b"ok"
    p.stop()


@needs_root("to change user")
def test_workers_drop_to_configured_user(tmp_path, origin, proxies):
    nobody = pwd.getpwnam("nobody")
    p = proxies(tmp_path, origin.address, workers=2, server_extra='user = "nobody"')
    for pid in p.workers_pids():
        with open(f"/proc/{pid}/status") as f:
            uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
        assert all(int(u) == nobody.pw_uid for u in uids), uids
    assert request(p.port, "GET", "/tiny")[2] == b"ok"
    p.stop()


def test_worker_crashing_at_startup_is_backed_off(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=1, start=False)
    env = dict(os.environ, FORKPROXY_FAULT="startup")
    p.proc = subprocess.Popen([PY, "-m", "forkproxy", "run", "-c", p.conf], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: len(gen_events(p, "worker failed at start-up, backing off")) >= 4,
             timeout=15, what="repeated start-up failures")
    events = gen_events(p, "worker failed at start-up, backing off")
    delays = [e["retry_in"] for e in events]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8]  # exponential back-off, not a fork storm
    t_first = events[0]["timestamp"]
    assert t_first
    p.stop()


MANAGER_BACKOFF = "manager failed at start-up, backing off"
MANAGER_EXITS = (MANAGER_BACKOFF, "manager exited, restarting")


def _ts(event: dict) -> float:
    return datetime.datetime.fromisoformat(event["timestamp"]).timestamp()


def _assert_backoff_respected(exits: list[dict]) -> None:
    """The master forks the next manager only once the back-off is over, so the next
    manager's exit comes at least ``retry_in`` after the one that set the back-off."""
    for prev, nxt in zip(exits, exits[1:], strict=False):
        if prev["event"] == MANAGER_BACKOFF:
            assert _ts(nxt) - _ts(prev) >= prev["retry_in"], (prev, nxt)


def test_manager_crashing_at_startup_is_backed_off(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=1, start=False)
    env = dict(os.environ, FORKPROXY_FAULT="manager-startup")
    p.proc = subprocess.Popen([PY, "-m", "forkproxy", "run", "-c", p.conf], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: len(gen_events(p, MANAGER_BACKOFF)) >= 5, timeout=20,
             what="repeated manager start-up failures")
    events = gen_events(p, MANAGER_BACKOFF)
    assert [e["retry_in"] for e in events[:5]] == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert [e["failures"] for e in events[:5]] == [1, 2, 3, 4, 5]
    assert len({e["pid"] for e in events}) == len(events)  # a new manager every time
    _assert_backoff_respected(events)
    assert len(gen_events(p, "manager crashed")) >= 5  # the fault, not something else
    # the master survives and serves through its workers
    assert p.proc.poll() is None
    wait_for(p.ready, timeout=10, what="workers ready")
    assert request(p.port, "GET", "/tiny")[2] == b"ok"
    p.stop()


def test_manager_killed_repeatedly_is_restarted_after_its_back_off(tmp_path, origin,
                                                                    proxies):
    p = proxies(tmp_path, origin.address, workers=1, admin=True)
    killed: list[int] = []
    for _ in range(4):  # each new manager is killed as soon as it exists: a start-up failure
        mgr = wait_for(lambda: (m := p.manager_pid()) not in killed and m, timeout=15,
                       what="a new manager")
        os.kill(mgr, signal.SIGKILL)
        killed.append(mgr)
    survivor = wait_for(lambda: (m := p.manager_pid()) not in killed and m, timeout=15,
                        what="a manager after the kills")
    wait_for(lambda: port_open(p.admin_port), timeout=10, what="the admin endpoint back")
    assert request(p.admin_port, "GET", "/healthz")[0] == 200
    assert p.proc.poll() is None and p.manager_pid() == survivor
    exits = [e for e in p.log_events() if e.get("event") in MANAGER_EXITS]
    assert [e["pid"] for e in exits] == killed  # every death noticed, each one restarted
    assert any(e["event"] == MANAGER_BACKOFF for e in exits)
    _assert_backoff_respected(exits)
    assert request(p.port, "GET", "/tiny")[2] == b"ok"
    p.stop()


def test_stuck_worker_is_replaced_by_heartbeat(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=1, server_extra='heartbeat_timeout = "2s"')
    (worker,) = p.workers_pids()
    os.kill(worker, signal.SIGSTOP)  # a worker that never yields looks like this to the master
    wait_for(lambda: gen_events(p, "worker stopped heart-beating, replacing it"), timeout=10,
             what="the heartbeat verdict")
    wait_for(lambda: p.workers_pids() and worker not in p.workers_pids(), timeout=5,
             what="a replacement worker")
    assert request(p.port, "GET", "/tiny")[2] == b"ok"
    p.stop()


def test_workers_exit_when_master_is_killed(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=2)
    kids = children_of(p.proc.pid)
    assert kids
    p.proc.kill()
    p.proc.wait()
    wait_for(lambda: not any(alive(k) for k in kids), timeout=2, what="orphaned workers to exit")
    os.unlink(p.pidfile)  # a SIGKILLed master cannot remove it; the next start must work
    p.start()
    assert request(p.port, "GET", "/tiny")[2] == b"ok"
    p.stop()


def test_start_daemonizes_and_reports_errors(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=1, start=False)
    cli = [PY, "-m", "forkproxy"]
    r = subprocess.run(cli + ["start", "-c", p.conf], cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    pid = _pid_in(p.pidfile)
    try:
        assert request(p.port, "GET", "/tiny")[2] == b"ok"  # ready when start returned
        # a second start fails with the reason
        r2 = subprocess.run(cli + ["start", "-c", p.conf], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
        assert r2.returncode != 0 and "already running" in r2.stderr
        kids = children_of(pid)
        r3 = subprocess.run(cli + ["quit", "-c", p.conf], cwd=ROOT, timeout=10)
        assert r3.returncode == 0
        wait_for(lambda: not alive(pid) and not any(alive(k) for k in kids), timeout=15,
                 what="the daemon to stop")
        assert not os.path.exists(p.pidfile)
    finally:
        if alive(pid):
            for k in children_of(pid):
                os.kill(k, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
    # port in use: start fails with the reason
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT from above
    blocker.bind(("127.0.0.1", p.port))
    blocker.listen(1)
    try:
        r4 = subprocess.run(cli + ["start", "-c", p.conf], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
        assert r4.returncode != 0
        assert "Address already in use" in r4.stderr
    finally:
        blocker.close()


def test_systemd_notify(tmp_path, origin, proxies):
    sock_path = str(tmp_path / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(sock_path)
    ns.settimeout(15)
    p = proxies(tmp_path, origin.address, workers=1, start=False)
    env = dict(os.environ, NOTIFY_SOCKET=sock_path)
    p.proc = subprocess.Popen([PY, "-m", "forkproxy", "run", "-c", p.conf], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        msg = ns.recv(4096).decode()
        assert "READY=1" in msg and f"MAINPID={p.proc.pid}" in msg
        p.send(signal.SIGHUP)
        assert ns.recv(4096).decode().startswith("RELOADING=1")
        assert ns.recv(4096).decode() == "READY=1"
        p.send(signal.SIGTERM)
        assert ns.recv(4096).decode() == "STOPPING=1"
        p.proc.wait(15)
    finally:
        ns.close()


def _pid_in(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def test_binary_upgrade_and_rollback_under_load(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=2)
    old = p.proc.pid
    oldbin = p.pidfile + ".oldbin"
    load = Load(p.port).start()
    # USR2: a new master from the installed code, on the same sockets
    p.send(signal.SIGUSR2)
    new = wait_for(lambda: (_pid_in(p.pidfile) or old) != old and _pid_in(p.pidfile),
                   what="the new master's pidfile")
    assert _pid_in(oldbin) == old
    wait_for(lambda: len(p.workers_pids(new)) == 2, what="the new master's workers")
    wait_for(lambda: gen_events(p, "workers ready", pid=new), what="new workers ready")
    # WINCH: the old master's workers retire; QUIT: the old master exits
    os.kill(old, signal.SIGWINCH)
    wait_for(lambda: not p.workers_pids(old), timeout=15, what="old workers to retire")
    old_kids = children_of(old)
    os.kill(old, signal.SIGQUIT)
    wait_for(lambda: p.proc.poll() is not None, timeout=15, what="the old master to exit")
    result = load.stop()
    print(f"\nupgrade under load: {result.summary()}")
    assert result.failed == 0, result.errors
    assert request(p.port, "GET", "/tiny")[2] == b"ok"
    assert not os.path.exists(oldbin)
    # the new master is now the running instance; roll forward again and roll back
    load = Load(p.port).start()
    os.kill(new, signal.SIGUSR2)
    newer = wait_for(lambda: (_pid_in(p.pidfile) or new) != new and _pid_in(p.pidfile),
                     what="the newer master's pidfile")
    wait_for(lambda: gen_events(p, "workers ready", pid=newer), what="newer workers ready")
    os.kill(newer, signal.SIGQUIT)  # rollback: QUIT to the new one
    wait_for(lambda: _pid_in(p.pidfile) == new and not os.path.exists(oldbin), timeout=15,
             what="pidfile handed back to the old master")
    result = load.stop()
    print(f"rollback under load: {result.summary()}")
    assert result.failed == 0, result.errors
    assert request(p.port, "GET", "/tiny")[2] == b"ok"
    # stop the surviving master (a grandchild of the test's process now)
    kids = children_of(new)
    os.kill(new, signal.SIGTERM)
    wait_for(lambda: not alive(new) and not any(alive(k) for k in kids + old_kids), timeout=15,
             what="the last master to exit")
    assert not os.path.exists(p.pidfile)





def test_hup_binds_added_and_closes_removed_listeners(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=2)
    extra = free_port()
    p.listeners = [f"127.0.0.1:{p.port}", f"127.0.0.1:{extra}"]
    p.write_config()
    p.send(signal.SIGHUP)
    wait_for(lambda: len(gen_events(p, "reload complete")) == 1, what="reload")
    assert request(extra, "GET", "/tiny")[2] == b"ok"
    assert request(p.port, "GET", "/tiny")[2] == b"ok"
    p.listeners = [f"127.0.0.1:{extra}"]
    p.write_config()
    p.send(signal.SIGHUP)
    wait_for(lambda: len(gen_events(p, "reload complete")) == 2, what="second reload")
    wait_for(lambda: not port_open(p.port), timeout=15, what="the removed listener to close")
    assert request(extra, "GET", "/tiny")[2] == b"ok"
    p.stop()


def test_usr1_reopens_the_error_log(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=1)
    rotated = p.errlog + ".1"
    os.rename(p.errlog, rotated)
    p.send(signal.SIGUSR1)
    wait_for(lambda: os.path.exists(p.errlog), what="a new error log")
    p.send(signal.SIGHUP)  # something to log into the new file
    wait_for(lambda: gen_events(p, "reload complete"), what="reload logged in the new file")
    with open(rotated) as f:
        assert "reload complete" not in f.read()
    p.stop()
