"""ctypes shim into the libssl that CPython's ``_ssl`` links.

Why: the stdlib exposes neither session-ticket keys nor OCSP stapling. Both are reachable
through the ``SSL_CTX*`` inside a ``PySSLContext`` (first field after ``PyObject_HEAD``)
and a handful of OpenSSL 3 entry points. Everything here is verified at start by
:func:`self_test`; nothing is trusted blind (see docs/ARCHITECTURE.md, "Measured facts").

Callback rules that keep a C library calling into Python safe:
- an exception never escapes a callback (it is counted and a safe value returned);
- the ctypes callback objects live as long as the Python context (attached to it);
- per-handshake work is a dict lookup and a few C calls: the cipher is fetched once and
  the ``OSSL_PARAM`` array is built once per key.
"""

from __future__ import annotations

import _ssl
import ctypes
import hashlib
import os
import ssl
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from forkproxy import tlsnames

__all__ = [
    "OpenSSLError",
    "SelfTestResult",
    "StatusCallback",
    "TicketKeyCallback",
    "install_ocsp_status_callback",
    "install_ticket_key_callback",
    "library",
    "request_ocsp_status",
    "self_test",
    "session_timeout",
    "set_read_ahead",
    "set_session_timeout",
    "ssl_ctx_pointer",
]

KEY_RECORD = 80  # name 16 | hmac 32 | aes 32, the layout of nginx and SSL_CTRL 58/59
NAME_LEN = 16

# OpenSSL constants (ssl.h / tls1.h, stable ABI values)
_SSL_CTRL_SET_READ_AHEAD = 41
_SSL_CTRL_GET_READ_AHEAD = 40
_SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB = 63
_SSL_CTRL_SET_TLSEXT_STATUS_REQ_TYPE = 65
_SSL_CTRL_GET_TLSEXT_STATUS_REQ_OCSP_RESP = 70
_SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP = 71
_TLSEXT_STATUSTYPE_ocsp = 1
_TLS1_3_VERSION = 0x0304
SSL_TLSEXT_ERR_OK = 0
SSL_TLSEXT_ERR_NOACK = 3
_SUPPORTED_PYTHON = ((3, 11), (3, 12))

_TICKET_CB = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,  # SSL *
    ctypes.c_void_p,  # unsigned char key_name[16]
    ctypes.c_void_p,  # unsigned char iv[EVP_MAX_IV_LENGTH]
    ctypes.c_void_p,  # EVP_CIPHER_CTX *
    ctypes.c_void_p,  # EVP_MAC_CTX *
    ctypes.c_int,  # enc
)
_STATUS_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_GENERIC_CB = ctypes.CFUNCTYPE(None)


OpenSSLError = tlsnames.OpenSSLError  # there, for code that every config imports


class OSSL_PARAM(ctypes.Structure):  # noqa: N801 - OpenSSL's name
    _fields_ = [
        ("key", ctypes.c_char_p),
        ("data_type", ctypes.c_uint),
        ("data", ctypes.c_void_p),
        ("data_size", ctypes.c_size_t),
        ("return_size", ctypes.c_size_t),
    ]


# name -> (restype, argtypes); every symbol here is checked by the self-test.
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "OpenSSL_version_num": (ctypes.c_ulong, []),
    "SSL_CTX_get_options": (ctypes.c_uint64, [ctypes.c_void_p]),
    "SSL_CTX_get_verify_mode": (ctypes.c_int, [ctypes.c_void_p]),
    "SSL_CTX_set_timeout": (ctypes.c_long, [ctypes.c_void_p, ctypes.c_long]),
    "SSL_CTX_get_timeout": (ctypes.c_long, [ctypes.c_void_p]),
    "SSL_CTX_ctrl": (
        ctypes.c_long,
        [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p],
    ),
    "SSL_CTX_callback_ctrl": (ctypes.c_long, [ctypes.c_void_p, ctypes.c_int, _GENERIC_CB]),
    "SSL_CTX_set_tlsext_ticket_key_evp_cb": (ctypes.c_int, [ctypes.c_void_p, _TICKET_CB]),
    "SSL_ctrl": (ctypes.c_long, [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]),
    "SSL_get_certificate": (ctypes.c_void_p, [ctypes.c_void_p]),
    "SSL_get_SSL_CTX": (ctypes.c_void_p, [ctypes.c_void_p]),
    "SSL_has_pending": (ctypes.c_int, [ctypes.c_void_p]),
    "SSL_version": (ctypes.c_int, [ctypes.c_void_p]),
    "i2d_X509": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]),
    "RAND_bytes": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
    "CRYPTO_malloc": (ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_char_p, ctypes.c_int]),
    "CRYPTO_free": (None, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]),
    "EVP_CIPHER_fetch": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]),
    "EVP_EncryptInit_ex": (
        ctypes.c_int,
        [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p],
    ),
    "EVP_DecryptInit_ex": (
        ctypes.c_int,
        [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p],
    ),
    "EVP_MAC_CTX_set_params": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]),
    "OSSL_PARAM_construct_utf8_string": (
        OSSL_PARAM,
        [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t],
    ),
    "OSSL_PARAM_construct_octet_string": (
        OSSL_PARAM,
        [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t],
    ),
    "OSSL_PARAM_construct_end": (OSSL_PARAM, []),
}


