"""Issue 4 end to end: real master, workers, manager and origin; request contexts through the
rings into the access log, /metrics, /status, /healthz, USR1 reopen, SIGKILL of the master."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import threading
import time

from conftest import needs_root
from fp import (
    PY,
    ROOT,
    alive,
    children_of,
    comm,
    connect,
    free_port,
    port_open,
    recv_response,
    request,
    shm_segments,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

from forkproxy import config as config_mod
from forkproxy.manager import profiling, rawbatch


def admin_get(p, path: str, headers: dict | None = None):
    # "workers ready" in the error log does not wait for the manager: wait for the port
    wait_for(lambda: port_open(p.admin_port), timeout=10, what="the admin endpoint")
    return request(p.admin_port, "GET", path, headers=headers)


def read_lines(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def metric(text: str, family: str, sample: str, **labels) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name != family:
            continue
        for s in fam.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def keepalive_requests(port: int, paths: list[str], prefix: str) -> list[str]:
    """Send the paths on one keep-alive connection with our own X-Request-Id each."""
    ids = []
    with connect(port) as c:
        for i, path in enumerate(paths):
            rid = f"{prefix}-{i}"
            c.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nX-Request-Id: {rid}\r\n\r\n".encode())
            status, _, _, _ = recv_response(c)
            assert status == 200
            ids.append(rid)
    return ids


def test_access_log_and_metrics_match_requests_one_to_one(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=2, admin=True)
    n_fast, n_slow, n_conns = 1200, 5, 6
    results: list[list[str]] = [[] for _ in range(n_conns + 1)]

    def client(k):
        results[k] = keepalive_requests(p.port, ["/tiny"] * (n_fast // n_conns), f"c{k}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_conns)]
    slow = threading.Thread(target=lambda: results.__setitem__(
        n_conns, keepalive_requests(p.port, ["/sleep/200"] * n_slow, "slow")))
    for t in [*threads, slow]:
        t.start()
    for t in [*threads, slow]:
        t.join()
    sent = [rid for ids in results for rid in ids]
    n = len(sent)
    assert n == n_fast + n_slow

    lines = wait_for(lambda: (ls := read_lines(p.access_log)) and len(ls) >= n and ls,
                     timeout=5, what="the access log lines")
    assert sorted(line["request_id"] for line in lines) == sorted(sent)  # one to one
    for line in lines:
        for key in ("ts", "request_id", "remote", "method", "path", "status", "bytes_out",
                    "upstream", "upstream_addr", "duration_ms", "phases", "tls_resumed",
                    "worker"):
            assert key in line
        assert line["status"] == 200 and line["upstream"] == "app"
        assert line["upstream_addr"] == origin.address and line["tls_resumed"] is None
    slow_lines = [ln for ln in lines if ln["path"] == "/sleep/200"]
    assert len(slow_lines) == n_slow
    assert all(ln["phases"]["upstream_first_byte"] >= 195 for ln in slow_lines)
    assert all(ln["duration_ms"] >= ln["phases"]["upstream_first_byte"] for ln in slow_lines)
    assert {ln["worker"] for ln in lines} <= set(p.workers_pids())

    status, headers, body = admin_get(p, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    fams = {f.name for f in text_string_to_metric_families(text)}  # parses
    for name in ("forkproxy_requests", "forkproxy_request_duration_seconds",
                 "forkproxy_phase_duration_seconds", "forkproxy_tls_handshakes",
                 "forkproxy_upstream_connections", "forkproxy_upstream_reuse",
                 "forkproxy_workers", "forkproxy_worker_resident_bytes",
                 "forkproxy_ring_dropped", "forkproxy_tcp_connections"):
        assert name in fams, name
    listener = f"127.0.0.1:{p.port}"
    assert metric(text, "forkproxy_requests", "forkproxy_requests_total") == n
    assert metric(text, "forkproxy_requests", "forkproxy_requests_total",
                  listener=listener, upstream="app", code="200") == n
    d = "forkproxy_request_duration_seconds"
    assert metric(text, d, d + "_count") == n
    ph = "forkproxy_phase_duration_seconds"
    fb = {"phase": "upstream_first_byte"}
    assert metric(text, ph, ph + "_count", **fb) == n
    above_100ms = metric(text, ph, ph + "_count", **fb) - metric(text, ph, ph + "_bucket",
                                                                 le="0.1", **fb)
    assert above_100ms >= n_slow  # not before the origin's 200 ms (later on a loaded host)
    assert metric(text, ph, ph + "_sum", **fb) >= n_slow * 0.195
    reuse = "forkproxy_upstream_reuse"
    reused = metric(text, reuse, reuse + "_total", upstream="app", reused="true")
    fresh = metric(text, reuse, reuse + "_total", upstream="app", reused="false")
    assert reused + fresh == n and reused > fresh  # keep-alive pools upstream connections
    assert metric(text, "forkproxy_workers", "forkproxy_workers") == 2
    assert metric(text, "forkproxy_ring_dropped", "forkproxy_ring_dropped_total") == 0
    rss = [s for f in text_string_to_metric_families(text)
           if f.name == "forkproxy_worker_resident_bytes" for s in f.samples]
    assert {int(s.labels["pid"]) for s in rss} == set(p.workers_pids())
    assert all(s.value > 1 << 20 for s in rss)
    tcp = "forkproxy_tcp_connections"
    assert metric(text, tcp, tcp, listener=listener, state="listen") == 2  # one per worker slot
    p.stop()


def test_status_healthz_generations_and_status_verb(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=2, admin=True)
    assert admin_get(p, "/healthz")[:3:2] == (200, b"ok\n")
    st = json.loads(admin_get(p, "/status")[2])
    assert st["master_pid"] == p.pid and st["generation"] == 1
    assert st["config"] == p.conf
    assert st["access_log_write_behind"] == 16 << 20  # the default, on a regular file
    assert sorted(w["pid"] for w in st["workers"]) == sorted(p.workers_pids())
    for w in st["workers"]:
        assert w["generation"] == 1 and w["rss"] > 0 and w["started"] <= time.time()
        assert set(w) >= {"pid", "cpu", "generation", "started", "requests", "connections", "rss"}
    old = set(p.workers_pids())
    p.send(signal.SIGHUP)

    def reloaded():
        s = json.loads(admin_get(p, "/status")[2])
        gens = {w["generation"] for w in s["workers"]}
        return s["generation"] == 2 and gens == {2} and s
    st = wait_for(reloaded, timeout=15, what="generation 2 workers only in /status")
    assert not old & {w["pid"] for w in st["workers"]}
    out = subprocess.run([PY, "-m", "forkproxy", "status", "-c", p.conf], cwd=ROOT,
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"master pid {p.pid}  generation 2")
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[3:]}
    assert set(rows) == {str(w["pid"]) for w in st["workers"]}
    assert all(r[2] == "2" for r in rows.values())
    p.stop()


def test_healthz_is_503_without_workers(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=1, admin=True)
    p.send(signal.SIGWINCH)  # workers retire, the master (and the manager) stay
    wait_for(lambda: not p.workers_pids(), timeout=10, what="the workers to go")
    assert wait_for(lambda: admin_get(p, "/healthz")[0] == 503, timeout=10,
                    what="/healthz 503")
    p.stop()


def test_usr1_reopens_the_access_log_after_rename(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=1, admin=True)
    rotate_with_usr1(p, 5, 7)
    p.stop()


def rotate_with_usr1(p, n_before: int, n_after: int) -> None:
    """Requests logged, the log renamed, USR1, more requests: each file has exactly its
    own requests' lines, in order."""
    before = keepalive_requests(p.port, ["/tiny"] * n_before, "before")
    wait_for(lambda: len(read_lines(p.access_log)) == n_before, timeout=5,
             what=f"{n_before} lines")
    os.rename(p.access_log, p.access_log + ".1")
    p.send(signal.SIGUSR1)
    wait_for(lambda: os.path.exists(p.access_log), timeout=5, what="the reopened access log")
    after = keepalive_requests(p.port, ["/tiny"] * n_after, "after")
    wait_for(lambda: len(read_lines(p.access_log)) == n_after, timeout=5,
             what=f"{n_after} new lines")
    assert [ln["request_id"] for ln in read_lines(p.access_log + ".1")] == before
    assert [ln["request_id"] for ln in read_lines(p.access_log)] == after


