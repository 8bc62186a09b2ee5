"""OCSP responses for stapling: fetch (master/manager side), verify, cache, schedule.

Why here and not in the workers: a worker only copies published bytes into a handshake.
Everything that can be slow or wrong (network, parsing, signature checks) happens in one
process, and only a response that passed every check is ever published. No valid
response means no staple, never a failed handshake, never a stale or wrong staple.

The sans-socket parts (:func:`build_request`, :func:`verify_response`,
:func:`refresh_time`, :class:`Backoff`) take bytes and times; :func:`post` is the only
network call and uses ``gevent.socket`` so it can run in a greenlet (it also works
outside a gevent loop, blocking the caller).
"""

from __future__ import annotations

import datetime
import http.client
import os
import random
import socket
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

__all__ = [
    "Backoff",
    "OCSPError",
    "OCSPResult",
    "OCSPUpdater",
    "StapleSource",
    "build_request",
    "load_chain",
    "post",
    "refresh_time",
    "responder_url",
    "verify_response",
]

MAX_RESPONSE = 64 * 1024
CLOCK_SKEW = 300.0  # seconds a responder's clock may run ahead of ours
NO_NEXT_UPDATE_VALIDITY = 3600.0  # a response without nextUpdate is trusted this long
_RSA_PSS_OID = "1.2.840.113549.1.1.10"


class OCSPError(Exception):
    """Fetching or verifying failed; ``str()`` is the reason for logs and metrics."""


@dataclass(frozen=True)
class OCSPResult:
    """One attempt's outcome. ``der`` is set only for a verified GOOD response.

    status: ``good``, ``revoked``, ``unknown`` (the responder does not know the cert),
    ``invalid`` (bad response: signature, issuer, serial, times), ``unavailable``
    (network or responder error: retry), ``unsupported`` (no responder URL, no issuer).
    """

    status: str
    reason: str
    der: bytes | None = None
    this_update: float | None = None
    next_update: float | None = None  # the staple's expiry (unix time)
    source: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "good" and self.der is not None


def _ts(d: datetime.datetime | None) -> float | None:
    return None if d is None else d.timestamp()


# ---------------------------------------------------------------- certificates


def load_chain(cert_path: str) -> list[x509.Certificate]:
    """All certificates of a PEM file, leaf first."""
    with open(cert_path, "rb") as f:
        data = f.read()
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise OCSPError(f"{cert_path}: no PEM certificate: {e}")
    return certs


def find_issuer(
    leaf: x509.Certificate, candidates: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    """The candidate that signed ``leaf`` (name match and a valid signature)."""
    for c in candidates:
        if c.subject != leaf.issuer:
            continue
        try:
            leaf.verify_directly_issued_by(c)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        return c
    return None


def responder_url(cert: x509.Certificate) -> str | None:
    """The first http OCSP URL of the certificate's Authority Information Access."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return None
    for desc in aia:
        if desc.access_method == AuthorityInformationAccessOID.OCSP and isinstance(
            desc.access_location, x509.UniformResourceIdentifier
        ):
            url = desc.access_location.value
            if url.lower().startswith("http://"):
                return url
    return None


def build_request(
    cert: x509.Certificate, issuer: x509.Certificate, algorithm: hashes.HashAlgorithm | None = None
) -> bytes:
    """DER OCSP request for one certificate (SHA-1 CertID: what every responder knows)."""
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm or hashes.SHA1())
    return builder.build().public_bytes(serialization.Encoding.DER)


# ---------------------------------------------------------------- network


class _GeventHTTPConnection(http.client.HTTPConnection):
    """http.client with a cooperative socket: safe to call from a greenlet."""

    def connect(self) -> None:
        from gevent import socket as gsocket

        self.sock = gsocket.create_connection(
            (self.host, self.port), self.timeout, self.source_address
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def post(url: str, request_der: bytes, timeout: float = 5.0) -> bytes:
    """POST an OCSP request; the response body (raises :class:`OCSPError`)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise OCSPError(f"unsupported responder URL {url!r} (http only)")
    conn = _GeventHTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        path = u.path or "/"
        if u.query:
            path += "?" + u.query
        conn.request(
            "POST",
            path,
            body=request_der,
            headers={
                "Content-Type": "application/ocsp-request",
                "Accept": "application/ocsp-response",
                "Connection": "close",
            },
        )
        resp = conn.getresponse()
        body = resp.read(MAX_RESPONSE + 1)
        if resp.status != 200:
            raise OCSPError(f"responder {url} answered HTTP {resp.status}")
        if len(body) > MAX_RESPONSE:
            raise OCSPError(f"responder {url} sent more than {MAX_RESPONSE} bytes")
        return body
    except OCSPError:
        raise
    except (OSError, http.client.HTTPException) as e:
        raise OCSPError(f"responder {url} unreachable: {e or type(e).__name__}")
    finally:
        conn.close()


# ---------------------------------------------------------------- verification


def _verify_signature(key: object, signature: bytes, data: bytes, resp: ocsp.OCSPResponse) -> None:
    algo = resp.signature_hash_algorithm
    if isinstance(key, rsa.RSAPublicKey):
        if resp.signature_algorithm_oid.dotted_string == _RSA_PSS_OID:
            raise OCSPError("RSA-PSS signed OCSP responses are not supported")
        key.verify(signature, data, padding.PKCS1v15(), algo)  # type: ignore[arg-type]
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, data, ec.ECDSA(algo))  # type: ignore[arg-type]
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        key.verify(signature, data)
    else:
        raise OCSPError(f"unsupported responder key type {type(key).__name__}")