class _Lib:
    """The resolved functions of the libssl/libcrypto pair that ``_ssl`` uses."""

    def __init__(self, path: str, handle: ctypes.CDLL) -> None:
        self.path = path
        self.handle = handle
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(handle, name)  # AttributeError names the missing symbol
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name, fn)
        self.version = int(handle.OpenSSL_version_num())
        self._aes_256_cbc: int | None = None

    def aes_256_cbc(self) -> int:
        """The fetched cipher, once per process (fetching per handshake costs a lock)."""
        if self._aes_256_cbc is None:
            c = self.EVP_CIPHER_fetch(None, b"AES-256-CBC", None)
            if not c:
                raise OpenSSLError("EVP_CIPHER_fetch(AES-256-CBC) failed")
            self._aes_256_cbc = c
        return self._aes_256_cbc

    def __getattr__(self, name: str) -> ctypes._CFuncPtr:  # for type checkers only
        raise AttributeError(name)


_lib: _Lib | None = None
_lib_error: str | None = None
_lib_lock = threading.Lock()


def _loaded_libssl_paths() -> list[str]:
    """Paths of every libssl mapped into this process (``_ssl`` is imported first)."""
    import _ssl  # noqa: F401 - makes sure its libssl is mapped

    paths: list[str] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6:
                    p = parts[5].strip()
                    if "/libssl.so" in p and p not in paths:
                        paths.append(p)
    except OSError:
        pass
    return paths


def _find_library() -> _Lib:
    candidates = _loaded_libssl_paths()
    if not candidates:
        # _ssl linked statically, or no /proc: the plain soname is only a guess and is
        # accepted below only if its version matches exactly.
        candidates = ["libssl.so.3"]
    seen: list[str] = []
    for path in candidates:
        try:
            # RTLD_NOLOAD: take the copy already mapped, never load a second OpenSSL.
            handle = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
        except OSError as e:
            seen.append(f"{path}: {e}")
            continue
        try:
            lib = _Lib(path, handle)
        except AttributeError as e:
            seen.append(f"{path}: missing symbol {e}")
            continue
        if lib.version != ssl.OPENSSL_VERSION_NUMBER:
            seen.append(
                f"{path}: version {lib.version:#x} != ssl.OPENSSL_VERSION_NUMBER "
                f"{ssl.OPENSSL_VERSION_NUMBER:#x}"
            )
            continue
        return lib
    raise OpenSSLError(
        "cannot find the libssl that _ssl links (" + "; ".join(seen or ["none mapped"]) + ")"
    )


def library() -> _Lib:
    """The shim's library, resolved once; raises :class:`OpenSSLError` if unusable."""
    global _lib, _lib_error
    if _lib is not None:
        return _lib
    with _lib_lock:
        if _lib is None:
            if _lib_error is not None:
                raise OpenSSLError(_lib_error)
            if sys.version_info[:2] not in _SUPPORTED_PYTHON:
                _lib_error = (
                    f"CPython {sys.version_info[0]}.{sys.version_info[1]} is not a supported "
                    "version (the SSLContext struct layout is pinned per version)"
                )
                raise OpenSSLError(_lib_error)
            if ssl.OPENSSL_VERSION_NUMBER < 0x30000000:
                _lib_error = f"{ssl.OPENSSL_VERSION} is older than OpenSSL 3.0"
                raise OpenSSLError(_lib_error)
            try:
                _lib = _find_library()
            except OpenSSLError as e:
                _lib_error = str(e)
                raise
    return _lib


