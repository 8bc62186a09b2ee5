"""The TLS names of code that every config imports, bound to OpenSSL's only when the
config uses TLS (forkproxy/master/features.py). ``ssl`` or ``hashlib`` alone maps and
initialises libcrypto (~3.5 MiB per tree), so a plain-HTTP tree must import neither.

Until :func:`bind` runs, the exception classes here are placeholders that nothing raises:
the hot path names them in ``except`` clauses as ``tlsnames.SSLWantReadError``, looked up
only while an exception is matched, so a reload that turns TLS on (the master binds
before it forks the new workers) is seen by modules imported before it. The functions
forward to the TLS modules bound; they run only for TLS connections and contexts.
"""

from __future__ import annotations


class _NotLoaded(OSError):
    """Base of the placeholders: ssl is not imported, so nothing raises these."""


class SSLError(_NotLoaded):
    pass


class SSLWantReadError(SSLError):
    pass


class SSLWantWriteError(SSLError):
    pass


class SSLEOFError(SSLError):
    pass


class SSLZeroReturnError(SSLError):
    pass


class SSLCertVerificationError(SSLError):
    pass


class SSLSocket:
    """Placeholder for gevent's SSLSocket (for isinstance); no object is one."""


#: a send that took nothing: EAGAIN on plain text, SSL_write wanting the socket on TLS
WOULD_BLOCK: tuple[type[BaseException], ...] = (BlockingIOError, SSLWantWriteError,
                                                SSLWantReadError)


class OpenSSLError(RuntimeError):
    """The OpenSSL shim (forkproxy/tls/openssl.py) cannot be used safely in this process."""


class TLSHandshakeFailed(OSError):
    """The upstream's TLS handshake failed; ``detail`` says why (verification first)."""

    def __init__(self, detail: str):
        super().__init__(0, detail)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class _Unbound:
    """The operations before :func:`bind`: a clear error instead of an AttributeError."""

    def __getattr__(self, name: str):
        raise RuntimeError(f"TLS operation {name} used before the TLS feature was loaded "
                           "(forkproxy/master/features.py)")


_ops: object = _Unbound()


def bind(ssl_module, gevent_ssl_module, ops) -> None:
    """Put OpenSSL's classes in place of the placeholders and ``ops`` (a namespace with
    ``client_context``, ``listener_context``, ``ssl_pointer``, ``has_pending_function``)
    behind the forwarders. Idempotent."""
    global SSLError, SSLWantReadError, SSLWantWriteError, SSLEOFError, SSLZeroReturnError
    global SSLCertVerificationError, SSLSocket, WOULD_BLOCK, _ops
    SSLError = ssl_module.SSLError
    SSLWantReadError = ssl_module.SSLWantReadError
    SSLWantWriteError = ssl_module.SSLWantWriteError
    SSLEOFError = ssl_module.SSLEOFError
    SSLZeroReturnError = ssl_module.SSLZeroReturnError
    SSLCertVerificationError = ssl_module.SSLCertVerificationError
    SSLSocket = gevent_ssl_module.SSLSocket
    WOULD_BLOCK = (BlockingIOError, SSLWantWriteError, SSLWantReadError)
    _ops = ops


def bound() -> bool:
    return not isinstance(_ops, _Unbound)


def client_context(tls, base: str):
    """An upstream's client context (forkproxy/tls/clientcontext.py)."""
    return _ops.client_context(tls, base)


def listener_context(cfg, li: int, keystore):
    """A TLS listener's server context (forkproxy/worker/tlscontext.py)."""
    return _ops.listener_context(cfg, li, keystore)


def ssl_pointer(sslobj: object) -> int:
    """The ``SSL*`` of an ``_ssl._SSLSocket`` (forkproxy/tls/openssl.py)."""
    return _ops.ssl_pointer(sslobj)


def has_pending_function():
    """``SSL_has_pending`` as a ctypes function (forkproxy/tls/openssl.py)."""
    return _ops.has_pending_function()


def create_default_context():
    """gevent's ``ssl.create_default_context()`` (the system's CA store)."""
    return _ops.create_default_context()
