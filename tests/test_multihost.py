"""Issue 9: two forkproxy hosts behind an L4 balancer share TLS session tickets through a
ticket_key_file. Real network namespaces created with pyroute2 (hosts A and B, a client
namespace joined to each by a veth pair); a session from host A resumes on host B."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid

import pytest
from conftest import needs_root
from fp import ROOT, wait_for
from tlsutil import Pki

pytestmark = needs_root("network namespaces")

# 198.18.0.0/15 (benchmarking range) inside namespaces this test creates and removes
HOSTS = {"a": ("198.18.1.1", "198.18.1.2"), "b": ("198.18.2.1", "198.18.2.2")}


def in_netns(name: str):
    def enter():
        from pyroute2 import netns

        netns.setns(name)
    return enter


@pytest.fixture
def namespaces():
    from pyroute2 import IPRoute, netns

    tag = uuid.uuid4().hex[:6]
    names = {"client": f"fpc{tag}", "a": f"fpa{tag}", "b": f"fpb{tag}"}
    for n in names.values():
        netns.create(n)
    try:
        for host, (client_ip, host_ip) in HOSTS.items():
            c_if, h_if = f"c{host}{tag}", f"h{host}{tag}"
            with IPRoute(netns=names["client"]) as ipr:
                ipr.link("add", ifname=c_if, kind="veth",
                         peer={"ifname": h_if, "net_ns_fd": names[host]})
                idx = ipr.link_lookup(ifname=c_if)[0]
                ipr.addr("add", index=idx, address=client_ip, prefixlen=24)
                ipr.link("set", index=idx, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            with IPRoute(netns=names[host]) as ipr:
                idx = ipr.link_lookup(ifname=h_if)[0]
                ipr.addr("add", index=idx, address=host_ip, prefixlen=24)
                ipr.link("set", index=idx, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        yield names
    finally:
        for n in names.values():
            try:
                netns.remove(n)  # also removes the veth pairs
            except OSError:
                pass


def test_session_from_host_a_resumes_on_host_b(tmp_path, namespaces):
    from forkproxy.shm.keystore import generate_key

    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    pki = Pki.create(pki_dir)
    pki.issue_leaves("http://127.0.0.1:9/")  # no responder: stapling degrades silently
    leaf = pki.leaves["ec"]
    keyfile = tmp_path / "ticket.keys"
    keyfile.write_bytes(generate_key())
    os.chmod(keyfile, 0o600)
    procs = []
    try:
        for host in ("a", "b"):
            d = tmp_path / host
            d.mkdir()
            (d / "forkproxy.toml").write_text(textwrap.dedent(f"""\
                [server]
                workers = 1
                pidfile = "{d}/forkproxy.pid"
                [log]
                error_log = "{d}/error.log"
                access_log = "off"
                [admin]
                listen = ""
                [[listener]]
                listen = "{HOSTS[host][1]}:8443"
                upstream = "app"
                [listener.tls]
                certificates = [{{ cert = "{leaf.cert_path}", key = "{leaf.key_path}" }}]
                ticket_key_file = "{keyfile}"
                [upstream.app]
                servers = [{{ address = "127.0.0.1:9000" }}]
                """))
            ns = namespaces[host]
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "forkproxy", "origin", "--listen", "127.0.0.1:9000"],
                cwd=ROOT, preexec_fn=in_netns(ns), stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "forkproxy", "run", "-c", str(d / "forkproxy.toml")],
                cwd=ROOT, preexec_fn=in_netns(ns), stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
            log = d / "error.log"
            wait_for(lambda log=log: log.exists() and "workers ready" in log.read_text(),
                     timeout=20, what=f"forkproxy on host {host}")

        def s_client(host: str, *args: str) -> str:
            cmd = ["openssl", "s_client", "-connect", f"{HOSTS[host][1]}:8443", "-CAfile",
                   str(pki.ca_path), "-servername", "localhost", "-tls1_2", "-ign_eof", *args]
            r = subprocess.run(cmd, input=b"GET /tiny HTTP/1.1\r\nHost: localhost\r\n"
                               b"Connection: close\r\n\r\n", capture_output=True, timeout=20,
                               preexec_fn=in_netns(namespaces["client"]))
            return (r.stdout + r.stderr).decode("latin-1")

        sess = tmp_path / "sess.pem"
        first = s_client("a", "-sess_out", str(sess))
        assert "New," in first and "HTTP/1.1 200" in first, first[-2000:]
        resumed = s_client("b", "-sess_in", str(sess))
        assert "Reused," in resumed and "HTTP/1.1 200" in resumed, resumed[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
