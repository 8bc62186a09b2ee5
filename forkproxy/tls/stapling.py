"""OCSP stapling as run by the manager process (never a worker): one StapleSource per
configured certificate, refreshed by OCSPUpdater and published into the key store's
staple slots, which workers copy into handshakes."""

from __future__ import annotations

from forkproxy import config as config_mod
from forkproxy.tls.ocsp import OCSPUpdater, StapleSource


def staple_sources(cfg) -> list[StapleSource | None]:
    """Sources indexed by staple slot (config order over TLS listeners' certificates)."""
    base = config_mod.config_dir(cfg)
    sources: list[StapleSource | None] = []
    for lcfg in cfg.listener:
        if lcfg.tls is None:
            continue
        for c in lcfg.tls.certificates:
            if not lcfg.tls.ocsp_stapling:
                sources.append(None)
                continue
            src = StapleSource(config_mod.resolve_path(c.cert, base),
                               responder=c.ocsp_responder or None)
            src.backoff.base = lcfg.tls.ocsp_retry
            sources.append(src)
    return sources


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