def ssl_ctx_pointer(ctx: ssl.SSLContext) -> int:
    """The ``SSL_CTX*`` inside ``ctx``, checked against two values read through Python.

    The struct layout of ``PySSLContext`` is private to CPython; a wrong offset is caught
    here (options and verify mode must agree, also after flipping an option), before any
    write goes through the pointer.
    """
    if not isinstance(ctx, ssl.SSLContext):
        raise TypeError(f"expected an ssl.SSLContext, got {type(ctx).__name__}")
    lib = library()
    p = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not p:
        raise OpenSSLError("SSLContext holds no SSL_CTX pointer at the expected offset")

    def agrees() -> bool:
        # CPython maps SSL_VERIFY_* (NONE 0, PEER 1, PEER|FAIL_IF_NO_PEER_CERT 3) to CERT_*
        mode = {0: 0, 1: 1, 3: 2}.get(int(lib.SSL_CTX_get_verify_mode(p)) & 0x3, -1)
        return int(lib.SSL_CTX_get_options(p)) == int(ctx.options) and mode == int(ctx.verify_mode)

    if not agrees():
        raise OpenSSLError(
            "SSL_CTX pointer check failed: options/verify mode read through the offset "
            "differ from the SSLContext's (CPython struct layout changed?)"
        )
    candidates = (ssl.OP_NO_COMPRESSION, ssl.OP_CIPHER_SERVER_PREFERENCE, ssl.OP_NO_RENEGOTIATION)
    probe = next((int(o) for o in candidates if not ctx.options & o), 0)
    if probe:  # a second sample guards against a coincidental match
        ctx.options |= probe
        try:
            ok = agrees()
        finally:
            ctx.options &= ~probe
        if not ok:
            raise OpenSSLError("SSL_CTX pointer check failed after an options change")
    return p


def _keep_alive(ctx: ssl.SSLContext, obj: object) -> None:
    """Tie ``obj`` (a ctypes callback) to the Python context that owns the SSL_CTX."""
    refs = ctx.__dict__.setdefault("_forkproxy_keepalive", [])
    refs.append(obj)


def set_session_timeout(ctx: ssl.SSLContext, seconds: int) -> int:
    """Session (and so ticket) lifetime; keep it <= rotation interval x keys kept.

    Returns the previous value.
    """
    if seconds <= 0:
        raise ValueError("session timeout must be positive")
    p = ssl_ctx_pointer(ctx)
    return int(library().SSL_CTX_set_timeout(p, int(seconds)))


def set_read_ahead(ctx: ssl.SSLContext) -> bool:
    """SSL_CTX_set_read_ahead(ctx, 1), which the ssl module does not offer: OpenSSL then
    reads whatever the socket holds in one read(2) instead of a record's 5-byte header
    and then its body in two (nginx sets it on its contexts too). Returns whether it is
    on. With it, bytes may wait in OpenSSL's buffer that ``SSLObject.pending()`` does not
    count: only for connections that never wait on the socket while such bytes could be
    there (the upstream side: each response is read to its end before the next request).
    """
    lib = library()
    p = ssl_ctx_pointer(ctx)
    lib.SSL_CTX_ctrl(p, _SSL_CTRL_SET_READ_AHEAD, 1, None)
    return int(lib.SSL_CTX_ctrl(p, _SSL_CTRL_GET_READ_AHEAD, 0, None)) == 1


def ssl_pointer(sslobj: object) -> int:
    """The ``SSL*`` inside CPython's ``_ssl._SSLSocket`` (the field after the weakref to
    its socket, itself the first after ``PyObject_HEAD``), checked: OpenSSL must give the
    ``SSL_CTX`` of the object's own context (read at the offset :func:`ssl_ctx_pointer`
    checks) as this ``SSL``'s. Costs about a microsecond: once per connection."""
    if type(sslobj) is not _ssl._SSLSocket:
        raise TypeError(f"expected an _ssl._SSLSocket, got {type(sslobj).__name__}")
    lib = library()
    head = object.__basicsize__
    p = ctypes.c_void_p.from_address(id(sslobj) + head + ctypes.sizeof(ctypes.c_void_p)).value
    ctx = ctypes.c_void_p.from_address(id(sslobj.context) + head).value
    if not p or not ctx or lib.SSL_get_SSL_CTX(p) != ctx:
        raise OpenSSLError("SSL pointer check failed: the SSL read at the offset does not "
                           "belong to the object's context (CPython struct layout changed?)")
    return p


