"""Server TLS contexts for one listener: several certificates, SNI, modern defaults.

Why this shape: OpenSSL keeps one certificate per key type in a context, so ECDSA and
RSA certificates for the same names share a context (OpenSSL picks by the client's
signature algorithms); certificates for other names get their own contexts, chosen by
an ``sni_callback`` on the initial one. Ticket keys are used from the initial context
(OpenSSL's session context), the OCSP status callback from whichever context was
switched to, so :func:`install_callbacks` puts each where OpenSSL looks for it.
"""

from __future__ import annotations

import _ssl
import hashlib
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gevent.ssl

from forkproxy.pem import check_cert_key, key_type, read_file
from forkproxy.tls import openssl

if TYPE_CHECKING:
    from cryptography import x509

# cryptography is imported where certificates are parsed, not here: the workers import
# this module whatever the config, and cryptography costs ~7 MiB (most of it its Rust
# extension) that a proxy without TLS listeners never needs. With TLS listeners the
# master imports it before fork (config check, shim self-test): shared pages.

__all__ = [
    "CIPHERS_TLS12",
    "CertInfo",
    "ServerContext",
    "build_server_context",
    "check_cert_key",
    "install_callbacks",
    "load_cert_info",
]

# Mozilla "intermediate" for TLS 1.2 (forward secrecy, AEAD only); TLS 1.3 suites are
# OpenSSL's defaults (all AEAD).
CIPHERS_TLS12 = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


@dataclass(frozen=True)
class CertInfo:
    """What the context builder needs to know about one configured certificate."""

    index: int  # position in the listener's certificate list (the staple slot order)
    cert_path: str
    key_path: str
    names: tuple[str, ...]  # DNS SANs (or the CN when there are none), lower-case
    key_type: str  # "rsa", "ec", "ed25519", ...
    fingerprint: bytes  # SHA-256 of the leaf DER: what the status callback is given


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [
            str(a.value).lower()
            for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        ]
    return tuple(dict.fromkeys(names))


