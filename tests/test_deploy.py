"""Deployment: systemd units, logrotate and sysctl files, scripts/install for real (temp
prefix, temp system user) with the installed forkproxy started without systemd, a
request through it, log rotation, quit and uninstall leaving nothing; the Vagrantfile;
the ticket key tool."""

from __future__ import annotations

import grp
import http.client
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from conftest import needs_root, needs_tools
from fp import free_port, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORKPROXY = os.path.join(os.path.dirname(sys.executable), "forkproxy")
INSTALL = os.path.join(ROOT, "scripts", "install")
KEYS = os.path.join(ROOT, "scripts", "keys")


def run(cmd, timeout=120, check=True, input_bytes: bytes | None = None, **kw):
    if input_bytes is not None:  # binary stdin; output decoded afterwards
        p = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input_bytes, **kw)
        p.stdout, p.stderr = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    else:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} -> {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def rewrite_unit(text: str, prefix: str, etc: str = "/etc/forkproxy",
                 log_dir: str = "/var/log/forkproxy") -> str:
    return (text.replace("/opt/forkproxy", prefix).replace("/etc/forkproxy", etc)
            .replace("/var/log/forkproxy", log_dir))


def unit_settings(path: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", "[")) and "=" in line:
                k, v = line.split("=", 1)
                out.setdefault(k, []).append(v)
    return out


# -- static files ----------------------------------------------------------------------


def test_example_config_checks_ok():
    p = run([FORKPROXY, "check", "-c", os.path.join(ROOT, "etc", "forkproxy.toml")])
    lines = p.stdout.splitlines()
    assert lines[-1] == "ok" and not [ln for ln in lines if ln.startswith(("error", "warning"))]


def test_unit_settings():
    s = unit_settings(os.path.join(ROOT, "etc", "forkproxy.service"))
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["all"]
    assert s["ExecStart"] == ["/opt/forkproxy/venv/bin/forkproxy run -c /etc/forkproxy/forkproxy.toml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["KillSignal"] == ["SIGQUIT"] and s["KillMode"] == ["mixed"]
    assert s["Restart"] == ["on-failure"] and s["RuntimeDirectory"] == ["forkproxy"]
    caps = set(s["CapabilityBoundingSet"][0].split())
    assert {"CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID", "CAP_KILL"} == caps
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert s[key] == ["yes"]
    assert s["ProtectSystem"] == ["strict"]
    assert "/var/log/forkproxy" in s["ReadWritePaths"][0]
    assert int(s["LimitNOFILE"][0]) >= 65536
    # a stop must outlast the default graceful_timeout (30s)
    assert int(s["TimeoutStopSec"][0].rstrip("s")) > 30


@needs_tools("systemd-analyze")
def test_units_pass_systemd_analyze_verify(tmp_path):
    prefix = os.path.dirname(os.path.dirname(os.path.dirname(FORKPROXY)))  # .venv/bin/forkproxy
    names = ["forkproxy.service", "forkproxy-origin.service"]
    for name in names:
        with open(os.path.join(ROOT, "etc", name)) as f:
            text = f.read().replace("/opt/forkproxy/venv", os.path.dirname(os.path.dirname(FORKPROXY)))
        (tmp_path / name).write_text(rewrite_unit(text, prefix))
    p = run(["systemd-analyze", "verify", *names], cwd=tmp_path, check=False)
    ours = [line for line in (p.stdout + p.stderr).splitlines() if "forkproxy" in line]
    assert p.returncode == 0 and not ours, p.stdout + p.stderr


@needs_tools("logrotate")
def test_logrotate_snippet_parses(tmp_path):
    with open(os.path.join(ROOT, "etc", "forkproxy.logrotate")) as f:
        text = rewrite_unit(f.read(), str(tmp_path / "opt"), log_dir=str(tmp_path / "log"))
    text = text.replace("create 0660 forkproxy root", "create 0660 root root")
    conf = tmp_path / "forkproxy.logrotate"
    conf.write_text(text)
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "access.log").write_text("x\n")
    p = run(["logrotate", "-d", "-s", str(tmp_path / "state"), str(conf)], check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "error" not in (p.stdout + p.stderr).lower(), p.stdout + p.stderr
    assert "forkproxy reopen -c" in text


def test_sysctl_file_names_existing_keys():
    path = os.path.join(ROOT, "etc", "sysctl.d", "forkproxy.conf")
    keys = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", ";")):
                k, v = (x.strip() for x in line.split("=", 1))
                keys[k] = v
    for k in ("net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog",
              "net.ipv4.ip_local_port_range", "net.ipv4.tcp_tw_reuse", "fs.file-max",
              "net.ipv4.tcp_migrate_req"):
        assert k in keys
    assert keys["net.ipv4.tcp_migrate_req"] == "1"
    for k in keys:
        assert os.path.exists("/proc/sys/" + k.replace(".", "/")), k
    if shutil.which("sysctl"):
        run(["sysctl", "--dry-run", "-p", path])


# -- scripts/keys ----------------------------------------------------------------------


def _keys(*args, check=True):
    return run([sys.executable, KEYS, *args], check=check)


def _records(path) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    return [data[i:i + 80] for i in range(0, len(data), 80)]


def test_keys_generate_add_promote_round_trip(tmp_path):
    from forkproxy.shm.keystore import load_ticket_key_file

    path = str(tmp_path / "tickets.key")
    _keys("generate", path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    (k0,) = _records(path)
    assert _keys("generate", path, check=False).returncode == 1  # never overwrites silently
    _keys("add", path)
    recs = _records(path)
    assert len(recs) == 2 and recs[0] == k0  # the new key is last: decrypt-only
    k1 = recs[1]
    assert "decrypt-only" in _keys("show", path).stdout.splitlines()[1]
    _keys("promote", path)
    assert _records(path) == [k1, k0]  # promoted to first = encryption key
    assert load_ticket_key_file(path) == [k1, k0]  # what forkproxy itself reads
    _keys("add", path)
    _keys("add", path)
    k2, k3 = _records(path)[2:]
    _keys("promote", path, "--keep", "3")
    assert _records(path) == [k3, k1, k0]  # oldest beyond 3 dropped (k2 never promoted)
    _keys("rotate", path, "--keep", "2")
    recs = _records(path)
    assert len(recs) == 2 and recs[1] == k3 and recs[0] not in (k0, k1, k2, k3)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p for p in os.listdir(tmp_path) if p != "tickets.key"] == []  # no temp files
    _keys("promote", path, "--keep", "1")
    assert len(_records(path)) == 1
    assert _keys("promote", path, check=False).returncode == 1  # nothing to promote


def test_keys_refuse_unsafe_or_broken_files(tmp_path):
    path = str(tmp_path / "tickets.key")
    _keys("generate", path)
    os.chmod(path, 0o640)
    p = _keys("add", path, check=False)
    assert p.returncode == 1 and "chmod 600" in p.stderr
    with open(path, "rb") as f:
        before = f.read()
    assert len(before) == 80  # untouched
    os.chmod(path, 0o600)
    with open(path, "ab") as f:
        f.write(b"x" * 10)
    p = _keys("show", path, check=False)
    assert p.returncode == 1 and "80-byte" in p.stderr
    with open(path, "wb") as f:
        f.write(before * 2)
    p = _keys("show", path, check=False)
    assert p.returncode == 1 and "share a name" in p.stderr


# -- Vagrantfile -----------------------------------------------------------------------


@needs_tools("vagrant")
@pytest.mark.parametrize("hosts", ["1", "2"])
def test_vagrant_validate(tmp_path, hosts):
    shutil.copy(os.path.join(ROOT, "Vagrantfile"), tmp_path / "Vagrantfile")
    env = dict(os.environ, HOSTS=hosts, VAGRANT_HOME=str(tmp_path / "vagrant.d"),
               VAGRANT_CHECKPOINT_DISABLE="1")
    p = run(["vagrant", "validate"], cwd=tmp_path, env=env, timeout=120, check=False)
    assert p.returncode == 0 and "validated successfully" in p.stdout, p.stdout + p.stderr
    # validate provisions nothing: no key material was made
    assert not (tmp_path / ".vagrant" / "forkproxy").exists()


def test_vagrant_provisioning_uses_only_install():
    with open(os.path.join(ROOT, "Vagrantfile")) as f:
        text = f.read()
    assert 'config.vm.box = "debian/bookworm64"' in text
    assert "/vagrant/scripts/install --enable --demo-origin" in text
    assert "/vagrant/etc/forkproxy-vagrant.toml" in text
    assert os.path.exists(os.path.join(ROOT, "etc", "forkproxy-vagrant.toml"))
    assert text.count('node.vm.provision "shell"') == 1


@needs_tools("ruby", "openssl")
def test_vagrant_shared_tls_material_passes_check(tmp_path):
    """The certificate and ticket key the Vagrantfile makes for both hosts are usable
    with the VM's config template."""
    shutil.copy(os.path.join(ROOT, "Vagrantfile"), tmp_path / "Vagrantfile")
    stub = ('module Vagrant; def self.configure(v); end; end; ARGV.replace(["up"]); '
            'load "Vagrantfile"; m = shared_tls_material; m2 = shared_tls_material; '
            'abort "not stable" unless m == m2; puts m.keys.sort.join(",")')
    p = run(["ruby", "-e", stub], cwd=tmp_path)
    assert p.stdout.strip() == "FP_TICKET_KEY,FP_TLS_CERT,FP_TLS_KEY"
    shared = tmp_path / ".vagrant" / "forkproxy"
    assert stat.S_IMODE(os.stat(shared / "tickets.key").st_mode) == 0o600
    assert os.path.getsize(shared / "tickets.key") == 80
    etc = tmp_path / "etc"
    (etc / "tls").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "etc", "forkproxy-vagrant.toml"), etc / "forkproxy.toml")
    shutil.copy(shared / "server.crt", etc / "tls" / "server.crt")
    shutil.copy(shared / "server.key", etc / "tls" / "server.key")
    shutil.copy(shared / "tickets.key", etc / "tickets.key")
    os.chmod(etc / "tickets.key", 0o600)
    p = run([FORKPROXY, "check", "-c", str(etc / "forkproxy.toml")], check=False)
    lines = p.stdout.splitlines()
    assert p.returncode == 0 and lines[-1] == "ok", p.stdout + p.stderr
    assert not [ln for ln in lines if ln.startswith(("error", "warning"))], p.stdout


# -- scripts/install for real ----------------------------------------------------------


def _pids_of_user(uid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    out.append(int(entry))
            except OSError:
                pass
    return out


def _uids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]
    return []


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _http_get(port: int, path: str = "/") -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def _https_get(port: int, ctx: ssl.SSLContext, session=None):
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    s = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
    try:
        s.sendall(b"GET /tiny HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data, s.session, s.session_reused
    finally:
        s.close()


@needs_root("scripts/install adds a user")
@needs_tools("openssl")
@pytest.mark.timeout(240)
def test_install_start_request_quit_uninstall():
    user = "fptest" + secrets.token_hex(4)
    base = tempfile.mkdtemp(prefix="fpdeploy.")
    os.chmod(base, 0o755)  # the workers' user must reach the config and logs below
    prefix, etc, logs = f"{base}/opt/forkproxy", f"{base}/etc/forkproxy", f"{base}/log"
    sysd, lr, sc = f"{base}/systemd", f"{base}/logrotate.d", f"{base}/sysctl.d"
    mine = f"{base}/test"  # what this test itself makes (cert, key file, run config)
    os.makedirs(mine)
    os.chmod(mine, 0o755)
    opts = ["--prefix", prefix, "--etc", etc, "--user", user, "--log-dir", logs,
            "--systemd-dir", sysd, "--logrotate-dir", lr, "--sysctl-dir", sc]
    origin = None
    master = None
    try:
        # TLS material an operator would bring: certificate, key, shared ticket key file
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", f"{mine}/server.key",
             "-out", f"{mine}/server.crt"])
        _keys("generate", f"{mine}/tickets.key")
        with open(f"{mine}/tickets.key", "rb") as f:
            ticket_key = f.read()
        t0 = time.monotonic()
        p = run(["bash", INSTALL, *opts, "--demo-origin",
                 "--config-template", os.path.join(ROOT, "etc", "forkproxy-vagrant.toml"),
                 "--tls-cert", f"{mine}/server.crt", "--tls-key", f"{mine}/server.key",
                 "--ticket-key", "-"], timeout=300, input_bytes=ticket_key)
        first_install = time.monotonic() - t0
        assert "created user " + user in p.stdout
        manifest = f"{prefix}/.install-manifest"
        with open(manifest) as f:
            manifest_text = f.read()

        # what it made, and how
        pw = pwd.getpwnam(user)
        assert pw.pw_shell.endswith("nologin") and pw.pw_uid < 1000
        assert grp.getgrgid(pw.pw_gid).gr_name == user
        st = os.stat(logs)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (pw.pw_uid, 0, 0o770)
        st = os.stat(f"{etc}/forkproxy.toml")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, pw.pw_gid, 0o640)
        assert stat.S_IMODE(os.stat(f"{etc}/tickets.key").st_mode) == 0o600
        with open(f"{etc}/tickets.key", "rb") as f:
            assert f.read() == ticket_key
        assert stat.S_IMODE(os.stat(f"{etc}/tls/server.key").st_mode) == 0o600
        assert os.stat(f"{etc}/tls").st_gid == pw.pw_gid  # certificates readable by the user
        with open(f"{etc}/forkproxy.toml") as f:
            conf_text = f.read()
        assert f'user = "{user}"' in conf_text and f'error_log = "{logs}/error.log"' in conf_text
        with open(f"{sysd}/forkproxy.service") as f:
            unit = f.read()
        assert f"ExecStart={prefix}/venv/bin/forkproxy run -c {etc}/forkproxy.toml" in unit
        assert f"ReadWritePaths={logs}" in unit and "=/opt/forkproxy" not in unit
        assert os.path.exists(f"{sysd}/forkproxy-origin.service")
        with open(f"{lr}/forkproxy") as f:
            assert f"create 0660 {user} root" in f.read()
        assert os.path.exists(f"{sc}/90-forkproxy.conf")
        assert os.access(f"{prefix}/bin/forkproxy-keys", os.X_OK)
        if shutil.which("systemd-analyze"):  # the installed units, with real paths
            p = run(["systemd-analyze", "verify", f"{sysd}/forkproxy.service",
                     f"{sysd}/forkproxy-origin.service"], check=False)
            assert p.returncode == 0, p.stdout + p.stderr

        # idempotent: a second run changes nothing it should not
        p = run(["bash", INSTALL, *opts, "--demo-origin"], timeout=300)
        assert "keeping the existing" in p.stdout and "created user" not in p.stdout
        with open(manifest) as f:
            assert f.read() == manifest_text
        with open(f"{etc}/forkproxy.toml") as f:
            assert f.read() == conf_text

        # run the installed forkproxy (no systemd) in front of the installed origin
        venv_bin = f"{prefix}/venv/bin"
        port, tls_port, admin_port, origin_port = (free_port() for _ in range(4))
        origin = subprocess.Popen([f"{venv_bin}/forkproxy", "origin", "--listen",
                                   f"127.0.0.1:{origin_port}"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        wait_for(lambda: _port_open(origin_port), what="origin")
        pidfile = f"{mine}/run/forkproxy.pid"
        cfg = f"{mine}/run.toml"
        with open(cfg, "w") as f:
            f.write(textwrap.dedent(f"""\
                [server]
                workers = 2
                pidfile = "{pidfile}"
                user = "{user}"
                group = "{user}"
                graceful_timeout = "5s"
                [log]
                error_log = "{logs}/error.log"
                access_log = "{logs}/access.log"
                [admin]
                listen = "127.0.0.1:{admin_port}"
                [[listener]]
                listen = "127.0.0.1:{port}"
                upstream = "app"
                [[listener]]
                listen = "127.0.0.1:{tls_port}"
                upstream = "app"
                [listener.tls]
                certificates = [{{ cert = "{etc}/tls/server.crt", key = "{etc}/tls/server.key" }}]
                ticket_key_file = "{etc}/tickets.key"
                ocsp_stapling = false
                [upstream.app]
                servers = [{{ address = "127.0.0.1:{origin_port}" }}]
                """))
        p = run([f"{venv_bin}/forkproxy", "start", "-c", cfg], timeout=60, check=False)
        if os.path.exists(pidfile):
            with open(pidfile) as f:
                master = int(f.read())
        with open(f"{logs}/error.log") as f:
            assert p.returncode == 0, p.stdout + p.stderr + f.read()
        status, body = _http_get(port, "/")
        assert status == 200 and b"demo origin" in body
        # every child of the root master runs as the user, real/effective/saved (the
        # helper switches right after it has bound the admin socket)
        assert _uids(master)[:3] == [0, 0, 0]
        assert len(_children(master)) >= 3  # 2 workers + the helper
        wait_for(lambda: all(_uids(k)[:3] == [pw.pw_uid] * 3 for k in _children(master)),
                 timeout=10, what="children running as the user")
        status, body = _http_get(admin_port, "/status")
        info = json.loads(body)
        assert status == 200 and info["master_pid"] == master and len(info["workers"]) == 2
        # HTTPS with the installed certificate and ticket key file; a session resumes
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        data, session, reused = _https_get(tls_port, ctx)
        assert data.startswith(b"HTTP/1.1 200") and not reused
        data, _, reused = _https_get(tls_port, ctx, session)
        assert data.startswith(b"HTTP/1.1 200") and reused

        # logrotate's way: move the logs, create new ones as its snippet says, reopen
        os.rename(f"{logs}/access.log", f"{logs}/access.log.1")
        os.rename(f"{logs}/error.log", f"{logs}/error.log.1")
        for name in ("access.log", "error.log"):
            fd = os.open(f"{logs}/{name}", os.O_CREAT | os.O_WRONLY, 0o660)
            os.fchown(fd, pw.pw_uid, 0)
            os.fchmod(fd, 0o660)
            os.close(fd)
        run([f"{venv_bin}/forkproxy", "reopen", "-c", cfg])
        # until the reopen has happened, lines still go to access.log.1
        wait_for(lambda: _http_get(port, "/tiny")[0] == 200
                 and os.path.getsize(f"{logs}/access.log") > 0, timeout=60, interval=0.2,
                 what="access log written after reopen")
        with open(f"{logs}/access.log") as f:
            assert json.loads(f.readline())["path"] == "/tiny"

        # uninstall refuses while the user's processes run, and changes nothing
        p = run(["bash", INSTALL, "--uninstall", "--prefix", prefix], check=False)
        assert p.returncode != 0 and "still running" in p.stderr, p.stdout + p.stderr
        assert os.path.exists(manifest) and pwd.getpwnam(user)

        run([f"{venv_bin}/forkproxy", "quit", "-c", cfg])
        wait_for(lambda: not _alive(master), timeout=20, what="master exit")
        master = None
        assert not os.path.exists(pidfile)
        wait_for(lambda: not _pids_of_user(pw.pw_uid), timeout=10, what="workers gone")
        origin.terminate()
        origin.wait(10)
        origin = None

        # uninstall: nothing of the install is left
        p = run(["bash", INSTALL, "--uninstall", "--prefix", prefix])
        assert "uninstalled" in p.stdout and "keeping" not in p.stdout, p.stdout
        with pytest.raises(KeyError):
            pwd.getpwnam(user)
        with pytest.raises(KeyError):
            grp.getgrnam(user)
        left = sorted(os.path.relpath(os.path.join(d, n), base)
                      for d, dirs, files in os.walk(base) for n in dirs + files)
        assert [x for x in left if not x.startswith("test")] == [], left
        print(f"first install {first_install:.1f}s")
    finally:
        if master and _alive(master):
            os.kill(master, signal.SIGKILL)
        try:
            uid = pwd.getpwnam(user).pw_uid
        except KeyError:
            uid = None
        if uid is not None:
            for pid in _pids_of_user(uid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if origin is not None:
            origin.kill()
            origin.wait()
        if os.path.exists(f"{prefix}/.install-manifest"):
            subprocess.run(["bash", INSTALL, "--uninstall", "--purge", "--prefix", prefix],
                           capture_output=True, timeout=60)
        if uid is not None:
            subprocess.run(["userdel", user], capture_output=True)
        try:
            grp.getgrnam(user)
            subprocess.run(["groupdel", user], capture_output=True)
        except KeyError:
            pass
        shutil.rmtree(base, ignore_errors=True)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
