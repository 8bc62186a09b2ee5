"""Issue 8: abuse and faults through real masters and workers.

Slow clients (whole-head deadline, body and send timeouts, a 5,000-connection
slowloris), limits (per-IP connections, request rate across 2 workers, rejection
metrics), faults (an exception inside a request, EMFILE, workers SIGKILLed at any
moment, the manager dying), and the admin/key/shared-memory permissions.
"""

from __future__ import annotations

import os
import random
import resource
import selectors
import signal
import socket
import stat
import subprocess
import threading
import time
import urllib.request

import pytest
from fp import PY, ROOT, alive, connect, free_port, is_closed, recv_response, request, wait_for
from hostile import RecordingOrigin, cpu_seconds, fd_count, read_all, statuses


@pytest.fixture
def rec():
    o = RecordingOrigin()
    yield o
    o.stop()


def metric(p, name: str, **labels) -> float:
    """A sample from the proxy's /metrics (0 if absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if want else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- slow clients -------------------------------------------------------------------------


def test_header_timeout_is_a_deadline_for_the_whole_head(tmp_path, rec, proxies):
    p = proxies(tmp_path, rec.address, server_extra='client_header_timeout = "1s"')
    t0 = time.monotonic()
    trickle_for = 15.0  # a deadline per line (not for the head) would never fire meanwhile
    with connect(p.port) as c:  # trickling a line every 200 ms does not extend it
        c.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
        got = b""
        c.settimeout(0.2)
        i = 0
        while not got and time.monotonic() - t0 < trickle_for:
            try:
                c.sendall(b"X-%d: y\r\n" % i)
                got += c.sock.recv(4096)
            except TimeoutError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                break
            i += 1
        waited = time.monotonic() - t0
        rest, closed = read_all(c.sock, timeout=30)
    assert statuses(got + rest) == [408] and closed
    # not before the deadline, and while the client was still trickling
    assert 0.9 < waited < trickle_for, waited
    with connect(p.port) as c:  # a connection that sends nothing is closed silently
        t0 = time.monotonic()
        got, closed = read_all(c.sock, timeout=30)
        assert got == b"" and closed and time.monotonic() - t0 > 0.9
    # keep-alive idle time is keepalive_timeout, not the header deadline
    with connect(p.port) as c:
        c.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert recv_response(c)[0] == 200
        time.sleep(1.3)
        c.sendall(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert recv_response(c)[0] == 200
    assert [s.path for s in rec.seen] == ["/a", "/b"]
    p.stop()


def test_body_and_send_timeouts(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address,
                server_extra='client_body_timeout = "1s"\nsend_timeout = "1s"')
    worker = p.workers_pids()[0]
    base = fd_count(worker)
    with connect(p.port) as c:
        c.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        t0 = time.monotonic()
        got, closed = read_all(c.sock, timeout=30)
    assert statuses(got) == [408] and closed and time.monotonic() - t0 > 0.9  # not before
    # a client that stops reading a big response is dropped after send_timeout (what
    # the kernel had buffered still drains to it: watch the worker's descriptors instead)
    # the 408 connection (and its upstream socket) may still be lingering: wait for them
    wait_for(lambda: fd_count(worker) <= base, what="the first connection's sockets closed")
    with connect(p.port) as c:
        c.sendall(b"GET /bytes/200000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: fd_count(worker) >= base + 2, what="client and upstream sockets")
        t0 = time.monotonic()
        wait_for(lambda: fd_count(worker) <= base, timeout=60, interval=0.05,
                 what="both sockets closed after send_timeout")
        assert time.monotonic() - t0 > 0.8  # not before send_timeout
    p.stop()


def test_slowloris_5000_connections_do_not_stop_normal_clients(tmp_path, rec, proxies):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 16384
    if hard < want:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {want}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by the proxy
    socks: list[socket.socket] = []
    stop = threading.Event()
    try:
        p = proxies(tmp_path, rec.address, workers=2,
                    server_extra='client_header_timeout = "120s"')
        workers = p.workers_pids()
        for _ in range(5000):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", p.port))
            socks.append(s)
        _wait_connected(socks)
        for s in socks:
            try:
                s.send(b"GET /loris HTTP/1.1\r\nHost: x\r\n")
            except OSError:
                pass

        def trickle():
            i = 0
            while not stop.is_set():
                for s in socks:
                    try:
                        s.send(b"X-%d: y\r\n" % i)
                    except OSError:
                        pass
                    if stop.is_set():
                        return
                i += 1
                stop.wait(0.5)

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        wait_for(lambda: sum(fd_count(w) for w in workers) > 5000, timeout=15,
                 what="5,000 slow connections held by the workers")
        latencies = []
        for i in range(40):
            t0 = time.monotonic()
            status, _, body = request(p.port, "GET", f"/normal/{i}")
            latencies.append(time.monotonic() - t0)
            assert status == 200 and body == f"GET /normal/{i} 0".encode()
        latencies.sort()
        # served, not queued behind the slow heads: a blocked worker would answer only when
        # their 120 s header deadline ran out (exact latencies depend on the machine's load)
        assert latencies[-1] < 20.0, latencies
        print(f"\nslowloris: median {latencies[len(latencies) // 2] * 1000:.1f} ms, "
              f"max {latencies[-1] * 1000:.1f} ms")
        assert sum(fd_count(w) for w in workers) > 5000  # still all held
        assert [s.path for s in rec.seen] == [f"/normal/{i}" for i in range(40)]
        assert p.workers_pids() == workers
        stop.set()
        t.join(5)
        for s in socks:
            s.close()
        socks.clear()
        p.stop()
    finally:
        stop.set()
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _wait_connected(socks: list[socket.socket], timeout: float = 60.0) -> None:
    """Until every non-blocking connect() has completed (the socket is writable)."""
    pending = set(socks)
    sel = selectors.DefaultSelector()
    for s in pending:
        sel.register(s, selectors.EVENT_WRITE)
    deadline = time.monotonic() + timeout
    try:
        while pending:
            left = deadline - time.monotonic()
            assert left > 0, f"{len(pending)} connections still connecting"
            for key, _ in sel.select(min(left, 1.0)):
                pending.discard(key.fileobj)
                sel.unregister(key.fileobj)
    finally:
        sel.close()


# -- limits -------------------------------------------------------------------------------


def test_per_ip_connection_limit_across_workers(tmp_path, rec, proxies):
    p = proxies(tmp_path, rec.address, workers=2, admin=True,
                extra="[limits]\nper_ip_connections = 4\n")
    workers = p.workers_pids()
    base = sum(fd_count(w) for w in workers)
    held = [connect(p.port) for _ in range(4)]
    try:
        for c in held:
            c.sendall(b"GET /held HTTP/1.1\r\nHost: x\r\n")  # a head in progress
        wait_for(lambda: sum(fd_count(w) for w in workers) >= base + 4, timeout=30,
                 what="the 4 held connections accepted")
        for _ in range(6):  # whichever worker takes it, the 5th connection is refused
            with connect(p.port) as c:
                c.sendall(b"GET /refused HTTP/1.1\r\nHost: x\r\n\r\n")
                got, closed = read_all(c.sock)
            assert statuses(got) == [429] and closed
        held.pop().close()
        held.pop().close()
        wait_for(lambda: sum(fd_count(w) for w in workers) <= base + 2, timeout=30,
                 what="the 2 closed connections released")
        assert request(p.port, "GET", "/after")[0] == 200
        for c in held:  # the held ones still work
            c.sendall(b"\r\n")
            assert recv_response(c)[0] == 200
        assert [s.path for s in rec.seen].count("/refused") == 0
        wait_for(lambda: metric(p, "forkproxy_rejected_total", reason="conn_limit") == 6,
                 timeout=5, what="conn_limit rejections counted")
    finally:
        for c in held:
            c.close()
    p.stop()


def test_rate_limit_accuracy_across_two_workers(tmp_path, rec, proxies):
    rate, burst, duration = 40, 10, 2.5
    p = proxies(tmp_path, rec.address, workers=2, admin=True,
                extra=f'[limits]\nrate = "{rate}r/s"\nburst = {burst}\n')
    counts = {200: 0, 429: 0}
    lock = threading.Lock()
    t_first = []
    stop_at = time.monotonic() + duration + 0.1

    def client():
        with connect(p.port) as c:
            while time.monotonic() < stop_at:
                c.sendall(b"GET /r HTTP/1.1\r\nHost: x\r\n\r\n")
                status = recv_response(c)[0]
                with lock:
                    if not t_first:
                        t_first.append(time.monotonic())
                    counts[status] += 1
                time.sleep(0.004)  # ~4,000 requests/s offered: 100x the rate, no ring drops

    # 16 connections: SO_REUSEPORT spreads them over both workers (all on one: 2**-15)
    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t_first[0]
    expected = burst + 1 + rate * elapsed  # the most one shared bucket admits in that time
    assert counts[429] > 3 * counts[200], counts  # the clients really were over the rate
    # one shared bucket: one per worker would admit about twice as much. The shared table
    # is lossy in the client's favour (forkproxy/shm/limitzone.py: a worker preempted
    # between loading and storing a bucket undoes the other's admissions), more so on a
    # loaded machine; fewer only if a loaded machine kept the clients from asking enough
    assert 0.5 * expected <= counts[200] <= 1.3 * expected + 2, (counts, expected)
    # both workers admitted requests: one shared bucket, not one per worker
    prefixes = {s.header("x-request-id")[0][:8] for s in rec.seen}
    assert len(prefixes) == 2, prefixes
    dropped = metric(p, "forkproxy_ring_dropped_total")
    wait_for(lambda: metric(p, "forkproxy_rejected_total", reason="rate_limited")
             == counts[429] - dropped, timeout=5, what="rate_limited rejections counted")
    assert metric(p, "forkproxy_requests_total", listener=f"127.0.0.1:{p.port}",
                  upstream="", code="429") == counts[429]
    p.stop()


def test_rejections_are_counted_by_reason(tmp_path, rec, proxies):
    p = proxies(tmp_path, rec.address, admin=True,
                server_extra='max_body_size = "1k"\nclient_header_timeout = "500ms"')
    cases = {
        "framing": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        "bad_request": b"GET / HTTP/1.1\r\nHost: x\r\nX: \x01\r\n\r\n",
        "headers_too_large": b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
        "uri_too_long": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "body_too_large": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"100\r\n" + b"b" * 256 + b"\r\n") * 5,
        "header_timeout": b"GET / HTTP/1.1\r\nHost: x\r\n",
        "host": b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    }
    for raw in cases.values():
        with connect(p.port) as c:
            c.sendall(raw)
            read_all(c.sock)
    for reason in cases:
        wait_for(lambda r=reason: metric(p, "forkproxy_rejected_total", reason=r) == 1,
                 timeout=5, what=f"rejected_total{{reason={reason}}}")
    p.stop()


def test_rejected_request_is_logged_as_itself(tmp_path, rec, proxies):
    """The access log line of a refused request after a served one on the same
    connection has its own request id and the target that was asked for."""
    import json

    p = proxies(tmp_path, rec.address)
    with connect(p.port) as c:
        c.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /second HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n")
        got, closed = read_all(c.sock)
    assert statuses(got) == [200, 400] and closed

    def lines():
        try:
            with open(p.access_log) as f:
                return [json.loads(line) for line in f if line.strip()]
        except OSError:
            return []

    logged = wait_for(lambda: len(lines()) == 2 and lines(), timeout=5, what="2 log lines")
    assert [(e["path"], e["status"]) for e in logged] == [("/first", 200), ("/second", 400)]
    assert logged[0]["request_id"] != logged[1]["request_id"]
    p.stop()


# -- faults -------------------------------------------------------------------------------


def test_exception_in_a_request_is_logged_answered_500_and_the_worker_survives(
        tmp_path, rec, proxies, monkeypatch):
    monkeypatch.setenv("FORKPROXY_FAULT", "request")
    p = proxies(tmp_path, rec.address)
    workers = p.workers_pids()
    with connect(p.port) as c:  # a slow client on the same worker is not disturbed
        c.sendall(b"GET /sleep/300 HTTP/1.1\r\nHost: x\r\n\r\n")
        with connect(p.port) as f:
            f.sendall(b"GET /__fault__/x HTTP/1.1\r\nHost: x\r\nX-Request-Id: fault-1\r\n\r\n")
            got, closed = read_all(f.sock)
        assert statuses(got) == [500] and closed
        assert recv_response(c)[0] == 200
    with connect(p.port) as f:  # response already started: no 500 after it, just close
        f.sendall(b"GET /__fault__/after-head HTTP/1.1\r\nHost: x\r\n\r\n")
        got, closed = read_all(f.sock)
    assert got.endswith(b"partial") and b"500" not in got and closed
    assert request(p.port, "GET", "/fine")[0] == 200
    assert p.workers_pids() == workers
    events = [e for e in p.log_events() if e.get("event") == "request failed"]
    assert [e["request_id"] for e in events][:1] == ["fault-1"]
    assert "RuntimeError: fault injected" in events[0]["exception"]
    p.stop()


def test_emfile_backs_off_instead_of_spinning(tmp_path, rec, proxies):
    p = proxies(tmp_path, rec.address, server_extra="worker_rlimit_nofile = 48")
    worker = p.workers_pids()[0]
    with open(f"/proc/{worker}/limits") as f:
        assert any(line.startswith("Max open files") and line.split()[3] == "48" for line in f)
    assert request(p.port, "GET", "/warm")[0] == 200
    free = 48 - fd_count(worker)
    held = [connect(p.port) for _ in range(free + 8)]  # more than the worker can accept
    try:
        for c in held:
            c.sendall(b"GET /held HTTP/1.1\r\nHost: x\r\n")
        wait_for(lambda: any(e.get("event") == "accept failed, backing off"
                             for e in p.log_events()), timeout=5, what="EMFILE back-off")
        t0, cpu0 = time.monotonic(), cpu_seconds(worker)
        time.sleep(2.0)  # a measurement window, not synchronisation
        assert cpu_seconds(worker) - cpu0 < 0.3  # not spinning on a readable listener
        backoffs = [e for e in p.log_events() if e.get("event") == "accept failed, backing off"]
        # the back-off doubles from 10 ms to 1 s: about 8 waits to reach 1 s, then one a
        # second (the window is longer than 2 s on a loaded machine)
        assert len(backoffs) <= 8 + (time.monotonic() - t0) + 2, len(backoffs)
        for c in held[:free]:
            c.close()
        for c in held[free:]:  # waiting in the backlog: accepted and served once fds free up
            c.sendall(b"Connection: close\r\n\r\n")
            assert recv_response(c)[0] == 200
            c.close()
        assert request(p.port, "GET", "/after")[0] == 200
        assert p.workers_pids() == [worker]
    finally:
        for c in held:
            c.close()
    p.stop()


def test_master_survives_workers_killed_at_any_moment(tmp_path, rec, proxies):
    p = proxies(tmp_path, rec.address, workers=2)
    stop = threading.Event()
    ok = [0]

    def load():
        while not stop.is_set():
            try:
                if request(p.port, "GET", "/load", timeout=2)[0] == 200:
                    ok[0] += 1
            except OSError:
                pass

    t = threading.Thread(target=load)
    t.start()
    rnd = random.Random(8)
    killed = set()
    try:
        deadline, give_up = time.monotonic() + 4, time.monotonic() + 60
        while time.monotonic() < deadline or (len(killed) < 8 and time.monotonic() < give_up):
            pids = p.workers_pids()
            if pids:
                victim = rnd.choice(pids)
                os.kill(victim, signal.SIGKILL)
                killed.add(victim)
            time.sleep(rnd.uniform(0.0, 0.4))
    finally:
        stop.set()
        t.join()
    assert p.proc.poll() is None, "the master died"
    wait_for(lambda: len(set(p.workers_pids()) - killed) == 2, timeout=20,
             what="two fresh workers")
    wait_for(lambda: request(p.port, "GET", "/after", timeout=2)[0] == 200, timeout=10,
             what="requests served again")
    assert ok[0] > 0 and len(killed) >= 8
    p.stop()


def test_manager_dying_loses_no_requests(tmp_path, rec, proxies):
    p = proxies(tmp_path, rec.address, admin=True)
    statuses_seen = []

    def load():
        with connect(p.port) as c:
            for i in range(400):
                c.sendall(b"GET /m/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
                statuses_seen.append(recv_response(c)[0])
                time.sleep(0.005)

    t = threading.Thread(target=load)
    t.start()
    managers = set()
    for _ in range(2):
        time.sleep(0.4)
        m = wait_for(p.manager_pid, what="a manager")
        managers.add(m)
        os.kill(m, signal.SIGKILL)
        wait_for(lambda m=m: p.manager_pid() not in (None, m), timeout=10, what="a new manager")
    t.join()
    assert statuses_seen == [200] * 400
    assert [s.path for s in rec.seen] == [f"/m/{i}" for i in range(400)]
    assert p.manager_pid() not in managers
    p.stop()


# -- admin, keys, shared memory -------------------------------------------------------------


def _check(conf_path) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "forkproxy", "check", "-c", str(conf_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def _self_signed(tmp_path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    crt, pem = tmp_path / "c.crt", tmp_path / "c.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    os.chmod(pem, 0o600)
    return crt, pem


def test_admin_loopback_by_default_and_token_required_elsewhere(tmp_path):
    from forkproxy import config

    cfg = config.loads('[[listener]]\nlisten = "127.0.0.1:1"\nupstream = "a"\n'
                       '[upstream.a]\nservers = [{ address = "127.0.0.1:2" }]\n')
    assert config.parse_listen(cfg.admin.listen).host == "127.0.0.1"
    base = (f'[[listener]]\nlisten = "127.0.0.1:{free_port()}"\nupstream = "a"\n'
            '[upstream.a]\nservers = [{ address = "127.0.0.1:2" }]\n')
    conf = tmp_path / "a.toml"
    for admin, ok in [('listen = "0.0.0.0:9999"', False), ('listen = "[::]:9999"', False),
                      ('listen = "0.0.0.0:9999"\ntoken = "s3cret"', True),
                      ('listen = "127.0.0.1:9999"', True), ('listen = "[::1]:9999"', True)]:
        conf.write_text(f"[admin]\n{admin}\n" + base)
        r = _check(conf)
        assert (r.returncode == 0) == ok, (admin, r.stdout, r.stderr)
        if not ok:
            assert "admin.token: required" in r.stdout + r.stderr


def test_ticket_key_file_must_be_0600(tmp_path):
    crt, key = _self_signed(tmp_path)
    tickets = tmp_path / "tickets.key"
    tickets.write_bytes(os.urandom(80))
    conf = tmp_path / "t.toml"
    conf.write_text(
        f'[server]\npidfile = "{tmp_path}/fp.pid"\n[admin]\nlisten = ""\n'
        f'[[listener]]\nlisten = "127.0.0.1:{free_port()}"\nupstream = "a"\n'
        f'[listener.tls]\ncertificates = [{{ cert = "{crt}", key = "{key}" }}]\n'
        f'ticket_key_file = "{tickets}"\nocsp_stapling = false\n'
        f'[upstream.a]\nservers = [{{ address = "127.0.0.1:2" }}]\n')
    for mode, ok in [(0o644, False), (0o640, False), (0o604, False), (0o600, True),
                     (0o400, True)]:
        os.chmod(tickets, mode)
        r = _check(conf)
        assert (r.returncode == 0) == ok, (oct(mode), r.stdout, r.stderr)
        if not ok:
            assert "ticket_key_file" in r.stdout and "chmod 600" in r.stdout
    os.chmod(tickets, 0o644)  # `run` refuses to start with it too
    r = subprocess.run([PY, "-m", "forkproxy", "run", "-c", str(conf)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "ticket_key_file" in r.stdout + r.stderr


def test_shared_memory_segments_are_0600(tmp_path, rec, proxies):
    p = proxies(tmp_path, rec.address, workers=2,
                extra='[limits]\nper_ip_connections = 100\nrate = "1000r/s"\n')
    assert request(p.port, "GET", "/x")[0] == 200
    checked = 0
    for pid in [p.proc.pid, *p.workers_pids()]:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].startswith("/dev/shm/"):
                    st = os.stat(f"/proc/{pid}/map_files/{parts[0]}")
                    assert stat.S_IMODE(st.st_mode) == 0o600, line
                    assert "forkproxy" in parts[5], line
                    checked += 1
    assert checked >= 3  # rings and the limits zone, in the master and the workers
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("forkproxy.")
                and n.split(".")[1] == str(p.proc.pid)], "segment names left linked"
    assert alive(p.proc.pid)
    p.stop()


def test_ticket_keys_in_memory_are_0600(tmp_path, rec, proxies):
    crt, key = _self_signed(tmp_path)
    p = proxies(tmp_path, rec.address,
                listener_extra=f'[listener.tls]\ncertificates = [{{ cert = "{crt}", '
                               f'key = "{key}" }}]\nocsp_stapling = false\n')
    found = []
    for pid in [p.proc.pid, *p.workers_pids()]:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if "forkproxy-keystore" in target:
                found.append(stat.S_IMODE(os.stat(f"/proc/{pid}/fd/{fd}").st_mode))
    assert found and set(found) == {0o600}, found
    p.stop()


def test_max_connections_per_worker_waits_in_the_backlog(tmp_path, rec, proxies):
    p = proxies(tmp_path, rec.address, server_extra="max_connections = 3")
    base = fd_count(p.workers_pids()[0])
    held = [connect(p.port) for _ in range(3)]
    try:
        for c in held:
            c.sendall(b"GET /held HTTP/1.1\r\nHost: x\r\n")
        worker = p.workers_pids()[0]
        wait_for(lambda: fd_count(worker) >= base + 3, timeout=30,
                 what="the 3 held connections accepted")
        with connect(p.port) as extra:  # the kernel queues it; the worker does not accept
            extra.sendall(b"GET /extra HTTP/1.1\r\nHost: x\r\n\r\n")
            extra.settimeout(0.7)
            with pytest.raises(TimeoutError):
                extra.sock.recv(1)
            held.pop().close()
            extra.settimeout(5)
            assert recv_response(extra)[0] == 200
    finally:
        for c in held:
            c.close()
    p.stop()


def test_limits_config_is_validated(tmp_path):
    from forkproxy import config

    base = ('[[listener]]\nlisten = "127.0.0.1:1"\nupstream = "a"\n'
            '[upstream.a]\nservers = [{ address = "127.0.0.1:2" }]\n')
    for bad, key in [('rate = "fast"', "limits.rate"), ("zone_slots = 3000", "limits.zone_slots"),
                     ("per_ip_connections = -1", "limits.per_ip_connections"),
                     ("status = 200", "limits.status"), ("burst = -1", "limits.burst")]:
        with pytest.raises(config.ConfigError) as e:
            config.loads(f"[limits]\n{bad}\n" + base)
        assert key in str(e.value), (bad, str(e.value))
    cfg = config.loads('[limits]\nrate = "600r/m"\nburst = 5\n' + base)
    assert cfg.limits.rate == "600r/m" and cfg.limits.per_ip_connections == 0


def test_is_closed_helper_sanity(tmp_path, rec, proxies):
    """A bad request's connection is closed even when the client keeps sending."""
    p = proxies(tmp_path, rec.address)
    with connect(p.port) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n" + b"z" * 100000)
        status, headers, _, _ = recv_response(c)
        assert status == 400 and headers["connection"] == "close"
        assert is_closed(c, timeout=3)
    p.stop()