def test_usr1_reopen_with_a_small_write_behind_window_keeps_every_line(tmp_path, origin,
                                                                        proxies):
    """A 1 KiB window: nearly every flush starts writeback and drops pages, and USR1
    restarts the windows on the new file (manager/writebehind.py)."""
    p = proxies(tmp_path, origin.address, workers=1, admin=True, start=False)
    p.write_config(p.config_text().replace('format = "json"',
                                           'format = "json"\naccess_log_write_behind = "1k"'))
    p.start()
    assert json.loads(admin_get(p, "/status")[2])["access_log_write_behind"] == 1024
    rotate_with_usr1(p, 40, 60)
    assert "access log write failed" not in p.log()
    assert json.loads(admin_get(p, "/status")[2])["access_log_write_behind"] == 1024
    p.stop()


def test_quit_flushes_every_line(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=2)
    sent = keepalive_requests(p.port, ["/tiny"] * 50, "q")
    p.stop(signal.SIGQUIT)  # right away: the manager drains the rings and flushes on exit
    assert sorted(ln["request_id"] for ln in read_lines(p.access_log)) == sorted(sent)


def test_admin_token_required_off_loopback(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=1, admin=True, start=False)
    p.write_config(p.config_text().replace(f'listen = "127.0.0.1:{p.admin_port}"',
                                           f'listen = "*:{p.admin_port}"\ntoken = "t0k"'))
    p.start()
    assert admin_get(p, "/status")[0] == 401
    assert admin_get(p, "/status", {"Authorization": "Bearer wrong"})[0] == 401
    assert admin_get(p, "/metrics", {"Authorization": "Bearer t0k"})[0] == 200
    out = subprocess.run([PY, "-m", "forkproxy", "status", "-c", p.conf], cwd=ROOT,
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and out.stdout.startswith(f"master pid {p.pid}"), out.stderr
    p.stop()


def test_console_format_access_log(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=1, start=False)
    p.write_config(p.config_text().replace('format = "json"', 'format = "console"'))
    # the error log is in console format too: wait for the port, not for a JSON event
    p.proc = subprocess.Popen([PY, "-m", "forkproxy", "run", "-c", p.conf], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p.pid = p.proc.pid
    wait_for(lambda: port_open(p.port), timeout=15, what="the proxy port")
    keepalive_requests(p.port, ["/tiny", "/sleep/20"], "console")

    def text():
        try:
            with open(p.access_log) as f:
                data = f.read()
            return data.count("\n") == 2 and data
        except FileNotFoundError:
            return ""
    lines = wait_for(text, timeout=5, what="two console access log lines").splitlines()
    assert '"GET /tiny" 200 2B ' in lines[0] and "rid=console-0" in lines[0]
    assert f"app={origin.address}" in lines[0]
    assert '"GET /sleep/20" 200 ' in lines[1] and " first_byte=" in lines[1]
    p.stop()


def test_sigkill_master_leaves_nothing_and_restart_works(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=2, admin=True)
    keepalive_requests(p.port, ["/tiny"] * 3, "first")
    kids = p.workers_pids() + [p.manager_pid()]
    assert None not in kids and len(kids) == 3
    os.kill(p.pid, signal.SIGKILL)
    p.proc.wait()
    wait_for(lambda: not any(alive(k) for k in kids), timeout=5,
             what="workers and manager to exit after the master's death")
    assert shm_segments() <= p.shm_before
    os.unlink(p.pidfile)  # a SIGKILLed master cannot remove it; a stale one must not block
    lines_before = len(read_lines(p.access_log))
    assert lines_before == 3  # the manager flushed when the master died
    p.start()  # same config, same admin port: must bind again
    sent = keepalive_requests(p.port, ["/tiny"] * 4, "second")
    wait_for(lambda: len(read_lines(p.access_log)) == lines_before + 4, timeout=5,
             what="the new master's access log lines")
    assert [ln["request_id"] for ln in read_lines(p.access_log)][-4:] == sent
    assert admin_get(p, "/healthz")[0] == 200
    p.stop()
    assert shm_segments() <= p.shm_before


def test_manager_killed_is_restarted_and_resumes_the_rings(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=1, admin=True)
    first = keepalive_requests(p.port, ["/tiny"] * 3, "a")
    wait_for(lambda: len(read_lines(p.access_log)) == 3, timeout=5, what="3 lines")
    old = p.manager_pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: (m := p.manager_pid()) and m != old, timeout=10, what="a new manager")
    wait_for(lambda: admin_get(p, "/healthz")[0] == 200, timeout=10, what="admin back")
    second = keepalive_requests(p.port, ["/tiny"] * 4, "b")
    wait_for(lambda: len(read_lines(p.access_log)) == 7, timeout=5, what="7 lines")
    assert [ln["request_id"] for ln in read_lines(p.access_log)] == first + second
    text = admin_get(p, "/metrics")[2].decode()
    assert metric(text, "forkproxy_requests", "forkproxy_requests_total") == 4  # counters restart
    p.stop()


def test_debug_endpoints_profile_and_greenlets(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=1, admin=True)
    [pid] = p.workers_pids()
    # the worker installs the hook at start-up (forkproxy.worker.profiling.install_worker_hook)
    assert profiling.catches_debug_signal(pid)
    stop = threading.Event()

    def load():
        while not stop.is_set():
            keepalive_requests(p.port, ["/tiny"] * 20, "load")

    t = threading.Thread(target=load)
    t.start()
    try:
        status, headers, body = admin_get(p, f"/debug/profile?pid={pid}&seconds=1")
    finally:
        stop.set()
        t.join()
    assert status == 200, body
    # how many samples a second of profiling gets depends on the CPU the worker was given
    # (5 beside stress-ng and other jobs); the stacks must add up to them
    samples = int(headers["x-samples"])
    lines = body.decode().splitlines()
    assert samples >= 1 and lines and all(ln.rsplit(" ", 1)[1].isdigit() for ln in lines)
    assert sum(int(ln.rsplit(" ", 1)[1]) for ln in lines) == samples, (samples, lines)
    assert any("http1.py" in ln for ln in lines)  # the connection greenlets were sampled
    status, _, body = admin_get(p, f"/debug/greenlets?pid={pid}")
    assert status == 200
    report = json.loads(body)
    assert report["pid"] == pid and report["total"] >= 2
    assert admin_get(p, "/debug/greenlets?pid=1")[0] == 404  # only workers are signalled
    p.stop()


def test_worker_gauges_reach_metrics(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=1, admin=True)
    keepalive_requests(p.port, ["/tiny"] * 3, "g")
    [pid] = p.workers_pids()
    u = "forkproxy_upstream_connections"

    def pooled():  # gauges come about once a second: wait for one taken after the requests
        text = admin_get(p, "/metrics")[2].decode()
        return metric(text, u, u, upstream="app", state="idle") >= 1 and text
    try:
        text = wait_for(pooled, timeout=30, what="a gauges record showing the pooled connection")
    except AssertionError:
        text = admin_get(p, "/metrics")[2].decode()
        # the worker pushes a gauges record about once a second (worker/profiling.py)
        assert metric(text, "forkproxy_collector_records", "forkproxy_collector_records_total",
                      kind="gauges"), "no gauges record reached the manager"
        raise
    assert metric(text, "forkproxy_worker_greenlets", "forkproxy_worker_greenlets",
                  pid=str(pid)) >= 2
    assert metric(text, u, u, upstream="app", state="active") == 0
    p.stop()


def test_hup_switches_access_log_and_admin_address(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=1, admin=True)
    first = keepalive_requests(p.port, ["/tiny"] * 2, "one")
    wait_for(lambda: len(read_lines(p.access_log)) == 2, timeout=5, what="2 lines")
    old_admin = p.admin_port
    new_log = os.path.join(str(tmp_path), "access2.log")
    text = p.config_text().replace(p.access_log, new_log)
    p.admin_port = free_port()
    p.write_config(text.replace(f"127.0.0.1:{old_admin}", f"127.0.0.1:{p.admin_port}"))
    p.send(signal.SIGHUP)
    wait_for(lambda: port_open(p.admin_port), timeout=10, what="admin on the new port")
    wait_for(lambda: not port_open(old_admin), timeout=5, what="old admin port closed")
    wait_for(lambda: any(e.get("event") == "reload complete" for e in p.log_events()),
             timeout=10, what="the reload to complete")
    # a retiring worker may still accept and answer once with "Connection: close",
    # which this keep-alive helper does not follow: wait for the old generation
    wait_for(lambda: len(p.workers_pids()) == 1, timeout=15, what="old worker gone")
    second = keepalive_requests(p.port, ["/tiny"] * 3, "two")
    wait_for(lambda: len(read_lines(new_log)) == 3, timeout=5, what="3 lines in the new log")
    assert [ln["request_id"] for ln in read_lines(p.access_log)] == first
    assert [ln["request_id"] for ln in read_lines(new_log)] == second
    p.stop()


@needs_root("to change user")
def test_manager_drops_privileges_and_still_reloads(tmp_path, origin, proxies):
    nobody = pwd.getpwnam("nobody")
    p = proxies(tmp_path, origin.address, workers=1, admin=True, server_extra='user = "nobody"')
    first = keepalive_requests(p.port, ["/tiny"] * 2, "one")
    assert admin_get(p, "/healthz")[0] == 200  # served: the manager is past its start-up
    mgr = p.manager_pid()
    with open(f"/proc/{mgr}/status") as f:
        uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
    assert all(int(u) == nobody.pw_uid for u in uids), uids
    wait_for(lambda: len(read_lines(p.access_log)) == 2, timeout=5, what="2 lines")
    text = admin_get(p, "/metrics")[2].decode()
    tcp = "forkproxy_tcp_connections"
    assert metric(text, tcp, tcp, listener=f"127.0.0.1:{p.port}", state="listen") == 1
    # the config lives in a root-only directory: the unprivileged manager cannot re-read
    # it and is replaced by one forked with the master's new config
    new_log = os.path.join(str(tmp_path), "access2.log")
    p.write_config(p.config_text().replace(p.access_log, new_log))
    p.send(signal.SIGHUP)
    wait_for(lambda: (m := p.manager_pid()) and m != mgr, timeout=10, what="a new manager")
    wait_for(lambda: any(e.get("event") == "reload complete" for e in p.log_events()),
             timeout=10, what="the reload to complete")
    # a retiring worker may still accept and answer once with "Connection: close",
    # which this keep-alive helper does not follow: wait for the old generation
    wait_for(lambda: len(p.workers_pids()) == 1, timeout=15, what="old worker gone")
    second = keepalive_requests(p.port, ["/tiny"] * 3, "two")
    wait_for(lambda: len(read_lines(new_log)) == 3, timeout=5, what="3 lines in the new log")
    assert [ln["request_id"] for ln in read_lines(p.access_log)] == first
    assert [ln["request_id"] for ln in read_lines(new_log)] == second
    p.stop()


def test_tls_handshakes_and_resumption_are_counted(tmp_path, origin, proxies):
    import socket
    import ssl

    from tlsutil import Pki, client_context

    (tmp_path / "pki").mkdir()
    pki = Pki.create(tmp_path / "pki")
    pki.issue_leaves("http://127.0.0.1:9/ocsp")  # no responder: stapling stays off
    leaf = pki.leaves["ec"]
    p = proxies(tmp_path, origin.address, workers=1, admin=True, listener_extra=(
        f'[listener.tls]\ncertificates = [{{ cert = "{leaf.cert_path}", '
        f'key = "{leaf.key_path}" }}]\nocsp_stapling = false\n'))
    ctx = client_context(pki.ca_path, version=ssl.TLSVersion.TLSv1_2)
    session = None
    resumed = []
    for i in range(2):
        raw = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname=leaf.dns[0], session=session) as s:
            s.sendall(f"GET /tiny HTTP/1.1\r\nHost: x\r\nX-Request-Id: tls-{i}\r\n"
                      "Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200")
            resumed.append(s.session_reused)
            session = s.session
    assert resumed == [False, True]
    lines = wait_for(lambda: (ls := read_lines(p.access_log)) and len(ls) == 2 and ls,
                     timeout=5, what="2 access log lines")
    assert [(ln["request_id"], ln["tls_resumed"]) for ln in lines] == [("tls-0", False),
                                                                      ("tls-1", True)]
    assert all(ln["phases"]["tls_handshake"] > 0 for ln in lines)
    text = admin_get(p, "/metrics")[2].decode()
    t = "forkproxy_tls_handshakes"
    assert metric(text, t, t + "_total", resumed="false") == 1
    assert metric(text, t, t + "_total", resumed="true") == 1
    ph = "forkproxy_phase_duration_seconds"
    assert metric(text, ph, ph + "_count", phase="tls_handshake") == 2
    p.stop()


