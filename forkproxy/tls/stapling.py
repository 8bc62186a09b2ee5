"""OCSP stapling as run by the manager process (never a worker): one StapleSource per
configured certificate, refreshed by OCSPUpdater and published into the key store's
staple slots, which workers copy into handshakes."""

from __future__ import annotations

from forkproxy import config as config_mod
from forkproxy.tls.ocsp import OCSPUpdater, StapleSource


def staple_sources(cfg, cache: bool = True) -> list[StapleSource | None]:
    """Sources indexed by staple slot (config order over TLS listeners' certificates)."""
    return [src for _, src in _sources(cfg, cache)]


def _sources(cfg, cache: bool) -> list[tuple[str, StapleSource | None]]:
    """(config key of the certificate, its source or None when stapling is off)."""
    base = config_mod.config_dir(cfg)
    out: list[tuple[str, StapleSource | None]] = []
    for i, lcfg in enumerate(cfg.listener):
        tls = lcfg.tls
        if tls is None:
            continue
        issuer = config_mod.resolve_path(tls.ocsp_issuer, base) if tls.ocsp_issuer else None
        for j, c in enumerate(tls.certificates):
            key = f"listener[{i}].tls.certificates[{j}]"
            if not tls.ocsp_stapling:
                out.append((key, None))
                continue
            src = StapleSource(config_mod.resolve_path(c.cert, base),
                               responder=c.ocsp_responder or None, issuer_path=issuer,
                               cache=cache)
            src.backoff.base = tls.ocsp_retry
            out.append((key, src))
    return out


def stapling_warnings(cfg) -> list[str]:
    """One line per certificate that has stapling on but will never get a staple (no
    issuer certificate, no responder URL, unreadable file): what `forkproxy check` warns."""
    out = []
    for key, src in _sources(cfg, cache=False):
        if src is None or src.enabled:
            continue
        hint = ""
        if src.issuer is None and src.cert is not None:
            i = key.index(".tls.")
            hint = (f" (put the issuer after the leaf in the cert file, or set "
                    f"{key[:i]}.tls.ocsp_issuer)")
        out.append(f"{key}: OCSP stapling is on but no staple will be served: "
                   f"{src.setup_error}{hint}")
    return out


def run(cfg, keystore, log, stop) -> None:
    """Loop (in a greenlet) until `stop` is set; logs every result once."""
    sources = staple_sources(cfg)
    for src in sources:
        if src is not None and not src.enabled:
            log.warning("OCSP stapling disabled for a certificate", cert=src.cert_path,
                        reason=src.setup_error)

    def on_result(slot, result):
        src = sources[slot]
        fields = {"cert": src.cert_path if src else "", "slot": slot,
                  "status": getattr(result, "status", None),
                  "reason": getattr(result, "reason", None),
                  "next_attempt": round(src.next_attempt, 1) if src else None}
        if result.ok:
            log.info("OCSP response fetched", **fields)
        else:
            log.warning("no OCSP staple", **fields)

    updater = OCSPUpdater(keystore, sources, on_result=on_result)
    updater.run(stop)