def has_pending_function() -> Callable[[int], int]:
    """``SSL_has_pending(SSL*)``: 1 if OpenSSL holds bytes of the connection not yet
    returned, decrypted or not (with read-ahead, ``SSLObject.pending()`` counts only the
    decrypted part of the current record). The ctypes function itself, for hot paths
    (~0.2 µs a call, no Python frame)."""
    return library().SSL_has_pending


def enable_server_read_ahead(ctx: ssl.SSLContext) -> bool:
    """Read-ahead on a server context whose connections check :func:`has_pending`
    before they wait on the socket: True when on. First a connection object of this
    context must pass :func:`ssl_pointer`'s check, so that no connection of it can be
    left without the check it needs."""
    try:
        probe = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
        ssl_pointer(probe._sslobj)
        return set_read_ahead(ctx)
    except (OpenSSLError, TypeError, ssl.SSLError):
        return False


def session_timeout(ctx: ssl.SSLContext) -> int:
    return int(library().SSL_CTX_get_timeout(ssl_ctx_pointer(ctx)))


# ---------------------------------------------------------------- ticket keys


class _Key:
    """One 80-byte record, prepared for the C calls (buffers kept alive here)."""

    __slots__ = ("name", "aes", "hmac", "_digest", "params")

    def __init__(self, lib: _Lib, record: bytes) -> None:
        if len(record) != KEY_RECORD:
            raise ValueError(f"ticket key record must be {KEY_RECORD} bytes, got {len(record)}")
        self.name = record[:16]
        self.hmac = ctypes.create_string_buffer(record[16:48], 32)
        self.aes = ctypes.create_string_buffer(record[48:80], 32)
        self._digest = ctypes.create_string_buffer(b"SHA256")
        params = (OSSL_PARAM * 3)()
        params[0] = lib.OSSL_PARAM_construct_utf8_string(b"digest", self._digest, 6)
        params[1] = lib.OSSL_PARAM_construct_octet_string(b"key", self.hmac, 32)
        params[2] = lib.OSSL_PARAM_construct_end()
        self.params = params


@dataclass
class TicketKeyStats:
    """Counters of one installed ticket callback (read them for metrics)."""

    encrypted: int = 0
    decrypted_current: int = 0
    decrypted_old: int = 0
    unknown: int = 0
    fallback: int = 0  # encryptions with the process-local key (provider gave nothing)
    errors: int = 0
    last_error: str = ""


