"""Unit tests of the TLS building blocks: key store, ticket key file, OCSP verification
and scheduling, context building, and the ctypes callbacks through in-memory handshakes."""

from __future__ import annotations

import datetime
import hashlib
import os
import random
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tlsutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp as xocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from forkproxy import pem
from forkproxy.shm.keystore import (
    KEY_RECORD,
    KeyFileError,
    KeyStore,
    KeyStoreError,
    generate_key,
    keys_to_keep,
    load_ticket_key_file,
)
from forkproxy.tls import context, ocsp, openssl

UTC = datetime.UTC


@pytest.fixture(scope="module")
def pki() -> Iterator[tlsutil.Pki]:
    for d in tlsutil.temp_dir():
        p = tlsutil.Pki.create(d)
        p.issue_leaves("http://127.0.0.1:9/")  # never contacted in this module
        yield p


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """Shadows pytest's (which keeps directories around): removed after each test."""
    yield from tlsutil.temp_dir()


# ---------------------------------------------------------------- key store


def test_keystore_rotate_keeps_previous_keys_in_order() -> None:
    store = KeyStore.create(max_keys=3)
    try:
        assert store.keys() == ()
        names = [store.rotate() for _ in range(5)]
        keys = store.keys()
        assert [k[:16] for k in keys] == names[::-1][:3]
        assert store.generation() == 5
        store.rotate(keep=0)
        assert len(store.keys()) == 1
        store.rotate(keep=1)
        assert len(store.keys()) == 2
        store.drop_old_keys(0)
        assert len(store.keys()) == 1
    finally:
        store.close()


def test_keystore_keys_returns_same_object_until_changed() -> None:
    store = KeyStore.create()
    store.rotate()
    a = store.keys()
    assert store.keys() is a
    store.rotate()
    b = store.keys()
    assert b is not a and b[1] == a[0]
    store.close()


def test_keystore_set_keys_validates() -> None:
    store = KeyStore.create(max_keys=2)
    with pytest.raises(ValueError):
        store.set_keys([])
    with pytest.raises(ValueError):
        store.set_keys([b"x" * 79])
    with pytest.raises(ValueError):
        store.set_keys([generate_key() for _ in range(3)])
    k = [generate_key(), generate_key()]
    store.set_keys(k)
    assert list(store.keys()) == k
    store.close()


def test_keystore_from_fd_sees_the_same_memory_and_is_sealed() -> None:
    store = KeyStore.create()
    store.rotate()
    fd = store.fd
    assert fd is not None and not os.get_inheritable(fd)
    with pytest.raises(OSError):
        os.ftruncate(fd, 1)  # sealed: readers never get SIGBUS
    other = KeyStore.from_fd(os.dup(fd))  # what an exec'd master would do
    try:
        assert other.keys() == store.keys()
        other.rotate()
        assert store.keys() == other.keys()
        ro = KeyStore.from_fd(os.dup(fd), readonly=True)
        with pytest.raises(KeyStoreError):
            ro.rotate()
        assert ro.keys() == store.keys()
        ro.close()
    finally:
        other.close()
        store.close()