def spread_requests(port: int, prefix: str, conns: int = 24, per_conn: int = 2) -> list[str]:
    """Requests on many connections: SO_REUSEPORT spreads them, and all 24 land on the
    same one of two workers with probability 2**-23."""
    ids = []
    for k in range(conns):
        ids += keepalive_requests(port, ["/tiny"] * per_conn, f"{prefix}{k}")
    return ids


def test_auto_collectors_follow_the_record_paths_cost(tmp_path, origin, proxies):
    """collectors = "auto" (the default): one collector per 16 workers when the record path
    is compiled (~1 µs per record), one per 4 as plain Python (~7.5 µs): 5 workers get one
    collector compiled and two shards' worth as plain Python."""
    workers = config_mod.WORKERS_PER_COLLECTOR_PURE + 1
    p = proxies(tmp_path, origin.address, workers=workers, admin=True)
    want = 1 if rawbatch.COMPILED else 2
    assert json.loads(admin_get(p, "/status")[2])["collectors"] == want
    manager = p.manager_pid()
    shards = [c for c in children_of(manager) if comm(c).startswith("fp-collector")]
    assert len(shards) == want - 1


def test_collector_shards_count_log_reopen_and_restart(tmp_path, origin, proxies):
    """[server] collectors = 2: a shard process drains half of the rings; /metrics adds its
    counters to the manager's, both write the one access log, USR1 reaches the shard, and a
    shard that dies brings a fresh manager and shards (the master restarts the manager)."""
    p = proxies(tmp_path, origin.address, workers=2, admin=True,
                server_extra="collectors = 2")
    manager = p.manager_pid()
    shard = wait_for(lambda: [c for c in children_of(manager) if comm(c) == "fp-collector-1"],
                     timeout=10, what="the shard process")[0]
    sent = sorted(spread_requests(p.port, "c", per_conn=10))
    lines = wait_for(lambda: (ls := read_lines(p.access_log)) and len(ls) >= len(sent) and ls,
                     timeout=5, what="the access log lines")
    assert sorted(ln["request_id"] for ln in lines) == sent
    assert len({ln["worker"] for ln in lines}) == 2  # both workers, so both collectors, served
    text = admin_get(p, "/metrics")[2].decode()
    assert metric(text, "forkproxy_requests", "forkproxy_requests_total") == len(sent)
    d = "forkproxy_request_duration_seconds"
    assert metric(text, d, d + "_count") == len(sent)
    lines_total = "forkproxy_access_log_lines"
    assert metric(text, lines_total, lines_total + "_total") == len(sent)
    gauges = "forkproxy_worker_client_connections"
    wait_for(lambda: len([s for f in text_string_to_metric_families(
        admin_get(p, "/metrics")[2].decode()) if f.name == gauges for s in f.samples]) == 2,
        timeout=5, what="both workers' gauges")
    assert json.loads(admin_get(p, "/status")[2])["collectors"] == 2

    os.rename(p.access_log, p.access_log + ".1")
    p.send(signal.SIGUSR1)
    wait_for(lambda: os.path.exists(p.access_log), timeout=5, what="the reopened access log")
    after = spread_requests(p.port, "after")
    wait_for(lambda: len(read_lines(p.access_log)) == len(after), timeout=5, what="new lines")
    assert sorted(ln["request_id"] for ln in read_lines(p.access_log)) == sorted(after)

    new_log = os.path.join(str(tmp_path), "access2.log")  # HUP: the shard follows too
    p.write_config(p.config_text().replace(p.access_log, new_log))
    p.send(signal.SIGHUP)
    wait_for(lambda: any(e.get("event") == "reload complete" for e in p.log_events()),
             timeout=15, what="the reload to complete")
    wait_for(lambda: len(p.workers_pids()) == 2, timeout=15, what="the old workers gone")
    moved = spread_requests(p.port, "moved")
    wait_for(lambda: len(read_lines(new_log)) == len(moved), timeout=5, what="new log lines")
    assert sorted(ln["request_id"] for ln in read_lines(new_log)) == sorted(moved)
    assert len({ln["worker"] for ln in read_lines(new_log)}) == 2
    p.access_log = new_log

    os.kill(shard, signal.SIGKILL)
    wait_for(lambda: not alive(manager) and p.manager_pid() not in (None, manager),
             timeout=20, what="a new manager")
    new_manager = p.manager_pid()
    wait_for(lambda: [c for c in children_of(new_manager) if comm(c) == "fp-collector-1"],
             timeout=10, what="a new shard")
    more = keepalive_requests(p.port, ["/tiny"] * 5, "more")
    wait_for(lambda: set(more) <= {ln["request_id"] for ln in read_lines(p.access_log)},
             timeout=5, what="lines after the restart")
    p.stop(signal.SIGQUIT)
    assert not alive(new_manager)