class TicketKeyCallback:
    """Encrypt with the current key, decrypt with any known key.

    ``keys_provider()`` returns the 80-byte records, current first. It is called on every
    ticket operation, so it must be cheap; returning the *same* sequence object while
    nothing changed (as :meth:`forkproxy.shm.keystore.KeyStore.keys` does) lets this
    reuse its prepared keys without even hashing them.
    """

    def __init__(self, keys_provider: Callable[[], Sequence[bytes]]) -> None:
        self._lib = library()
        self._cipher = self._lib.aes_256_cbc()
        self._provider = keys_provider
        self.stats = TicketKeyStats()
        self._last: object = None
        self._prepared: dict[bytes, _Key] = {}  # full record -> prepared
        self._by_name: dict[bytes, tuple[_Key, bool]] = {}
        self._current: _Key | None = None
        # used only when the provider yields no key, so handshakes never fail for it
        self._fallback = _Key(self._lib, os.urandom(KEY_RECORD))
        self.c_callback = _TICKET_CB(self._callback)

    def _refresh(self) -> None:
        keys = self._provider()
        if keys is self._last:
            return
        prepared: dict[bytes, _Key] = {}
        by_name: dict[bytes, tuple[_Key, bool]] = {}
        for i, rec in enumerate(keys):
            rec = bytes(rec)
            k = self._prepared.get(rec) or _Key(self._lib, rec)
            prepared[rec] = k
            by_name.setdefault(k.name, (k, i == 0))
        self._prepared = prepared
        self._by_name = by_name
        self._current = next(iter(prepared.values()), None)
        self._last = keys

    def _callback(self, s: int, name: int, iv: int, cctx: int, hctx: int, enc: int) -> int:
        lib = self._lib
        try:
            try:
                self._refresh()
            except Exception as e:  # keep the last good keys
                self.stats.errors += 1
                self.stats.last_error = f"keys_provider: {e!r}"
            if enc:
                key = self._current
                if key is None:
                    key = self._fallback
                    self.stats.fallback += 1
                ctypes.memmove(name, key.name, NAME_LEN)
                if lib.RAND_bytes(iv, 16) != 1:
                    raise OpenSSLError("RAND_bytes failed")
                if lib.EVP_EncryptInit_ex(cctx, self._cipher, None, key.aes, iv) != 1:
                    raise OpenSSLError("EVP_EncryptInit_ex failed")
                if lib.EVP_MAC_CTX_set_params(hctx, key.params) != 1:
                    raise OpenSSLError("EVP_MAC_CTX_set_params failed")
                self.stats.encrypted += 1
                return 1
            found = self._by_name.get(ctypes.string_at(name, NAME_LEN))
            if found is None:
                if (
                    self._current is None
                    and ctypes.string_at(name, NAME_LEN) == self._fallback.name
                ):
                    found = (self._fallback, True)
                else:
                    self.stats.unknown += 1
                    return 0
            key, current = found
            if lib.EVP_DecryptInit_ex(cctx, self._cipher, None, key.aes, iv) != 1:
                raise OpenSSLError("EVP_DecryptInit_ex failed")
            if lib.EVP_MAC_CTX_set_params(hctx, key.params) != 1:
                raise OpenSSLError("EVP_MAC_CTX_set_params failed")
            if current:
                self.stats.decrypted_current += 1
                # TLS 1.3 tickets are single-use (RFC 8446 C.4) and OpenSSL 3.0 sends a
                # new one after a resumption only when asked to (2), unlike its built-in
                # keys; TLS 1.2 clients keep reusing theirs, so no renewal there.
                return 2 if lib.SSL_version(s) == _TLS1_3_VERSION else 1
            self.stats.decrypted_old += 1
            return 2  # accepted; OpenSSL issues a fresh ticket under the current key
        except BaseException as e:  # never unwind through OpenSSL
            try:
                self.stats.errors += 1
                self.stats.last_error = repr(e)
            except BaseException:
                pass
            # decrypt: 0 = full handshake. encrypt: 0 = no ticket (OpenSSL sends an empty
            # one in TLS 1.2); a negative value would fail the handshake.
            return 0


def install_ticket_key_callback(
    ctx: ssl.SSLContext, keys_provider: Callable[[], Sequence[bytes]]
) -> TicketKeyCallback:
    """Take over ticket encryption on ``ctx`` (the context sockets are wrapped with).

    With SNI, install on the initial context only: OpenSSL uses the session context for
    tickets even after the SNI callback switched contexts.
    """
    lib = library()
    p = ssl_ctx_pointer(ctx)
    cb = TicketKeyCallback(keys_provider)
    _keep_alive(ctx, cb)
    if lib.SSL_CTX_set_tlsext_ticket_key_evp_cb(p, cb.c_callback) != 1:
        raise OpenSSLError("SSL_CTX_set_tlsext_ticket_key_evp_cb failed")
    if ctx.options & ssl.OP_NO_TICKET:
        ctx.options &= ~ssl.OP_NO_TICKET
    return cb


# ---------------------------------------------------------------- OCSP stapling


@dataclass
class StatusStats:
    stapled: int = 0
    no_staple: int = 0
    errors: int = 0
    last_error: str = ""


_FILE = b"forkproxy"


