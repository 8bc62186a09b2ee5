"""Issue 5 end to end: TLS through real forkproxy masters and workers, real openssl
(s_client, ocsp responder), a test CA with an AIA OCSP URL on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest
from fp import PY, ROOT, alive, children_of, wait_for
from tlsutil import Pki, Responder, last_ticket_key_name, ticket_key_name

GET = b"GET /headers HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def tls_get(port: int, ca, *, proto=None, sess_in=None, sess_out=None, servername="localhost",
            status=False, extra=()) -> dict:
    """One HTTPS request with s_client: resumption, worker (request id prefix), staple."""
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca),
           "-servername", servername, "-ign_eof"]
    if proto:
        cmd.append(f"-{proto}")
    if sess_in:
        cmd += ["-sess_in", str(sess_in)]
    if sess_out:
        cmd += ["-sess_out", str(sess_out)]
    if status:
        cmd.append("-status")
    cmd += list(extra)
    p = subprocess.run(cmd, input=GET, capture_output=True, timeout=20)
    out = (p.stdout + p.stderr).decode("latin-1")
    body = out[out.find('{"method"'):]
    rid = ""
    if body.startswith("{"):
        obj, _ = json.JSONDecoder().raw_decode(body)
        hdrs = {k.lower(): v for k, v in obj["headers"]}
        rid = hdrs.get("x-request-id", "")
    return {
        "out": out,
        "reused": bool(re.search(r"^Reused,", out, re.M)),
        "new": bool(re.search(r"^New,", out, re.M)),
        "worker": rid[:8],
        "ok": "HTTP/1.1 200" in out,
        "stapled_good": "OCSP Response Status: successful" in out and "Cert Status: good" in out,
        "no_staple": "OCSP response: no response sent" in out,
        "subject": (re.search(r"^subject=(.*)$", out, re.M) or [None, ""])[1],
    }


@pytest.fixture
def pki(tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    pki = Pki.create(d)
    responder = Responder(pki)
    pki.issue_leaves(responder.url)
    pki.responder = responder
    yield pki
    if pki.responder is not None:
        pki.responder.stop()


def tls_proxy(proxies, tmp_path, origin, pki, *, workers=2, leaves=("ec", "rsa", "a"),
              tls_extra="", start=True):
    certs = ", ".join(f'{{ cert = "{pki.leaves[n].cert_path}", key = "{pki.leaves[n].key_path}" }}'
                      for n in leaves)
    return proxies(tmp_path, origin.address, workers=workers, start=start,
                   listener_extra=f"[listener.tls]\ncertificates = [{certs}]\n"
                                  f'ocsp_retry = "1s"\n{tls_extra}')


def staples_fetched(p, n: int) -> bool:
    return len([e for e in p.log_events() if e.get("event") == "OCSP response fetched"]) >= n


@pytest.mark.parametrize("proto", ["tls1_2", "tls1_3"])
def test_ticket_resumes_on_every_worker(tmp_path, origin, proxies, pki, proto):
    p = tls_proxy(proxies, tmp_path, origin, pki)
    sess = tmp_path / "sess.pem"
    first = tls_get(p.port, pki.ca_path, proto=proto, sess_out=sess)
    assert first["ok"] and first["new"], first["out"]
    workers_resumed = set()
    for _ in range(16):
        r = tls_get(p.port, pki.ca_path, proto=proto, sess_in=sess)
        assert r["ok"] and r["reused"], r["out"][-2000:]
        workers_resumed.add(r["worker"])
    assert len(workers_resumed) == 2, workers_resumed  # landed on both workers
    p.stop()


def test_ticket_resumes_after_hup_and_upgrade(tmp_path, origin, proxies, pki):
    p = tls_proxy(proxies, tmp_path, origin, pki)
    sess = tmp_path / "sess.pem"
    assert tls_get(p.port, pki.ca_path, proto="tls1_2", sess_out=sess)["new"]
    p.send(signal.SIGHUP)
    wait_for(lambda: any(e.get("event") == "reload complete" for e in p.log_events()),
             what="reload")
    r = tls_get(p.port, pki.ca_path, proto="tls1_2", sess_in=sess)
    assert r["reused"] and r["ok"], r["out"][-1500:]
    # binary upgrade: the new master inherits the key store
    old = p.proc.pid
    p.send(signal.SIGUSR2)

    def new_master():
        try:
            with open(p.pidfile) as f:
                pid = int(f.read())
        except (OSError, ValueError):
            return None
        return pid if pid != old else None

    new = wait_for(new_master, what="the new master")
    wait_for(lambda: any(e.get("event") == "workers ready" and e.get("pid") == new
                         for e in p.log_events()), what="new workers")
    os.kill(old, signal.SIGWINCH)
    wait_for(lambda: not p.workers_pids(old), timeout=15, what="old workers gone")
    r = tls_get(p.port, pki.ca_path, proto="tls1_2", sess_in=sess)
    assert r["reused"] and r["ok"], r["out"][-1500:]
    os.kill(old, signal.SIGQUIT)
    p.proc.wait(15)
    kids = children_of(new)
    os.kill(new, signal.SIGTERM)
    wait_for(lambda: not alive(new) and not any(alive(k) for k in kids), timeout=15,
             what="new master to stop")


def test_rotation_keeps_previous_key_then_ages_out(tmp_path, origin, proxies, pki):
    p = tls_proxy(proxies, tmp_path, origin, pki, workers=1,
                  tls_extra='ticket_key_rotation = "3s"')

    def rotations():
        return len([e for e in p.log_events() if e.get("event") == "ticket key rotated"])

    wait_for(lambda: rotations() >= 1, timeout=10, what="a first rotation")
    sess = tmp_path / "sess.pem"
    assert tls_get(p.port, pki.ca_path, proto="tls1_2", sess_out=sess)["new"]
    n = rotations()
    wait_for(lambda: rotations() > n, timeout=10, what="the next rotation")
    r = tls_get(p.port, pki.ca_path, proto="tls1_2", sess_in=sess)
    assert r["reused"], r["out"][-1500:]  # previous key still decrypts
    # and the client got a new ticket under the new key
    assert last_ticket_key_name(r["out"]) != ticket_key_name(sess)
    n = rotations()  # lifetime = 2 rotations, 2 previous keys kept: two more age it out
    wait_for(lambda: rotations() > n + 1, timeout=15, what="two more rotations")
    r = tls_get(p.port, pki.ca_path, proto="tls1_2", sess_in=sess)
    assert r["new"] and not r["reused"], r["out"][-1500:]  # aged out: full handshake
    p.stop()


def test_ocsp_staples_for_ecdsa_and_rsa_and_sni(tmp_path, origin, proxies, pki):
    p = tls_proxy(proxies, tmp_path, origin, pki, leaves=("ec", "rsa", "a", "revoked"))
    wait_for(lambda: staples_fetched(p, 3), timeout=20, what="3 good OCSP responses")
    ec = tls_get(p.port, pki.ca_path, proto="tls1_2", status=True,
                 extra=["-sigalgs", "ECDSA+SHA256"])
    assert ec["stapled_good"] and "O = ec" in ec["subject"], ec["out"][:3000]
    rsa = tls_get(p.port, pki.ca_path, proto="tls1_2", status=True,
                  extra=["-sigalgs", "RSA-PSS+SHA256:RSA+SHA256"])
    assert rsa["stapled_good"] and "O = rsa" in rsa["subject"], rsa["out"][:3000]
    sni = tls_get(p.port, pki.ca_path, servername="www.a.test", status=True)
    assert "a.test" in sni["subject"] and sni["stapled_good"], sni["out"][:3000]
    revoked = tls_get(p.port, pki.ca_path, servername="revoked.test", status=True)
    assert "revoked.test" in revoked["subject"]
    assert revoked["no_staple"], revoked["out"][:3000]  # a revoked response is not stapled
    p.stop()


def test_responder_down_then_back(tmp_path, origin, proxies, pki):
    port = pki.responder.port
    pki.responder.stop()
    pki.responder = None
    p = tls_proxy(proxies, tmp_path, origin, pki, workers=1, leaves=("ec",))
    r = tls_get(p.port, pki.ca_path, status=True)
    assert r["ok"] and r["no_staple"], r["out"][:3000]  # handshake fine, no staple
    pki.responder = Responder(pki, port=port)
    wait_for(lambda: staples_fetched(p, 1), timeout=30, what="a staple once the responder is back")
    r = tls_get(p.port, pki.ca_path, status=True)
    assert r["stapled_good"], r["out"][:3000]
    p.stop()


def test_check_rejects_mismatched_key(tmp_path, pki):
    conf = tmp_path / "bad.toml"
    conf.write_text(f"""
