"""End to end against real OpenSSL tools: two forked gevent TLS servers sharing one
key store (resumption across processes, rotation), a real ``openssl ocsp`` responder
(stapling good / revoked / responder down), SNI, all checked with ``openssl s_client``."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tlsutil
from conftest import needs_tools

from forkproxy import pem
from forkproxy.shm.keystore import KeyStore
from forkproxy.tls import context, ocsp, openssl

pytestmark = needs_tools("openssl")

PROTOS = ["tls1_2", "tls1_3"]
CERTS = ("ec", "rsa", "a", "revoked")  # slot = position
SLOT = {name: i for i, name in enumerate(CERTS)}


@dataclass
class Env:
    dir: Path
    pki: tlsutil.Pki
    store: KeyStore
    responder: tlsutil.Responder
    results: dict[int, ocsp.OCSPResult]
    a: tlsutil.ServerProcess
    b: tlsutil.ServerProcess

    def client(self, server: tlsutil.ServerProcess, **kw: object) -> tlsutil.ClientRun:
        run = tlsutil.s_client(server.port, self.pki.ca_path, **kw)  # type: ignore[arg-type]
        line = run.server_line  # the handshake completed and the server answered
        assert line["tcb_errors"] == "0" and line["status_errors"] == "0", run.out
        return run


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    d = Path(tempfile.mkdtemp(prefix="forkproxy-tls-"))
    started: list[object] = []
    store = KeyStore.create(max_keys=4)
    try:
        pki = tlsutil.Pki.create(d)
        responder = tlsutil.Responder(pki)
        started.append(responder)
        pki.issue_leaves(responder.url)
        store.rotate()
        results: dict[int, ocsp.OCSPResult] = {}
        sources: list[ocsp.StapleSource | None] = [
            ocsp.StapleSource(str(pki.leaves[n].cert_path)) if n != "a" else None
            for n in CERTS  # slot 2 (a.test) belongs to the responder-down test
        ]
        ocsp.OCSPUpdater(store, sources, on_result=results.__setitem__).start()

        def build() -> context.ServerContext:
            ctx = context.build_server_context(pki.pairs(*CERTS))
            context.install_callbacks(
                ctx,
                store.keys,
                context.staple_provider_for(ctx, store.staple),
                session_timeout=3600,
            )
            return ctx

        a = tlsutil.ServerProcess(build)
        started.append(a)
        b = tlsutil.ServerProcess(build)
        started.append(b)
        yield Env(d, pki, store, responder, results, a, b)
    finally:
        for p in reversed(started):
            p.stop()  # type: ignore[attr-defined]
        store.close()
        shutil.rmtree(d, ignore_errors=True)


def test_self_test_ok() -> None:
    assert openssl.self_test().ok


@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("servername", ["localhost", "www.a.test"])
def test_ticket_from_one_process_resumes_on_the_other(
    env: Env, proto: str, servername: str
) -> None:
    """www.a.test is served from a context the SNI callback switched to: tickets still
    go through the callback on the initial context."""
    sess = env.dir / f"cross-{proto}-{servername}.pem"
    first = env.client(env.a, proto=proto, sess_out=sess, servername=servername)
    assert first.new and first.verified, first.out
    assert tlsutil.ticket_key_name(sess) == env.store.keys()[0][:16]
    if proto == "tls1_2":
        assert "TLS session ticket lifetime hint: 3600 (seconds)" in first.out
    for server in (env.b, env.a, env.b):
        again = env.client(server, proto=proto, sess_in=sess, servername=servername)
        assert again.reused, again.out
        assert again.server_line["reused"] == "1"
        if proto == "tls1_3":  # single-use tickets: a fresh one under the current key
            assert "Post-Handshake New Session Ticket arrived" in again.out
            assert tlsutil.last_ticket_key_name(again.out) == env.store.keys()[0][:16]


@pytest.mark.parametrize("proto", PROTOS)
def test_rotation_keeps_old_tickets_then_ages_them_out(env: Env, proto: str) -> None:
    old = env.dir / f"old-{proto}.pem"
    assert env.client(env.a, proto=proto, sess_out=old).new
    old_name = tlsutil.ticket_key_name(old)
    new_name = env.store.rotate()
    assert old_name != new_name and env.store.keys()[1][:16] == old_name

    run = env.client(env.b, proto=proto, sess_in=old)
    assert run.reused, run.out
    assert int(run.server_line["tcb_old"]) >= 1
    # TLS 1.2 too gets a fresh ticket, under the new key (s_client prints it)
    assert tlsutil.last_ticket_key_name(run.out) == new_name

    env.store.drop_old_keys(0)
    run = env.client(env.b, proto=proto, sess_in=old)
    assert run.new, run.out  # aged out: full handshake, not an error


@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize(
    ("kind", "sigalgs", "bits"),
    [("ec", "ECDSA+SHA256", 256), ("rsa", "RSA-PSS+SHA256:RSA+SHA256", 2048)],
)
def test_ocsp_staple_for_ecdsa_and_rsa(
    env: Env, proto: str, kind: str, sigalgs: str, bits: int
) -> None:
    assert env.results[SLOT[kind]].status == "good", env.results[SLOT[kind]]
    run = env.client(env.a, proto=proto, status=True, extra=["-sigalgs", sigalgs])
    assert run.verified, run.out
    assert f"subject=CN = localhost, O = {kind}" in run.out
    assert f"Server public key is {bits} bit" in run.out
    assert "OCSP Response Status: successful" in run.out
    assert "Cert Status: good" in run.out
    assert int(run.server_line["stapled"]) >= 1


def test_cache_file_written_private_and_reused_at_start(env: Env) -> None:
    cert = env.pki.leaves["ec"].cert_path
    cache = Path(str(cert) + ".ocsp")
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    src = ocsp.StapleSource(str(cert), responder="http://[::1]:9/")  # never contacted
    res = src.load_cache()
    assert res is not None and res.ok and res.source == str(cache)
    assert src.staple() is not None and src.next_attempt > time.time()


def test_revoked_certificate_is_not_stapled(env: Env) -> None:
    res = env.results[SLOT["revoked"]]
    assert res.status == "revoked" and res.der is None, res
    assert env.store.staple(SLOT["revoked"]) is None
    assert not Path(str(env.pki.leaves["revoked"].cert_path) + ".ocsp").exists()
    run = env.client(env.a, servername="revoked.test", status=True)
    assert run.verified and "subject=CN = revoked.test" in run.out
    assert "OCSP response: no response sent" in run.out


def test_responder_down_then_back(env: Env) -> None:
    port = tlsutil.free_port()
    src = ocsp.StapleSource(
        str(env.pki.leaves["a"].cert_path), responder=f"http://[::1]:{port}/", cache=False
    )
    seen: list[ocsp.OCSPResult] = []
    updater = ocsp.OCSPUpdater(
        env.store, [None, None, src, None], on_result=lambda _s, r: seen.append(r)
    )
    t0 = time.time()
    updater.start()
    assert seen[-1].status == "unavailable" and "unreachable" in seen[-1].reason
    assert src.next_attempt >= t0 + 15  # backed off, not hammering
    run = env.client(env.b, servername="a.test", status=True)
    assert run.verified and "OCSP response: no response sent" in run.out

    responder = tlsutil.Responder(env.pki, port=port)
    try:
        updater.run_due(force=True)
        assert seen[-1].ok, seen[-1]
        run = env.client(env.b, servername="a.test", status=True)
        assert "Cert Status: good" in run.out and "subject=CN = a.test" in run.out
    finally:
        responder.stop()
        env.store.clear_staple(SLOT["a"])


@pytest.mark.parametrize(
    ("servername", "subject"),
    [
        ("localhost", "subject=CN = localhost, O = "),
        ("a.test", "subject=CN = a.test, O = a"),
        ("www.a.test", "subject=CN = a.test, O = a"),  # wildcard SAN
        ("revoked.test", "subject=CN = revoked.test"),
        (None, "subject=CN = localhost, O = "),  # no SNI: the first certificate
        ("other.example", "subject=CN = localhost, O = "),  # unknown: the default
    ],
)
def test_sni_picks_the_certificate(env: Env, servername: str | None, subject: str) -> None:
    run = env.client(env.a, servername=servername)
    assert subject in run.out, run.out
    if servername and servername != "other.example":
        assert run.verified, run.out


def test_check_cert_key_rejects_a_key_openssl_also_rejects(env: Env) -> None:
    (cert, _), (_, other_key) = env.pki.pairs("ec", "a")
    assert "does not match" in (pem.check_cert_key(cert, other_key) or "")
    # the same verdict from the openssl CLI: the public keys differ
    pub = [
        os.popen(f"openssl x509 -in {cert} -noout -pubkey").read(),
        os.popen(f"openssl pkey -in {other_key} -pubout").read(),
    ]
    assert pub[0] and pub[1] and pub[0] != pub[1]
