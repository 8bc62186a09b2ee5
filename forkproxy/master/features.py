"""The modules a config's features need, imported by the master before it forks.

Every child is forked from the master without exec and imports nothing afterwards, so a
module costs the tree once in the master's shared heap when imported before fork, and
much more when a child imports it (its new objects fill the holes of shared pages). A
module that only some configs use is imported only for them: otherwise every process
of every other config would carry it for nothing. The master calls :func:`load` at start
and on each reload, before forking the workers of the new config.
"""

from __future__ import annotations

import importlib

from forkproxy import config as config_mod
from forkproxy.manager import process as manager_process

#: where the HTTP/2 engine (libnghttp2's binding and its self-test) lives
HTTP2_ENGINE = "forkproxy.http2.nghttp2"
#: the TLS modules' binder (:func:`forkproxy.worker.tlscontext.bind`) and the OpenSSL shim
TLS_BINDER = "forkproxy.worker.tlscontext"
TLS_SHIM = "forkproxy.tls.openssl"


def uses_tls(cfg) -> bool:
    return any(lcfg.tls is not None for lcfg in cfg.listener)


def uses_tracing(cfg) -> bool:
    return bool(cfg.tracing.endpoint)


def uses_openssl(cfg) -> bool:
    """Anything that speaks TLS: a TLS listener, an upstream with ``tls`` (its requests and
    its health checks), a tracing endpoint over https."""
    return (uses_tls(cfg) or any(up.tls is not None for up in cfg.upstream.values())
            or (uses_tracing(cfg) and config_mod.parse_endpoint(cfg.tracing.endpoint).tls))


def uses_thread_pool(cfg) -> bool:
    """gevent resolves a name in the hub's thread pool, and ``create_connection`` resolves
    even an IP literal: the manager's health checks, OCSP fetches (TLS listeners), the span
    export and DNS discovery go through it. Nothing else in the tree does."""
    return (config_mod.uses_dns(cfg) or uses_tls(cfg) or uses_tracing(cfg)
            or any(up.health_check is not None for up in cfg.upstream.values()))


#: (feature, whether a config uses it, the modules it needs), with what they cost when
#: loaded for nothing (PSS of the tree at idle)
FEATURES = (
    # anything over TLS: ssl, gevent.ssl, the TLS modules, and with them libssl and
    # libcrypto (~5.6 MiB); bound into forkproxy/tlsnames.py by load()
    ("openssl", uses_openssl, ("ssl", "gevent.ssl", TLS_SHIM, TLS_BINDER)),
    # HTTP/2 listeners (a TLS listener offers h2 by default) and upstreams: the worker's
    # HTTP/2 modules, the cffi binding and libnghttp2, the manager's gRPC checks (~1 MiB)
    ("http2", config_mod.uses_http2,
     (HTTP2_ENGINE, "forkproxy.worker.h2plugin", *manager_process.HTTP2_MODULES)),
    # TLS listeners: certificates in the workers, OCSP in the manager (cryptography, ~7 MiB)
    ("tls", uses_tls, ("cryptography.hazmat.primitives.serialization", "cryptography.x509",
                       "forkproxy.tls.stapling")),
    # servers that resolve: the manager's discovery (dnspython, ~13 MiB)
    ("dns", config_mod.uses_dns, ("forkproxy.manager.dnslookup",)),
    # a tracing endpoint: the manager's span export (protobuf)
    ("tracing", uses_tracing, ("forkproxy.manager.spans",)),
    # name resolution: gevent's thread pool with concurrent.futures (~1.2 MiB)
    ("threadpool", uses_thread_pool, ("gevent.threadpool",)),
)


def load(cfg) -> list[str]:
    """Import the modules of the features cfg uses; returns those features' names."""
    used = []
    for feature, uses, modules in FEATURES:
        if uses(cfg):
            used.append(feature)
            for name in modules:
                importlib.import_module(name)
    if "openssl" in used:
        importlib.import_module(TLS_BINDER).bind()
    return used


def tls_shim():
    """The OpenSSL shim (forkproxy.tls.openssl), for the master's self-test of a config
    with TLS listeners (imported by :func:`load` already)."""
    return importlib.import_module(TLS_SHIM)


def http2_engine():
    """The HTTP/2 engine's module (forkproxy.http2.nghttp2), for the master's self-test."""
    return importlib.import_module(HTTP2_ENGINE)
