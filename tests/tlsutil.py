"""Test helpers for TLS: a throwaway PKI, a real ``openssl ocsp`` responder, forked gevent
TLS servers sharing one key store, ``openssl s_client`` runs, in-memory handshakes."""

from __future__ import annotations

import datetime
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

UTC = datetime.UTC


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _write_key(path: Path, key: object) -> None:
    path.write_bytes(
        key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Leaf:
    name: str  # label: "ec", "rsa", "a", "revoked"
    dns: list[str]
    org: str
    key: object
    serial: int
    revoked: bool = False
    cert: x509.Certificate | None = None
    cert_path: Path = Path()
    key_path: Path = Path()


@dataclass
class Pki:
    """CA, delegated OCSP signer and leaf keys; leaf certificates once a URL is known."""

    dir: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca: x509.Certificate
    ocsp_key: ec.EllipticCurvePrivateKey
    ocsp_cert: x509.Certificate
    leaves: dict[str, Leaf] = field(default_factory=dict)

    @property
    def ca_path(self) -> Path:
        return self.dir / "ca.crt"

    @classmethod
    def create(cls, directory: Path) -> Pki:
        now = datetime.datetime.now(UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            x509.CertificateBuilder()
            .subject_name(_name("forkproxy test CA"))
            .issuer_name(_name("forkproxy test CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        ocsp_key = ec.generate_private_key(ec.SECP256R1())
        ocsp_cert = cls._issue(
            ca_key,
            ca,
            _name("forkproxy test OCSP signer"),
            ocsp_key.public_key(),
            x509.random_serial_number(),
            eku=[ExtendedKeyUsageOID.OCSP_SIGNING],
        )
        pki = cls(directory, ca_key, ca, ocsp_key, ocsp_cert)
        pki.ca_path.write_bytes(_pem(ca))
        (directory / "ocsp.crt").write_bytes(_pem(ocsp_cert))
        _write_key(directory / "ocsp.key", ocsp_key)
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        for leaf in [
            Leaf("ec", ["localhost"], "ec", ec.generate_private_key(ec.SECP256R1()), 0),
            Leaf("rsa", ["localhost"], "rsa", rsa_key, 0),
            Leaf("a", ["a.test", "*.a.test"], "a", ec.generate_private_key(ec.SECP256R1()), 0),
            Leaf(
                "revoked",
                ["revoked.test"],
                "revoked",
                ec.generate_private_key(ec.SECP256R1()),
                0,
                revoked=True,
            ),
        ]:
            leaf.serial = x509.random_serial_number()
            pki.leaves[leaf.name] = leaf
        pki.write_index()
        return pki

    @staticmethod
    def _issue(
        ca_key: ec.EllipticCurvePrivateKey,
        ca: x509.Certificate,
        subject: x509.Name,
        public_key: object,
        serial: int,
        *,
        dns: list[str] | None = None,
        eku: list[x509.ObjectIdentifier] | None = None,
        ocsp_url: str | None = None,
        issuer_name: x509.Name | None = None,
    ) -> x509.Certificate:
        now = datetime.datetime.now(UTC)
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name or ca.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if dns:
            b = b.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in dns]), critical=False
            )
        if eku:
            b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        if ocsp_url:
            b = b.add_extension(
                x509.AuthorityInformationAccess(
                    [
                        x509.AccessDescription(
                            AuthorityInformationAccessOID.OCSP,
                            x509.UniformResourceIdentifier(ocsp_url),
                        )
                    ]
                ),
                critical=False,
            )
        return b.sign(ca_key, hashes.SHA256())

    def issue(self, dns: list[str], key: object, serial: int, **kw: object) -> x509.Certificate:
        return self._issue(
            self.ca_key,
            self.ca,
            _name(dns[0]),
            key.public_key(),  # type: ignore[attr-defined]
            serial,
            dns=dns,
            **kw,  # type: ignore[arg-type]
        )

    def write_index(self) -> None:
        """``openssl ca`` style index.txt: what the responder answers from."""
        exp = (datetime.datetime.now(UTC) + datetime.timedelta(days=1)).strftime("%y%m%d%H%M%SZ")
        rev = (datetime.datetime.now(UTC) - datetime.timedelta(minutes=5)).strftime("%y%m%d%H%M%SZ")
        lines = []
        for leaf in self.leaves.values():
            h = f"{leaf.serial:X}"
            h = "0" + h if len(h) % 2 else h
            status, when = ("R", rev) if leaf.revoked else ("V", "")
            lines.append(f"{status}\t{exp}\t{when}\t{h}\tunknown\t/CN={leaf.dns[0]}/O={leaf.org}\n")
        (self.dir / "index.txt").write_text("".join(lines))
        (self.dir / "index.txt.attr").write_text("unique_subject = no\n")

    def issue_leaves(self, ocsp_url: str) -> None:
        """Sign the leaves with ``ocsp_url`` in their AIA; files are leaf + CA chain."""
        for leaf in self.leaves.values():
            leaf.cert = self._issue(
                self.ca_key,
                self.ca,
                _name(leaf.dns[0], leaf.org),
                leaf.key.public_key(),  # type: ignore[attr-defined]
                leaf.serial,
                dns=leaf.dns,
                eku=[ExtendedKeyUsageOID.SERVER_AUTH],
                ocsp_url=ocsp_url,
            )
            leaf.cert_path = self.dir / f"{leaf.name}.crt"
            leaf.key_path = self.dir / f"{leaf.name}.key"
            leaf.cert_path.write_bytes(_pem(leaf.cert) + _pem(self.ca))
            _write_key(leaf.key_path, leaf.key)

    def pairs(self, *names: str) -> list[tuple[str, str]]:
        return [(str(self.leaves[n].cert_path), str(self.leaves[n].key_path)) for n in names]


def temp_dir(prefix: str = "forkproxy-test-") -> Iterator[Path]:
    """A directory removed afterwards (pytest's tmp_path keeps the last runs)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- processes


def wait_readable(fd: int, timeout: float) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)


def stop_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, wait; SIGKILL if it does not go."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    pidfd = os.pidfd_open(pid)
    try:
        if not wait_readable(pidfd, timeout):
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(pidfd)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


class Responder:
    """A real ``openssl ocsp`` responder with the delegated signer."""

    def __init__(self, pki: Pki, port: int = 0, nmin: int = 10) -> None:
        self.pki = pki
        d = pki.dir
        self.proc = subprocess.Popen(
            [
                "openssl",
                "ocsp",
                "-index",
                str(d / "index.txt"),
                "-port",
                str(port),
                "-rsigner",
                str(d / "ocsp.crt"),
                "-rkey",
                str(d / "ocsp.key"),
                "-CA",
                str(pki.ca_path),
                "-nmin",
                str(nmin),
                "-ignore_err",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=open(d / "responder.log", "ab"),  # noqa: SIM115 - the child owns it
        )
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        line = b""
        while not line.endswith(b"\n"):
            if not wait_readable(fd, 10):
                self.stop()
                raise RuntimeError("openssl ocsp did not start")
            chunk = os.read(fd, 256)
            if not chunk:
                self.stop()
                raise RuntimeError(f"openssl ocsp exited: {line!r}")
            line += chunk
        m = re.search(rb"ACCEPT .*:(\d+) PID=", line)
        if not m:
            self.stop()
            raise RuntimeError(f"unexpected responder banner {line!r}")
        self.port = int(m.group(1))
        # openssl 3.0 binds [::] with IPV6_V6ONLY: reach it on the v6 loopback
        self.url = f"http://[::1]:{self.port}/"

    def stop(self) -> None:
        stop_pid(self.proc.pid)
        self.proc.returncode = 0
        if self.proc.stdout:
            self.proc.stdout.close()


def free_port() -> int:
    """A loopback port nobody listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A forked gevent TLS server built with forkproxy.tls on a pre-bound socket.

    Each connection: handshake, one line describing it
    (``version= reused= cipher= sni= tcb_errors= status_errors= stapled=``),
    close_notify, close.
    """

    def __init__(
        self,
        build: Callable[[], object],
    ) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                os.close(r)
                _serve(self.sock, build, w)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        self.pid = pid
        os.close(w)
        try:
            if not wait_readable(r, 15) or os.read(r, 16) != b"ready":
                stop_pid(pid)
                raise RuntimeError("TLS test server failed to start (see captured stderr)")
        finally:
            os.close(r)
        self.sock.close()

    def stop(self) -> None:
        stop_pid(self.pid)


def _serve(sock: socket.socket, build: Callable[[], object], ready_fd: int) -> None:
    import gevent
    from gevent import socket as gsocket
    from gevent.server import StreamServer

    gevent.reinit()
    ctx = build()

    def handle(conn: gsocket.socket, _addr: object) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(10)
        try:
            s = ctx.wrap_socket(conn, server_side=True)  # type: ignore[attr-defined]
        except (OSError, ssl.SSLError):
            conn.close()
            return
        try:
            tcb = getattr(ctx, "ticket_callback", None)
            scb = getattr(ctx, "status_callback", None)
            info = (
                f"version={s.version()} reused={int(s.session_reused)} "
                f"cipher={s.cipher()[0]} "
                f"tcb_errors={tcb.stats.errors if tcb else -1} "
                f"tcb_old={tcb.stats.decrypted_old if tcb else -1} "
                f"status_errors={scb.stats.errors if scb else -1} "
                f"stapled={scb.stats.stapled if scb else -1}\n"
            )
            s.sendall(info.encode())
            s.unwrap()
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            try:
                s.close()
            except OSError:
                pass

    listener = gsocket.socket(fileno=os.dup(sock.fileno()))
    sock.close()
    server = StreamServer(listener, handle)
    server.start()
    os.write(ready_fd, b"ready")
    os.close(ready_fd)
    gevent.wait()


# ---------------------------------------------------------------- s_client


@dataclass
class ClientRun:
    out: str
    rc: int

    @property
    def reused(self) -> bool:
        return bool(re.search(r"^Reused,", self.out, re.M))

    @property
    def new(self) -> bool:
        return bool(re.search(r"^New,", self.out, re.M))

    @property
    def server_line(self) -> dict[str, str]:
        m = re.search(r"^version=.*$", self.out, re.M)
        assert m, self.out
        return dict(kv.split("=", 1) for kv in m.group(0).split())

    @property
    def verified(self) -> bool:
        return "Verify return code: 0 (ok)" in self.out


def s_client(
    port: int,
    ca: Path,
    *,
    servername: str | None = "localhost",
    proto: str | None = None,
    sess_in: Path | None = None,
    sess_out: Path | None = None,
    status: bool = False,
    extra: list[str] | None = None,
    timeout: float = 15,
) -> ClientRun:
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca), "-ign_eof"]
    if servername:
        cmd += ["-servername", servername, "-verify_hostname", servername]
    else:
        cmd += ["-noservername"]
    if proto:
        cmd.append(f"-{proto}")
    if sess_in:
        cmd += ["-sess_in", str(sess_in)]
    if sess_out:
        cmd += ["-sess_out", str(sess_out)]
    if status:
        cmd.append("-status")
    cmd += extra or []
    p = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, text=True
    )
    return ClientRun(p.stdout + p.stderr, p.returncode)


def ticket_key_name(session_file: Path) -> bytes:
    """The 16-byte key name at the start of a saved session's ticket."""
    out = subprocess.run(
        ["openssl", "sess_id", "-in", str(session_file), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return last_ticket_key_name(out)


def last_ticket_key_name(text: str) -> bytes:
    """The key name of the last ``TLS session ticket:`` dump in s_client/sess_id text
    (s_client prints the session after the handshake and after each TLS 1.3 ticket)."""
    after = text.rsplit("TLS session ticket:", 1)[1]
    hexbytes: list[str] = []
    for line in after.splitlines()[1:]:
        m = re.match(r"\s*[0-9a-f]{4} - ((?:[0-9a-f]{2}[ -]+)+)", line)
        if not m:
            break
        hexbytes += re.findall(r"[0-9a-f]{2}", m.group(1))
        if len(hexbytes) >= 16:
            break
    return bytes.fromhex("".join(hexbytes[:16]))


# ---------------------------------------------------------------- in-memory handshakes


def client_context(ca: Path, *, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(ca))
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def memory_handshake(
    client: ssl.SSLContext,
    server: ssl.SSLContext,
    server_hostname: str = "localhost",
    session: ssl.SSLSession | None = None,
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A complete client/server handshake through MemoryBIOs (and the ticket read)."""
    ci, co, si, so = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(ci, co, server_hostname=server_hostname, session=session)
    s = server.wrap_bio(si, so, server_side=True)
    done_c = done_s = False
    for _ in range(30):
        if not done_c:
            try:
                c.do_handshake()
                done_c = True
            except ssl.SSLWantReadError:
                pass
        si.write(co.read())
        if not done_s:
            try:
                s.do_handshake()
                done_s = True
            except ssl.SSLWantReadError:
                pass
        ci.write(so.read())
        if done_c and done_s:
            break
    assert done_c and done_s, "handshake did not complete"
    s.write(b"x")
    ci.write(so.read())
    assert c.read(1) == b"x"  # also consumes TLS 1.3 tickets
    return c, s


class BioClient:
    """A TLS client over memory BIOs, so the test decides what goes into each send."""

    def __init__(self, port: int, ca, version: ssl.TLSVersion):
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.minimum_version = ctx.maximum_version = version
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def handshake(self, flush_last: bool = True) -> None:
        """flush_last False: the client's last handshake flight stays in the BIO, to go
        out in one send with the first request."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                self.incoming.write(self.sock.recv(65536))
        if flush_last:
            self.sock.sendall(self.outgoing.read())

    def send_records(self, *requests: bytes) -> None:
        """Each request its own TLS record, all in one send(2)."""
        for r in requests:
            self.tls.write(r)
        self.sock.sendall(self.outgoing.read())

    def read_to_close(self) -> bytes:
        out = b""
        while True:
            try:
                data = self.tls.read(65536)
                if not data:  # close_notify
                    return out
                out += data
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return out
            data = self.sock.recv(65536)  # a 10 s timeout: a stalled proxy fails the test
            if not data:
                return out
            self.incoming.write(data)

    def close(self) -> None:
        self.sock.close()

    def send_split(self, request: bytes, pause: float) -> None:
        """One request's TLS record in two sends ``pause`` apart: the server's read of
        the first part finds half a record (OpenSSL's want-read)."""
        self.tls.write(request)
        data = self.outgoing.read()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(data[:len(data) // 2])
        time.sleep(pause)
        self.sock.sendall(data[len(data) // 2:])