def _key_hash(cert: x509.Certificate) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def _is_responder(resp: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    if resp.responder_name is not None:
        return resp.responder_name == cert.subject
    return resp.responder_key_hash == _key_hash(cert)


def _signer(resp: ocsp.OCSPResponse, issuer: x509.Certificate, now: float) -> x509.Certificate:
    """The issuer itself, or a delegated responder certificate it issued for OCSP."""
    if _is_responder(resp, issuer):
        return issuer
    for c in resp.certificates:
        if not _is_responder(resp, c):
            continue
        try:
            c.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise OCSPError("delegated responder certificate is not issued by the issuer")
        try:
            eku = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise OCSPError("delegated responder certificate lacks the OCSP signing EKU")
        if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
            raise OCSPError("delegated responder certificate lacks the OCSP signing EKU")
        if not c.not_valid_before_utc.timestamp() <= now <= c.not_valid_after_utc.timestamp():
            raise OCSPError("delegated responder certificate is outside its validity")
        return c
    raise OCSPError("response signed by neither the issuer nor a responder it authorised")


def verify_response(
    der: bytes,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    now: float | None = None,
    source: str = "",
) -> OCSPResult:
    """Check a DER response for ``cert``; never raises for a bad response.

    Checks: successful response; a single response for this issuer and serial; signed
    by the issuer or by a delegated responder (issued by the issuer, OCSP signing EKU);
    thisUpdate not in the future (``CLOCK_SKEW``), nextUpdate not passed; status.
    """
    now = time.time() if now is None else now
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError as e:
        return OCSPResult("invalid", f"unparsable OCSP response: {e}", source=source)
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return OCSPResult(
            "unavailable", f"responder status {resp.response_status.name.lower()}", source=source
        )
    try:
        signer = _signer(resp, issuer, now)
        try:
            _verify_signature(signer.public_key(), resp.signature, resp.tbs_response_bytes, resp)
        except InvalidSignature:
            raise OCSPError("bad signature on OCSP response")
        single = None
        for s in resp.responses:
            if s.serial_number != cert.serial_number:
                continue
            want = ocsp.load_der_ocsp_request(build_request(cert, issuer, s.hash_algorithm))
            if (s.issuer_key_hash, s.issuer_name_hash) == (
                want.issuer_key_hash,
                want.issuer_name_hash,
            ):
                single = s
                break
        if single is None:
            raise OCSPError("response is not about this certificate (issuer/serial mismatch)")
        this_update = single.this_update_utc.timestamp()
        next_update = _ts(single.next_update_utc)
        if this_update > now + CLOCK_SKEW:
            raise OCSPError("response thisUpdate is in the future")
        if next_update is None:
            next_update = this_update + NO_NEXT_UPDATE_VALIDITY
        if next_update <= now:
            raise OCSPError("response expired (nextUpdate passed)")
    except OCSPError as e:
        return OCSPResult("invalid", str(e), source=source)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        return OCSPResult("invalid", f"cannot verify OCSP response: {e}", source=source)

    status = single.certificate_status
    if status == ocsp.OCSPCertStatus.GOOD:
        return OCSPResult("good", "good", der, this_update, next_update, source)
    if status == ocsp.OCSPCertStatus.REVOKED:
        when = single.revocation_time_utc
        return OCSPResult(
            "revoked",
            f"certificate revoked at {when.isoformat() if when else '?'}",
            None,
            this_update,
            next_update,
            source,
        )
    return OCSPResult("unknown", "responder does not know this certificate", source=source)


# ---------------------------------------------------------------- scheduling


def refresh_time(
    result: OCSPResult, now: float, rng: random.Random | None = None, min_delay: float = 5.0
) -> float:
    """When to fetch again after a good response: about half its validity (jittered
    +-10% of validity so many hosts do not hit a responder together), always before
    it expires."""
    assert result.this_update is not None and result.next_update is not None
    rng = rng or random
    validity = max(0.0, result.next_update - result.this_update)
    at = result.this_update + validity / 2 + rng.uniform(-0.1, 0.1) * validity
    at = min(at, result.next_update - 0.1 * validity)
    return max(at, now + min_delay)


class Backoff:
    """Retry delays after failures: exponential from ``base`` to ``cap``, full jitter
    in the upper half so retries spread but never come back too fast."""

    def __init__(
        self, base: float = 30.0, cap: float = 3600.0, rng: random.Random | None = None
    ) -> None:
        self.base, self.cap = base, cap
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        d = min(self.cap, self.base * (2**self.failures))
        self.failures += 1
        return self._rng.uniform(d / 2, d)

    def reset(self) -> None:
        self.failures = 0


# ---------------------------------------------------------------- one certificate


class StapleSource:
    """Keeps the staple of one certificate fresh; call :meth:`refresh` when due.

    ``current`` is the last verified GOOD response; it is served until its nextUpdate
    even if later fetches fail (it is neither stale nor wrong until then), and dropped at
    once when the responder says revoked/unknown.
    """

    def __init__(
        self,
        cert_path: str,
        *,
        responder: str | None = None,
        issuer_path: str | None = None,
        timeout: float = 5.0,
        cache: bool = True,
        fetch: Callable[[str, bytes, float], bytes] = post,
        rng: random.Random | None = None,
    ) -> None:
        self.cert_path = cert_path
        self.cache_path = cert_path + ".ocsp" if cache else None
        self.timeout = timeout
        self._fetch = fetch
        self._rng = rng or random.Random()
        self.backoff = Backoff(rng=self._rng)
        self.current: OCSPResult | None = None
        self.last: OCSPResult | None = None
        self.next_attempt = 0.0
        self.setup_error: str | None = None
        self.cert: x509.Certificate | None = None
        self.issuer: x509.Certificate | None = None
        self.url: str | None = None
        try:
            chain = load_chain(cert_path)
            self.cert = chain[0]
            candidates = chain[1:]
            if issuer_path:
                candidates = load_chain(issuer_path) + candidates
            self.issuer = find_issuer(self.cert, candidates)
            self.url = responder or responder_url(self.cert)
            if self.issuer is None:
                self.setup_error = "issuer certificate not found in the chain file"
            elif self.url is None:
                self.setup_error = "certificate names no OCSP responder (AIA)"
        except (OSError, OCSPError) as e:
            self.setup_error = str(e)

    @property
    def enabled(self) -> bool:
        return self.setup_error is None

    def staple(self, now: float | None = None) -> tuple[bytes, float] | None:
        """(DER, expires) to publish, or None."""
        now = time.time() if now is None else now
        c = self.current
        if (
            c is not None
            and c.der is not None
            and c.next_update is not None
            and now < c.next_update
        ):
            return c.der, c.next_update
        return None

    def load_cache(self, now: float | None = None) -> OCSPResult | None:
        """Reuse ``<cert>.ocsp`` at start if it still verifies and has not expired."""
        if not self.enabled or self.cache_path is None:
            return None
        now = time.time() if now is None else now
        try:
            with open(self.cache_path, "rb") as f:
                der = f.read(MAX_RESPONSE + 1)
        except OSError:
            return None
        assert self.cert is not None and self.issuer is not None
        res = verify_response(der, self.cert, self.issuer, now, source=self.cache_path)
        if res.ok:
            self.current = res
            self.last = res
            self.next_attempt = refresh_time(res, now, self._rng)
            return res
        return None

    def refresh(self, now: float | None = None) -> OCSPResult:
        """Fetch, verify, cache and schedule the next attempt (``next_attempt``)."""
        now = time.time() if now is None else now
        if not self.enabled:
            res = OCSPResult("unsupported", self.setup_error or "disabled")
            self.last = res
            self.next_attempt = float("inf")
            return res
        assert self.cert is not None and self.issuer is not None and self.url is not None
        try:
            der = self._fetch(self.url, build_request(self.cert, self.issuer), self.timeout)
            res = verify_response(der, self.cert, self.issuer, time.time(), source=self.url)
        except OCSPError as e:
            res = OCSPResult("unavailable", str(e), source=self.url)
        self.last = res
        if res.ok:
            self.current = res
            self.backoff.reset()
            self.next_attempt = refresh_time(res, now, self._rng)
            self._save(res.der or b"")
        else:
            if res.status in ("revoked", "unknown"):
                self.current = None  # authoritative: stop stapling now
                self._remove_cache()
            self.next_attempt = now + self.backoff.next_delay()
            if self.current is not None and self.current.next_update is not None:
                # try again well before the response we still serve expires
                self.next_attempt = min(
                    self.next_attempt, max(now + 1.0, (now + self.current.next_update) / 2)
                )
        return res

    def _save(self, der: bytes) -> None:
        if self.cache_path is None:
            return
        tmp = f"{self.cache_path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, der)
            finally:
                os.close(fd)
            os.replace(tmp, self.cache_path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def _remove_cache(self) -> None:
        if self.cache_path is not None:
            try:
                os.unlink(self.cache_path)
            except OSError:
                pass


# ---------------------------------------------------------------- all certificates


class _Store:
    """The part of forkproxy.shm.keystore.KeyStore the updater writes (for typing)."""

    def set_staple(self, slot: int, der: bytes, expires: float) -> None: ...
    def clear_staple(self, slot: int) -> None: ...


@dataclass
class OCSPUpdater:
    """Refreshes every certificate's staple and publishes it into the key store.

    ``sources[i]`` is the certificate in slot i (its position in the config); None for
    a slot this updater leaves alone (no stapling). ``on_result(slot, result)`` sees every attempt (for
    logs and metrics). Run :meth:`start` once, then :meth:`run_due` whenever its returned
    deadline passes (or :meth:`run` in a greenlet).
    """

    store: _Store
    sources: list[StapleSource | None]
    on_result: Callable[[int, OCSPResult], None] | None = None
    published: dict[int, bytes | None] = field(default_factory=dict)

    def start(self, now: float | None = None) -> float:
        """Publish cached responses that are still valid, then fetch what is due."""
        now = time.time() if now is None else now
        for slot, src in enumerate(self.sources):
            if src is not None and src.enabled:
                res = src.load_cache(now)
                if res is not None and self.on_result:
                    self.on_result(slot, res)
        self.publish(now)
        return self.run_due(now)

    def publish(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for slot, src in enumerate(self.sources):
            if src is None:  # not managed here: never touched
                continue
            entry = src.staple(now)
            der = entry[0] if entry else None
            if der is None:
                if self.published.get(slot, b"") is not None:
                    self.store.clear_staple(slot)
            elif self.published.get(slot) != der:
                self.store.set_staple(slot, der, entry[1])  # type: ignore[index]
            self.published[slot] = der

    def run_due(self, now: float | None = None, force: bool = False) -> float:
        """Refresh the sources whose time has come; returns the next deadline."""
        now = time.time() if now is None else now
        for slot, src in enumerate(self.sources):
            if src is None or not src.enabled:
                continue
            if force or src.next_attempt <= now:
                res = src.refresh(now)
                if self.on_result:
                    self.on_result(slot, res)
        self.publish(now)
        return self.next_deadline(now)

    def next_deadline(self, now: float) -> float:
        deadlines = [s.next_attempt for s in self.sources if s is not None and s.enabled]
        # also wake when a published staple expires, to withdraw it
        deadlines += [
            e[1] for s in self.sources if s is not None and (e := s.staple(now)) is not None
        ]
        return min(deadlines, default=float("inf"))

    def run(self, stop: object) -> None:
        """Loop until ``stop`` (a ``gevent.event.Event``) is set."""
        deadline = self.start()
        while not stop.is_set():  # type: ignore[attr-defined]
            delay = max(0.0, min(deadline, time.time() + 3600.0) - time.time())
            if stop.wait(delay):  # type: ignore[attr-defined]
                break
            deadline = self.run_due()