class StatusCallback:
    """Hand OpenSSL the staple of the certificate it chose for this handshake.

    ``staple_provider(fingerprint)`` gets the SHA-256 of the chosen certificate's DER and
    returns DER bytes to staple, or None. The fingerprint of each ``X509*`` is computed
    once (certificates are never swapped inside a live context: a reload builds new
    contexts).
    """

    _MAX_CACHE = 256

    def __init__(self, staple_provider: Callable[[bytes], bytes | None]) -> None:
        self._lib = library()
        self._provider = staple_provider
        self._fingerprints: dict[int, bytes] = {}
        self.stats = StatusStats()
        self.c_callback = _STATUS_CB(self._callback)

    def fingerprint_of(self, x509: int) -> bytes:
        fp = self._fingerprints.get(x509)
        if fp is None:
            lib = self._lib
            n = lib.i2d_X509(x509, None)
            if n <= 0:
                raise OpenSSLError("i2d_X509 failed")
            buf = ctypes.create_string_buffer(n)
            out = ctypes.c_void_p(ctypes.addressof(buf))
            if lib.i2d_X509(x509, ctypes.byref(out)) != n:
                raise OpenSSLError("i2d_X509 failed")
            fp = hashlib.sha256(buf.raw).digest()
            if len(self._fingerprints) >= self._MAX_CACHE:
                self._fingerprints.clear()
            self._fingerprints[x509] = fp
        return fp

    def _callback(self, s: int, _arg: int) -> int:
        lib = self._lib
        try:
            x509 = lib.SSL_get_certificate(s)
            if not x509:
                self.stats.no_staple += 1
                return SSL_TLSEXT_ERR_NOACK
            der = self._provider(self.fingerprint_of(x509))
            if not der:
                self.stats.no_staple += 1
                return SSL_TLSEXT_ERR_NOACK
            n = len(der)
            # OpenSSL frees the staple: it must come from its allocator.
            buf = lib.CRYPTO_malloc(n, _FILE, 0)
            if not buf:
                raise MemoryError("CRYPTO_malloc failed")
            ctypes.memmove(buf, der, n)
            if lib.SSL_ctrl(s, _SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP, n, buf) != 1:
                lib.CRYPTO_free(buf, _FILE, 0)
                raise OpenSSLError("SSL_ctrl(SET_TLSEXT_STATUS_REQ_OCSP_RESP) failed")
            self.stats.stapled += 1
            return SSL_TLSEXT_ERR_OK
        except BaseException as e:  # never unwind through OpenSSL; a staple is optional
            try:
                self.stats.errors += 1
                self.stats.last_error = repr(e)
            except BaseException:
                pass
            return SSL_TLSEXT_ERR_NOACK


def install_ocsp_status_callback(
    ctx: ssl.SSLContext,
    staple_provider: Callable[[bytes], bytes | None] | StatusCallback,
) -> StatusCallback:
    """Staple on ``ctx``. With SNI, install on *every* context: OpenSSL asks the context
    the SNI callback switched to. One :class:`StatusCallback` may be shared by passing it
    instead of a provider.
    """
    lib = library()
    p = ssl_ctx_pointer(ctx)
    cb = (
        staple_provider
        if isinstance(staple_provider, StatusCallback)
        else StatusCallback(staple_provider)
    )
    _keep_alive(ctx, cb)
    generic = ctypes.cast(cb.c_callback, _GENERIC_CB)
    _keep_alive(ctx, generic)
    if lib.SSL_CTX_callback_ctrl(p, _SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB, generic) != 1:
        raise OpenSSLError("SSL_CTX_callback_ctrl(SET_TLSEXT_STATUS_REQ_CB) failed")
    return cb


# ---------------------------------------------------------------- self-test


@dataclass(frozen=True)
class SelfTestResult:
    """Outcome of :func:`self_test`; ``message`` is meant for the operator's log."""

    ok: bool
    message: str
    library: str | None = None
    version: int | None = None
    checks: tuple[str, ...] = field(default_factory=tuple)

    def __bool__(self) -> bool:
        return self.ok


def self_test(handshake: bool = True) -> SelfTestResult:
    """Is the shim safe in this process? Never raises.

    Checks: supported CPython; the mapped libssl's ``OpenSSL_version_num()`` equals
    ``ssl.OPENSSL_VERSION_NUMBER``; all symbols resolve; the ``SSL_CTX*`` offset check
    passes. With ``handshake`` (a few ms), it also runs two in-memory TLS 1.3 handshakes
    through both callbacks: the staple must arrive, and the second handshake must resume
    from a ticket the callback encrypted.
    """
    checks: list[str] = []
    try:
        lib = library()
        checks.append(f"libssl {lib.path} version {lib.version:#x} matches _ssl")
        checks.append(f"{len(_SIGNATURES)} symbols resolved")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_ctx_pointer(ctx)
        checks.append("SSL_CTX offset check passed")
        lib.aes_256_cbc()
        if handshake:
            _handshake_test()
            checks.append("in-memory handshake: ticket callback resumed, staple delivered")
        return SelfTestResult(
            True,
            f"TLS shim ok ({ssl.OPENSSL_VERSION}, {lib.path})",
            lib.path,
            lib.version,
            tuple(checks),
        )
    except Exception as e:
        path = _lib.path if _lib is not None else None
        version = _lib.version if _lib is not None else None
        return SelfTestResult(
            False,
            f"TLS shim unusable: {e} (ticket key sharing and OCSP stapling need it; "
            f"python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION})",
            path,
            version,
            tuple(checks),
        )