def load_cert_info(index: int, cert_path: str, key_path: str) -> CertInfo:
    """Parse the leaf of ``cert_path`` (raises OSError/ValueError on bad files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    leaf = x509.load_pem_x509_certificates(read_file(cert_path))[0]
    der = leaf.public_bytes(serialization.Encoding.DER)
    return CertInfo(
        index,
        cert_path,
        key_path,
        _names(leaf),
        key_type(leaf.public_key()),
        hashlib.sha256(der).digest(),
    )


class ServerContext(gevent.ssl.SSLContext):
    """The context a listener wraps sockets with; also knows its per-name contexts.

    ``certificates``: one :class:`CertInfo` per configured certificate, in order.
    ``sni_contexts``: server name (or ``*.suffix``) -> context; ``contexts()`` lists the
    initial one plus every other context the SNI callback may switch to.
    """

    certificates: tuple[CertInfo, ...]
    sni_contexts: dict[str, ssl.SSLContext]
    ticket_callback: openssl.TicketKeyCallback | None
    status_callback: openssl.StatusCallback | None

    def contexts(self) -> list[ssl.SSLContext]:
        out: list[ssl.SSLContext] = [self]
        for c in self.sni_contexts.values():
            if all(c is not o for o in out):
                out.append(c)
        return out

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        """The context a client naming ``server_name`` is served from."""
        if not server_name:
            return self
        name = server_name.lower().rstrip(".")
        ctx = self.sni_contexts.get(name)
        if ctx is None and "." in name:
            ctx = self.sni_contexts.get("*." + name.split(".", 1)[1])
        return ctx if ctx is not None else self


def _configure(ctx: ssl.SSLContext, alpn: Sequence[str]) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options &= ~ssl.OP_NO_TICKET
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))


def _group(infos: Sequence[CertInfo]) -> tuple[list[list[CertInfo]], dict[str, int]]:
    """Certificates grouped into contexts: one per distinct set of certificates that
    cover a name, at most one certificate per key type (the first configured wins)."""
    covering: dict[str, list[CertInfo]] = {}
    for info in infos:
        for n in info.names:
            lst = covering.setdefault(n, [])
            if all(o.key_type != info.key_type for o in lst):
                lst.append(info)
    groups: list[list[CertInfo]] = []
    keys: dict[tuple[int, ...], int] = {}
    name_to_group: dict[str, int] = {}
    for name, lst in covering.items():
        k = tuple(i.index for i in lst)
        if k not in keys:
            keys[k] = len(groups)
            groups.append(lst)
        name_to_group[name] = keys[k]
    if not groups:
        return [[infos[0]]], {}
    # the first certificate's first name is served by default (no or unknown SNI)
    first = name_to_group[infos[0].names[0]] if infos[0].names else 0
    order = [first] + [g for g in range(len(groups)) if g != first]
    remap = {old: new for new, old in enumerate(order)}
    groups = [groups[g] for g in order]
    name_to_group = {n: remap[g] for n, g in name_to_group.items()}
    return groups, name_to_group


def build_server_context(
    certificates: Iterable[tuple[str, str]],
    alpn: Sequence[str] = ("http/1.1",),
) -> ServerContext:
    """A server context for ``[(cert_path, key_path), ...]`` (order = staple slots).

    TLS 1.2 and 1.3, AEAD ciphers with forward secrecy, no compression or renegotiation,
    tickets on. Raises ``ValueError`` naming the pair that cannot be loaded. Install the
    ticket and status callbacks with :func:`install_callbacks`.
    """
    pairs = list(certificates)
    if not pairs:
        raise ValueError("a TLS listener needs at least one certificate")
    infos: list[CertInfo] = []
    for i, (cert_path, key_path) in enumerate(pairs):
        err = check_cert_key(cert_path, key_path)
        if err:
            raise ValueError(err)
        infos.append(load_cert_info(i, cert_path, key_path))
    groups, name_to_group = _group(infos)

    root = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    contexts: list[ssl.SSLContext] = [root]
    for _ in groups[1:]:
        contexts.append(gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    for ctx, group in zip(contexts, groups, strict=True):
        _configure(ctx, alpn)
        for info in group:
            ctx.load_cert_chain(info.cert_path, info.key_path)
    root.certificates = tuple(infos)
    root.sni_contexts = {name: contexts[g] for name, g in name_to_group.items()}
    root.ticket_callback = None
    root.status_callback = None
    if len(contexts) > 1:
        # set through the C descriptor: gevent's wrapper only understands gevent sockets,
        # the switcher below handles those and plain SSLObjects (memory BIOs) alike
        _ssl._SSLContext.sni_callback.__set__(root, _sni_switcher(root))
    return root


def _sni_switcher(
    root: ServerContext,
) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], int | None]:
    sni = root.sni_contexts
    default = root

    def sni_callback(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        # called from OpenSSL: any exception would abort the handshake; unknown names
        # get the default certificate, as nginx does
        try:
            if server_name:
                ctx = sni.get(server_name)
                if ctx is None:
                    ctx = default.context_for(server_name)
                if ctx is not default:
                    # gevent hands us its _contextawaresock; the SSL socket is behind it
                    ref = getattr(sslobj, "_sslsock", None)
                    target = ref() if ref is not None else sslobj
                    target.context = ctx
        except Exception:
            pass
        return None

    return sni_callback


def install_callbacks(
    ctx: ServerContext,
    keys_provider: Callable[[], Sequence[bytes]] | None = None,
    staple_provider: Callable[[bytes], bytes | None] | None = None,
    session_timeout: int | None = None,
) -> None:
    """Shared ticket keys on the initial context; stapling on every context.

    ``staple_provider(fingerprint)``: see :func:`staple_provider_for`. Raises
    :class:`forkproxy.tls.openssl.OpenSSLError` if the shim is unusable.
    """
    if keys_provider is not None:
        ctx.ticket_callback = openssl.install_ticket_key_callback(ctx, keys_provider)
    if session_timeout is not None:
        for c in ctx.contexts():
            openssl.set_session_timeout(c, session_timeout)
    if staple_provider is not None:
        status = openssl.StatusCallback(staple_provider)
        for c in ctx.contexts():
            openssl.install_ocsp_status_callback(c, status)
        ctx.status_callback = status


def staple_provider_for(
    ctx: ServerContext, staple: Callable[[int], bytes | None], slot_base: int = 0
) -> Callable[[bytes], bytes | None]:
    """Map the chosen certificate's fingerprint to its slot and ask ``staple(slot)``
    (e.g. ``KeyStore.staple``). Slots are ``slot_base + position in the listener``."""
    slots = {info.fingerprint: slot_base + info.index for info in ctx.certificates}

    def provider(fingerprint: bytes) -> bytes | None:
        slot = slots.get(fingerprint)
        return None if slot is None else staple(slot)

    return provider
