"""TLS session-ticket policy derived from the config: how often the keys rotate, how long
a ticket lives, where a fixed key file is. The master's key store (master/tickets.py)
and the workers' contexts (worker/tls.py) must agree on these, so they live once here."""

from __future__ import annotations

from forkproxy import config as config_mod

DEFAULT_ROTATION = 3600.0


def tls_listeners(cfg) -> list:
    return [lcfg.tls for lcfg in cfg.listener if lcfg.tls is not None]


def rotation_interval(cfg) -> float:
    return min((t.ticket_key_rotation for t in tls_listeners(cfg)), default=DEFAULT_ROTATION)


def ticket_lifetime(cfg) -> int:
    """Ticket lifetime = two rotation intervals (two previous keys are kept to cover it):
    a ticket issued just after a rotation still resumes after the next one."""
    return max(1, int(2 * rotation_interval(cfg)))


def key_file(cfg) -> str:
    """The configured ticket_key_file, resolved ("" = keys are generated and rotated)."""
    files = [t.ticket_key_file for t in tls_listeners(cfg) if t.ticket_key_file]
    if not files:
        return ""
    return config_mod.resolve_path(files[0], config_mod.config_dir(cfg))


def staple_slot_count(cfg) -> int:
    return sum(len(t.certificates) for t in tls_listeners(cfg))