def test_keystore_new_writer_repairs_a_half_written_section() -> None:
    store = KeyStore.create()
    store.rotate()
    before = store.keys()
    q = memoryview(store._mm).cast("Q")
    q[64 // 8] += 1  # a writer died between its two sequence bumps
    q.release()
    assert store.keys() is before  # readers keep the last consistent keys meanwhile
    fresh = KeyStore.from_fd(os.dup(store.fd))  # type: ignore[arg-type]
    assert fresh._q[64 // 8] % 2 == 0
    fresh.rotate()
    assert len(store.keys()) == 2
    fresh.close()
    store.close()


def test_keystore_rejects_foreign_memory() -> None:
    fd = os.memfd_create("not-a-keystore")
    os.ftruncate(fd, 4096)
    with pytest.raises(KeyStoreError):
        KeyStore.from_fd(fd)
    os.close(fd)


def test_keystore_fork_readers_see_rotations() -> None:
    store = KeyStore.create(memfd=False)
    store.rotate()
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            first = store.keys()[0]
            os.write(w1, first[:16])
            assert tlsutil.wait_readable(r2, 10)
            os.read(r2, 1)
            code = 0 if store.keys()[0] != first and store.keys()[1] == first else 2
        finally:
            os._exit(code)
    try:
        assert os.read(r1, 16) == store.keys()[0][:16]
        store.rotate()
        os.write(w2, b"x")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)
        store.close()


def test_keystore_readers_never_see_torn_keys() -> None:
    """A forked writer rewrites keys as fast as it can; every read must be consistent."""
    store = KeyStore.create(max_keys=4)
    store.set_keys([bytes([0]) * KEY_RECORD])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w, b"go")
            i = 0
            while True:
                i += 1
                n = 1 + i % 4
                store.set_keys([bytes([(i - j) % 256]) * KEY_RECORD for j in range(n)])
        finally:
            os._exit(0)
    try:
        assert tlsutil.wait_readable(r, 10) and os.read(r, 2) == b"go"
        seen = set()
        deadline = time.monotonic() + 0.5
        reads = 0
        while time.monotonic() < deadline and reads < 200_000:
            keys = store.keys()
            reads += 1
            first = keys[0][0]
            for j, k in enumerate(keys):
                assert k == bytes([(first - j) % 256]) * KEY_RECORD, "torn read"
            seen.add(first)
        assert len(seen) > 10  # the writer really was racing us
    finally:
        tlsutil.stop_pid(pid)
        os.close(r)
        os.close(w)
        store.close()


def test_keystore_staples() -> None:
    store = KeyStore.create(slots=2, staple_max=100)
    try:
        assert store.staple(0) is None
        store.set_staple(0, b"der-bytes", time.time() + 60)
        assert store.staple(0) == b"der-bytes"
        assert store.staple(1) is None
        assert store.staple(0, now=time.time() + 61) is None  # never stale
        store.set_staple(0, b"newer", time.time() + 60)
        assert store.staple(0) == b"newer"
        store.clear_staple(0)
        assert store.staple(0) is None and store.staple_entry(0) is None
        with pytest.raises(ValueError):
            store.set_staple(1, b"x" * 101, time.time() + 60)
        with pytest.raises(IndexError):
            store.staple(2)
    finally:
        store.close()


def test_keys_to_keep() -> None:
    assert keys_to_keep(3600, 3600) == 1
    assert keys_to_keep(7200, 3600) == 2
    assert keys_to_keep(7201, 3600) == 3
    assert keys_to_keep(10, 3600) == 1


def test_load_ticket_key_file(tmp_path: Path) -> None:
    p = tmp_path / "ticket.key"
    recs = [generate_key(), generate_key()]
    p.write_bytes(b"".join(recs))
    p.chmod(0o600)
    assert load_ticket_key_file(str(p)) == recs
    p.chmod(0o640)
    with pytest.raises(KeyFileError, match="group or others.*chmod 600"):
        load_ticket_key_file(str(p))
    p.chmod(0o604)
    with pytest.raises(KeyFileError, match="group or others"):
        load_ticket_key_file(str(p))
    p.chmod(0o600)
    p.write_bytes(b"x" * 81)
    with pytest.raises(KeyFileError, match="80-byte records"):
        load_ticket_key_file(str(p))
    p.write_bytes(b"x" * 48)
    with pytest.raises(KeyFileError, match="48-byte"):
        load_ticket_key_file(str(p))
    p.write_bytes(recs[0] * 2)
    with pytest.raises(KeyFileError, match="share a 16-byte name"):
        load_ticket_key_file(str(p))
    with pytest.raises(KeyFileError, match="cannot open"):
        load_ticket_key_file(str(tmp_path / "missing"))


# ---------------------------------------------------------------- openssl shim


def test_self_test_passes_here() -> None:
    res = openssl.self_test()
    assert res.ok, res.message
    assert res.version == ssl.OPENSSL_VERSION_NUMBER
    assert any("offset" in c for c in res.checks)