def request_ocsp_status(client: ssl.SSLContext) -> list[bytes]:
    """Make a *client* context ask for OCSP stapling; every staple received (b"" for
    none) is appended to the returned list. For the self-test and tests."""
    lib = library()
    p = ssl_ctx_pointer(client)
    received: list[bytes] = []

    def cb(s: int, _arg: int) -> int:
        try:
            ptr = ctypes.c_void_p()
            n = lib.SSL_ctrl(s, _SSL_CTRL_GET_TLSEXT_STATUS_REQ_OCSP_RESP, 0, ctypes.byref(ptr))
            received.append(ctypes.string_at(ptr.value, n) if n > 0 and ptr.value else b"")
        except BaseException:
            received.append(b"")
        return 1

    c_cb = _STATUS_CB(cb)
    generic = ctypes.cast(c_cb, _GENERIC_CB)
    _keep_alive(client, c_cb)
    _keep_alive(client, generic)
    if (
        lib.SSL_CTX_ctrl(p, _SSL_CTRL_SET_TLSEXT_STATUS_REQ_TYPE, _TLSEXT_STATUSTYPE_ocsp, None)
        != 1
    ):
        raise OpenSSLError("cannot request OCSP status on a client context")
    lib.SSL_CTX_callback_ctrl(p, _SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB, generic)
    return received


def _self_signed_server() -> tuple[ssl.SSLContext, bytes]:
    """A server context with a throwaway EC certificate; returns it and the cert's DER."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forkproxy-self-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # load_cert_chain wants a path: a memfd keeps the throwaway key off every disk
    fd = os.memfd_create("forkproxy-selftest", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return server, cert.public_bytes(serialization.Encoding.DER)


def _memory_handshake(client: ssl.SSLContext, server: ssl.SSLContext,
                      session: ssl.SSLSession | None) -> ssl.SSLObject:
    """One handshake between two contexts over MemoryBIOs; returns the client's end."""
    ci, co, si, so = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(ci, co, server_hostname="self.test", session=session)
    s = server.wrap_bio(si, so, server_side=True)
    done_c = done_s = False
    for _ in range(20):
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
    if not (done_c and done_s):
        raise OpenSSLError("self-test handshake did not complete")
    # TLS 1.3 tickets arrive after the handshake: let the client read them.
    try:
        c.read(1)
    except ssl.SSLWantReadError:
        pass
    return c


def _handshake_test() -> None:
    """Two MemoryBIO handshakes: full (staple + ticket) then resumed from that ticket."""
    server, cert_der = _self_signed_server()
    staple = b"forkproxy-self-test-staple"
    expected_fp = hashlib.sha256(cert_der).digest()
    keys = (os.urandom(KEY_RECORD),)
    tcb = install_ticket_key_callback(server, lambda: keys)
    scb = install_ocsp_status_callback(server, lambda fp: staple if fp == expected_fp else None)

    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    received = request_ocsp_status(client)

    first = _memory_handshake(client, server, None)
    if tcb.stats.encrypted < 1:
        raise OpenSSLError("ticket callback was not used to encrypt a ticket")
    if scb.stats.stapled != 1 or received[:1] != [staple]:
        raise OpenSSLError(f"staple not delivered ({scb.stats}, client saw {received!r})")
    second = _memory_handshake(client, server, first.session)
    if not second.session_reused or tcb.stats.decrypted_current < 1:
        raise OpenSSLError(f"resumption through the ticket callback failed ({tcb.stats})")
    if tcb.stats.errors or scb.stats.errors:
        raise OpenSSLError(f"callback errors: {tcb.stats.last_error or scb.stats.last_error}")
