"""TLS facts for /metrics that no request carries: when each configured certificate
expires, when each OCSP staple expires (or that there is none), and when the session
ticket keys last changed.

Certificates are parsed when the manager starts and on each reload (not per scrape).
Staples are read from the key store's slots at scrape time. The ticket keys' change
time is observed by the manager (the key store counts changes, it has no clock): the
first observation is the manager's start, so after a manager restart the rotation
alert waits one more interval before it can fire.
"""

from __future__ import annotations

import time

from forkproxy import config as config_mod
from forkproxy.manager.metrics import TextWriter
from forkproxy.pem import cert_not_after


class TLSState:
    def __init__(self, logger=None):
        self.logger = logger
        #: (listener, cert path, first name, not after or None when unreadable)
        self.certs: list[tuple[str, str, str, float | None]] = []
        #: staple slot -> (listener, cert path), for the certificates that staple
        self.staple_slots: dict[int, tuple[str, str]] = {}
        self.rotation_interval = 0.0
        self.key_generation = -1
        self.keys_changed = 0.0

    def configure(self, cfg) -> None:
        """Read the certificates of ``cfg`` (start-up and reload)."""
        base = config_mod.config_dir(cfg)
        certs = []
        slots = {}
        slot = 0
        intervals = []
        for lcfg in cfg.listener:
            if lcfg.tls is None:
                continue
            intervals.append(lcfg.tls.ticket_key_rotation)
            for c in lcfg.tls.certificates:
                path = config_mod.resolve_path(c.cert, base)
                certs.append((lcfg.listen, path, *self._expiry(path)))
                if lcfg.tls.ocsp_stapling:
                    slots[slot] = (lcfg.listen, path)
                slot += 1
        self.certs = certs
        self.staple_slots = slots
        self.rotation_interval = min(intervals, default=0.0)

    def _expiry(self, path: str) -> tuple[str, float | None]:
        try:
            not_after, name = cert_not_after(path)
            return name, not_after
        except (OSError, ValueError) as e:
            if self.logger is not None:
                self.logger.warning("cannot read a certificate's expiry", cert=path,
                                    error=str(e))
            return "", None

    def observe_keys(self, keystore, now: float | None = None) -> None:
        """Note a change of the ticket keys (cheap: one shared word when unchanged)."""
        if keystore is None:
            return
        gen = keystore.generation()
        if gen != self.key_generation:
            self.key_generation = gen
            self.keys_changed = time.time() if now is None else now

    def render_into(self, w: TextWriter, keystore) -> None:
        w.family("forkproxy_tls_certificate_expiry_seconds", "gauge",
                 "Unix time at which each configured certificate expires (notAfter).")
        for listener, path, name, not_after in self.certs:
            if not_after is not None:
                w.sample("forkproxy_tls_certificate_expiry_seconds",
                         (("listener", listener), ("cert", path), ("name", name)), not_after)
        if keystore is None:
            return
        w.family("forkproxy_tls_ocsp_staple_expiry_seconds", "gauge",
                 "Unix time at which the OCSP staple of each stapling certificate expires "
                 "(its nextUpdate); 0 when there is no staple.")
        for slot, (listener, path) in sorted(self.staple_slots.items()):
            entry = keystore.staple_entry(slot)
            w.sample("forkproxy_tls_ocsp_staple_expiry_seconds",
                     (("listener", listener), ("cert", path)), entry[1] if entry else 0)
        self.observe_keys(keystore)
        w.family("forkproxy_tls_ticket_keys_changed_seconds", "gauge",
                 "Unix time the session ticket keys last changed (rotation or key file "
                 "load), as seen by the manager (its start time at first).")
        w.sample("forkproxy_tls_ticket_keys_changed_seconds", (), self.keys_changed)
        w.family("forkproxy_tls_ticket_key_rotation_interval_seconds", "gauge",
                 "The configured ticket_key_rotation (the shortest over TLS listeners).")
        w.sample("forkproxy_tls_ticket_key_rotation_interval_seconds", (),
                 self.rotation_interval)


def render_master(w: TextWriter, counters: dict[str, int], max_worker_rss: int) -> None:
    """The master's counters (shared worker table) and the memory limit."""
    w.family("forkproxy_config_reloads_total", "counter",
             "Configuration reloads (HUP) by result: success, or failure (invalid config, "
             "cannot bind; the running config stays).")
    w.sample("forkproxy_config_reloads_total", (("result", "success"),), counters["reloads_ok"])
    w.sample("forkproxy_config_reloads_total", (("result", "failure"),),
             counters["reloads_failed"])
    w.family("forkproxy_config_last_reload_successful", "gauge",
             "0 when the last reload failed, else 1.")
    w.sample("forkproxy_config_last_reload_successful", (),
             0 if counters["last_reload_failed"] else 1)
    w.family("forkproxy_worker_recycles_total", "counter",
             "Workers replaced by the master while running, by reason (rss: above "
             "max_worker_rss, drained gracefully; heartbeat: stuck, killed).")
    w.sample("forkproxy_worker_recycles_total", (("reason", "rss"),), counters["recycles_rss"])
    w.sample("forkproxy_worker_recycles_total", (("reason", "heartbeat"),),
             counters["recycles_heartbeat"])
    w.family("forkproxy_worker_max_resident_bytes", "gauge",
             "The configured max_worker_rss (0 = no limit).")
    w.sample("forkproxy_worker_max_resident_bytes", (), max_worker_rss)