def test_ssl_ctx_pointer_checks() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    p = openssl.ssl_ctx_pointer(ctx)
    assert p == openssl.ssl_ctx_pointer(ctx)
    assert p != openssl.ssl_ctx_pointer(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    with pytest.raises(TypeError):
        openssl.ssl_ctx_pointer(object())  # type: ignore[arg-type]
    old = openssl.set_session_timeout(ctx, 1234)
    assert old == 7200 and openssl.session_timeout(ctx) == 1234


def _server(pki: tlsutil.Pki, keys, staples=None) -> context.ServerContext:  # noqa: ANN001
    ctx = context.build_server_context(pki.pairs("ec", "rsa", "a"))
    context.install_callbacks(
        ctx, keys, context.staple_provider_for(ctx, staples) if staples else None
    )
    return ctx


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_ticket_resumes_on_another_context_sharing_keys(
    pki: tlsutil.Pki, version: ssl.TLSVersion
) -> None:
    """Two contexts = two workers; they share only the key provider."""
    store = KeyStore.create()
    store.rotate()
    a, b = _server(pki, store.keys), _server(pki, store.keys)
    client = tlsutil.client_context(pki.ca_path, version=version)
    c, _ = tlsutil.memory_handshake(client, a)
    assert not c.session_reused
    c2, s2 = tlsutil.memory_handshake(client, b, session=c.session)
    assert c2.session_reused and s2.session_reused
    assert a.ticket_callback.stats.encrypted >= 1
    assert b.ticket_callback.stats.decrypted_current == 1
    # TLS 1.3: a fresh single-use ticket after every resumption; TLS 1.2 keeps its ticket
    renewed = version == ssl.TLSVersion.TLSv1_3
    assert b.ticket_callback.stats.encrypted == (1 if renewed else 0)
    assert (c2.session.id != c.session.id) == renewed
    assert a.ticket_callback.stats.errors == b.ticket_callback.stats.errors == 0
    store.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_rotation_old_key_reissued_then_aged_out(pki: tlsutil.Pki, version: ssl.TLSVersion) -> None:
    store = KeyStore.create()
    store.rotate()
    srv = _server(pki, store.keys)
    client = tlsutil.client_context(pki.ca_path, version=version)
    c, _ = tlsutil.memory_handshake(client, srv)
    old_session = c.session
    store.rotate()  # previous key kept
    c2, _ = tlsutil.memory_handshake(client, srv, session=old_session)
    assert c2.session_reused
    assert srv.ticket_callback.stats.decrypted_old == 1
    encrypted = srv.ticket_callback.stats.encrypted
    assert encrypted >= 2  # a fresh ticket under the new key
    store.drop_old_keys(0)
    c3, _ = tlsutil.memory_handshake(client, srv, session=old_session)
    assert not c3.session_reused
    assert srv.ticket_callback.stats.unknown == 1
    assert srv.ticket_callback.stats.errors == 0
    store.close()


def test_ticket_callback_survives_a_failing_provider(pki: tlsutil.Pki) -> None:
    calls = {"n": 0}

    def flaky() -> tuple[bytes, ...]:
        calls["n"] += 1
        raise RuntimeError("shared memory went away")

    srv = _server(pki, flaky)
    client = tlsutil.client_context(pki.ca_path, version=ssl.TLSVersion.TLSv1_3)
    c, _ = tlsutil.memory_handshake(client, srv)  # handshake still completes
    c2, _ = tlsutil.memory_handshake(client, srv, session=c.session)
    assert c2.session_reused  # process-local fallback key
    st = srv.ticket_callback.stats
    assert st.errors >= 1 and "shared memory went away" in st.last_error and st.fallback >= 1


@pytest.mark.parametrize(
    ("servername", "sigalgs", "slot"),
    [("localhost", "ECDSA+SHA256", 0), ("localhost", "RSA-PSS+SHA256", 1), ("www.a.test", None, 2)],
)
def test_status_callback_staples_the_chosen_certificate(
    pki: tlsutil.Pki, servername: str, sigalgs: str | None, slot: int
) -> None:
    staples = {0: b"staple-for-ec", 1: b"staple-for-rsa", 2: b"staple-for-a"}
    srv = _server(pki, None, staples.get)
    client = tlsutil.client_context(pki.ca_path)
    if sigalgs:  # choose between the ECDSA and RSA certificate of localhost
        client.minimum_version = ssl.TLSVersion.TLSv1_3
        _set_client_sigalgs(client, sigalgs)
    received = openssl.request_ocsp_status(client)
    c, _ = tlsutil.memory_handshake(client, srv, server_hostname=servername)
    fp = hashlib.sha256(c.getpeercert(binary_form=True)).digest()
    assert fp == srv.certificates[slot].fingerprint
    # the a.test context was switched to by SNI: the status callback is on it as well
    assert received == [staples[slot]]
    assert srv.status_callback.stats.stapled == 1


def _set_client_sigalgs(ctx: ssl.SSLContext, sigalgs: str) -> None:
    """SSL_CTX_set1_sigalgs_list = SSL_CTX_ctrl(98) (no Python API for it)."""
    import ctypes

    lib = openssl.library()
    assert lib.SSL_CTX_ctrl(openssl.ssl_ctx_pointer(ctx), 98, 0, ctypes.c_char_p(sigalgs.encode()))


def test_status_callback_never_raises_into_openssl(pki: tlsutil.Pki) -> None:
    def broken(_fp: bytes) -> bytes:
        raise RuntimeError("boom")

    ctx = context.build_server_context(pki.pairs("ec"))
    cb = openssl.install_ocsp_status_callback(ctx, broken)
    client = tlsutil.client_context(pki.ca_path)
    received = openssl.request_ocsp_status(client)
    c, _ = tlsutil.memory_handshake(client, ctx)  # completes without a staple
    assert received == [b""]
    assert cb.stats.errors == 1 and "boom" in cb.stats.last_error


# ---------------------------------------------------------------- contexts


def test_build_server_context_groups_by_name(pki: tlsutil.Pki) -> None:
    ctx = context.build_server_context(pki.pairs("ec", "rsa", "a", "revoked"))
    assert [i.key_type for i in ctx.certificates] == ["ec", "rsa", "ec", "ec"]
    assert ctx.context_for("localhost") is ctx
    assert ctx.context_for(None) is ctx
    assert ctx.context_for("unknown.example") is ctx
    a = ctx.context_for("a.test")
    assert a is not ctx and ctx.context_for("www.a.test") is a
    assert ctx.context_for("A.TEST.") is a
    assert ctx.context_for("revoked.test") not in (ctx, a)
    assert len(ctx.contexts()) == 3
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.sni_callback is not None
    for c in ctx.contexts():
        assert not c.options & ssl.OP_NO_TICKET


def test_single_name_context_has_no_sni_switch(pki: tlsutil.Pki) -> None:
    ctx = context.build_server_context(pki.pairs("ec", "rsa"))
    assert ctx.contexts() == [ctx] and ctx.sni_callback is None


def test_check_cert_key(pki: tlsutil.Pki, tmp_path: Path) -> None:
    ec_cert, ec_key = pki.pairs("ec")[0]
    _, rsa_key = pki.pairs("rsa")[0]
    assert pem.check_cert_key(ec_cert, ec_key) is None
    err = pem.check_cert_key(ec_cert, rsa_key)
    assert err and "does not match" in err
    err = pem.check_cert_key(str(tmp_path / "nope.crt"), ec_key)
    assert err and "cannot read certificate" in err
    err = pem.check_cert_key(ec_key, ec_key)
    assert err and "no PEM certificate" in err
    enc = tmp_path / "enc.key"
    enc.write_bytes(
        pki.leaves["ec"].key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    err = pem.check_cert_key(ec_cert, str(enc))
    assert err and "encrypted" in err
    with pytest.raises(ValueError, match="does not match"):
        context.build_server_context([(ec_cert, rsa_key)])


# ---------------------------------------------------------------- OCSP (sans socket)


def _response(
    pki: tlsutil.Pki,
    leaf: str = "ec",
    *,
    status: xocsp.OCSPCertStatus = xocsp.OCSPCertStatus.GOOD,
    signer: tuple[x509.Certificate, object] | None = None,
    include: list[x509.Certificate] | None = None,
    this_update: datetime.datetime | None = None,
    next_update: datetime.datetime | None | bool = True,
    serial_cert: x509.Certificate | None = None,
) -> bytes:
    now = datetime.datetime.now(UTC)
    cert = serial_cert or pki.leaves[leaf].cert
    tu = this_update or now - datetime.timedelta(minutes=1)
    nu = tu + datetime.timedelta(hours=1) if next_update is True else next_update or None
    b = xocsp.OCSPResponseBuilder().add_response(
        cert=cert,
        issuer=pki.ca,
        algorithm=hashes.SHA1(),
        cert_status=status,
        this_update=tu,
        next_update=nu,
        revocation_time=now - datetime.timedelta(hours=1)
        if status == xocsp.OCSPCertStatus.REVOKED
        else None,
        revocation_reason=None,
    )
    cert_s, key_s = signer or (pki.ca, pki.ca_key)
    b = b.responder_id(xocsp.OCSPResponderEncoding.HASH, cert_s)
    if include:
        b = b.certificates(include)
    return b.sign(key_s, hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


def _verify(pki: tlsutil.Pki, der: bytes, leaf: str = "ec") -> ocsp.OCSPResult:
    return ocsp.verify_response(der, pki.leaves[leaf].cert, pki.ca)  # type: ignore[arg-type]


def test_verify_good_signed_by_issuer(pki: tlsutil.Pki) -> None:
    res = _verify(pki, _response(pki))
    assert res.ok and res.status == "good"
    assert res.next_update and res.next_update > time.time()


def test_verify_good_signed_by_delegated_responder(pki: tlsutil.Pki) -> None:
    der = _response(pki, signer=(pki.ocsp_cert, pki.ocsp_key), include=[pki.ocsp_cert])
    assert _verify(pki, der).ok


def test_verify_rejects_delegate_without_eku(pki: tlsutil.Pki) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    rogue = pki._issue(
        pki.ca_key, pki.ca, x509.Name([]), key.public_key(), x509.random_serial_number()
    )
    res = _verify(pki, _response(pki, signer=(rogue, key), include=[rogue]))
    assert res.status == "invalid" and "OCSP signing EKU" in res.reason


def test_verify_rejects_delegate_from_another_ca(pki: tlsutil.Pki) -> None:
    other_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    rogue = pki._issue(
        other_key,
        pki.ca,  # same issuer *name*, different key: must not pass
        x509.Name([]),
        key.public_key(),
        x509.random_serial_number(),
        eku=[ExtendedKeyUsageOID.OCSP_SIGNING],
    )
    res = _verify(pki, _response(pki, signer=(rogue, key), include=[rogue]))
    assert res.status == "invalid" and "not issued by the issuer" in res.reason


def test_verify_rejects_unrelated_signer(pki: tlsutil.Pki) -> None:
    leaf = pki.leaves["a"]  # signs with its own key, certificate not included
    res = _verify(pki, _response(pki, signer=(leaf.cert, leaf.key)))  # type: ignore[arg-type]
    assert res.status == "invalid" and "neither the issuer" in res.reason


def test_verify_rejects_bad_signature(pki: tlsutil.Pki) -> None:
    der = bytearray(_response(pki))
    der[-5] ^= 0xFF  # inside the signature
    res = _verify(pki, bytes(der))
    assert res.status == "invalid"


def test_verify_rejects_response_for_another_certificate(pki: tlsutil.Pki) -> None:
    res = _verify(pki, _response(pki, "a"), leaf="ec")
    assert res.status == "invalid" and "issuer/serial mismatch" in res.reason


def test_verify_revoked_and_unknown(pki: tlsutil.Pki) -> None:
    res = _verify(pki, _response(pki, status=xocsp.OCSPCertStatus.REVOKED))
    assert res.status == "revoked" and not res.ok and res.der is None
    res = _verify(pki, _response(pki, status=xocsp.OCSPCertStatus.UNKNOWN))
    assert res.status == "unknown" and not res.ok


def test_verify_time_window(pki: tlsutil.Pki) -> None:
    now = datetime.datetime.now(UTC)
    old = _response(pki, this_update=now - datetime.timedelta(hours=3))
    assert "expired" in _verify(pki, old).reason
    future = _response(pki, this_update=now + datetime.timedelta(hours=1))
    assert "future" in _verify(pki, future).reason
    open_ended = _verify(pki, _response(pki, next_update=None))
    assert open_ended.ok and open_ended.next_update == pytest.approx(
        open_ended.this_update + ocsp.NO_NEXT_UPDATE_VALIDITY  # type: ignore[operator]
    )


def test_verify_unsuccessful_and_garbage(pki: tlsutil.Pki) -> None:
    der = xocsp.OCSPResponseBuilder.build_unsuccessful(
        xocsp.OCSPResponseStatus.TRY_LATER
    ).public_bytes(serialization.Encoding.DER)
    assert _verify(pki, der).status == "unavailable"
    assert _verify(pki, b"not der").status == "invalid"


def test_responder_url_and_request(pki: tlsutil.Pki) -> None:
    cert = pki.leaves["ec"].cert
    assert ocsp.responder_url(cert) == "http://127.0.0.1:9/"  # type: ignore[arg-type]
    assert ocsp.responder_url(pki.ca) is None
    req = xocsp.load_der_ocsp_request(ocsp.build_request(cert, pki.ca))  # type: ignore[arg-type]
    assert req.serial_number == cert.serial_number  # type: ignore[union-attr]
    chain = ocsp.load_chain(str(pki.leaves["ec"].cert_path))
    assert ocsp.find_issuer(chain[0], chain[1:]) == pki.ca


def test_refresh_time_half_validity_with_jitter() -> None:
    now = 1_000_000.0
    res = ocsp.OCSPResult("good", "good", b"x", now - 100, now + 3600 * 24 - 100)
    rng = random.Random(1)
    times = [ocsp.refresh_time(res, now, rng) for _ in range(200)]
    validity = 3600 * 24
    assert all(now - 100 + 0.4 * validity <= t <= now - 100 + 0.6 * validity for t in times)
    assert len({round(t) for t in times}) > 50  # jittered
    short = ocsp.OCSPResult("good", "good", b"x", now - 50, now + 10)
    assert ocsp.refresh_time(short, now, rng) == now + 5.0  # never a tight loop


def test_backoff_grows_to_cap_and_resets() -> None:
    b = ocsp.Backoff(base=10, cap=100, rng=random.Random(2))
    delays = [b.next_delay() for _ in range(8)]
    assert 5 <= delays[0] <= 10 and all(50 <= d <= 100 for d in delays[4:])
    b.reset()
    assert b.next_delay() <= 10


def test_staple_source_without_responder(pki: tlsutil.Pki, tmp_path: Path) -> None:
    # the CA itself: self-signed, no AIA -> stapling silently disabled
    p = tmp_path / "self.crt"
    p.write_bytes(pki.ca.public_bytes(serialization.Encoding.PEM))
    src = ocsp.StapleSource(str(p))
    assert not src.enabled and "issuer" in (src.setup_error or "")
    res = src.refresh()
    assert res.status == "unsupported" and src.staple() is None
    assert src.next_attempt == float("inf")


def test_keystore_header_layout_is_stable() -> None:
    store = KeyStore.create(max_keys=2, slots=1, staple_max=64)
    magic, version, mk, slots, smax, size = struct.unpack_from("<8sIIIIQ", store._mm, 0)
    assert (magic, version, mk, slots, smax, size) == (b"FPKEYST1", 1, 2, 1, 64, store.size)
    store.close()


def test_worker_reader_is_read_only_and_follows_the_writer() -> None:
    store = KeyStore.create()
    store.rotate()
    fd = store.fd
    assert fd is not None
    pid = os.fork()
    if pid == 0:  # a worker: swap to a read-only view, then try to write
        code = 1
        try:
            ro = store.reader()
            try:
                ro.rotate()
            except KeyStoreError:
                code = 0 if len(ro.keys()) == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(store.keys()) == 1  # the worker's reader() did not affect the master
    store.close()