[[listener]]
listen = "127.0.0.1:8443"
upstream = "app"
[listener.tls]
certificates = [{{ cert = "{pki.leaves['ec'].cert_path}", key = "{pki.leaves['rsa'].key_path}" }}]
[upstream.app]
servers = [{{ address = "127.0.0.1:9000" }}]
""")
    r = subprocess.run([PY, "-m", "forkproxy", "check", "-c", str(conf)], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "listener[0].tls.certificates[0].key:" in r.stdout, r.stdout


def _leaf_only(pki, name: str, tmp_path):
    """The leaf certificate alone (no chain after it), written by openssl."""
    out = tmp_path / f"{name}-leaf-only.crt"
    subprocess.run(["openssl", "x509", "-in", str(pki.leaves[name].cert_path), "-out", str(out)],
                   check=True, capture_output=True, timeout=30)
    assert out.read_text().count("BEGIN CERTIFICATE") == 1
    return out


def _leaf_only_conf(tmp_path, pki, leaf, tls_extra: str = "") -> str:
    return (f'[[listener]]\nlisten = "127.0.0.1:8443"\nupstream = "app"\n'
            f'[listener.tls]\ncertificates = [{{ cert = "{leaf}", key = '
            f'"{pki.leaves["ec"].key_path}" }}]\n{tls_extra}'
            f'[upstream.app]\nservers = [{{ address = "127.0.0.1:9000" }}]\n')


def _check(conf) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "forkproxy", "check", "-c", str(conf)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_check_warns_when_stapling_has_no_issuer(tmp_path, pki):
    leaf = _leaf_only(pki, "ec", tmp_path)
    conf = tmp_path / "leaf.toml"
    conf.write_text(_leaf_only_conf(tmp_path, pki, leaf))
    r = _check(conf)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "ok", r.stdout + r.stderr
    warnings = [ln for ln in r.stdout.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1, r.stdout
    assert "listener[0].tls.certificates[0]: OCSP stapling is on" in warnings[0]
    assert "issuer certificate not found" in warnings[0]
    assert "listener[0].tls.ocsp_issuer" in warnings[0]
    # with the issuer named, or with stapling off, nothing to warn about
    for extra in (f'ocsp_issuer = "{pki.ca_path}"\n', "ocsp_stapling = false\n"):
        conf.write_text(_leaf_only_conf(tmp_path, pki, leaf, extra))
        r = _check(conf)
        assert r.returncode == 0 and "warning" not in r.stdout, (extra, r.stdout + r.stderr)
    # a missing issuer file is an error
    conf.write_text(_leaf_only_conf(tmp_path, pki, leaf, f'ocsp_issuer = "{tmp_path}/nope"\n'))
    r = _check(conf)
    assert r.returncode == 1 and "listener[0].tls.ocsp_issuer: cannot read" in r.stdout, r.stdout


def test_ocsp_issuer_staples_a_certificate_file_without_chain(tmp_path, origin, proxies, pki):
    """nginx's ssl_trusted_certificate: the cert file holds the leaf only, the issuer comes
    from ocsp_issuer; the staple is fetched from the openssl ocsp responder and served."""
    leaf = _leaf_only(pki, "ec", tmp_path)
    p = proxies(tmp_path, origin.address, workers=1,
                listener_extra=f'[listener.tls]\ncertificates = [{{ cert = "{leaf}", key = '
                               f'"{pki.leaves["ec"].key_path}" }}]\nocsp_retry = "1s"\n'
                               f'ocsp_issuer = "{pki.ca_path}"\n')
    wait_for(lambda: staples_fetched(p, 1), timeout=60, what="a good OCSP response")
    r = tls_get(p.port, pki.ca_path, status=True)
    assert r["ok"] and r["stapled_good"], r["out"][:3000]
    assert not [e for e in p.log_events() if e.get("event") == "OCSP stapling disabled for a "
                "certificate"]
    p.stop()
