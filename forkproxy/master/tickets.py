"""The master's side of TLS session tickets: one key store for the instance (memfd
shared memory, read lock-free by every worker), rotated on a timer or loaded from
`ticket_key_file`, inherited by a new master on binary upgrade so that no client falls
back to a full handshake because of a reload or an upgrade."""

from __future__ import annotations

import time

from forkproxy import config as config_mod
from forkproxy.shm.keystore import KeyFileError, KeyStore, keys_to_keep, load_ticket_key_file


def tls_listeners(cfg) -> list:
    return [lcfg.tls for lcfg in cfg.listener if lcfg.tls is not None]


def rotation_interval(cfg) -> float:
    return min((t.ticket_key_rotation for t in tls_listeners(cfg)), default=3600.0)


def ticket_lifetime(cfg) -> int:
    """Ticket lifetime = two rotation intervals (two previous keys are kept to cover it):
    a ticket issued just after a rotation still resumes after the next one."""
    return max(1, int(2 * rotation_interval(cfg)))


def key_file(cfg) -> str:
    files = [t.ticket_key_file for t in tls_listeners(cfg) if t.ticket_key_file]
    if not files:
        return ""
    base = config_mod.config_dir(cfg)
    return config_mod.resolve_path(files[0], base)


def staple_slot_count(cfg) -> int:
    return sum(len(t.certificates) for t in tls_listeners(cfg))


def create_keystore(arbiter, inherited_fd: int | None) -> KeyStore:
    cfg = arbiter.cfg
    if inherited_fd is not None:
        store = KeyStore.from_fd(inherited_fd)
        arbiter.log.info("ticket keys inherited from the previous master",
                         keys=len(store.keys()))
    else:
        store = KeyStore.create(max_keys=8, slots=max(16, staple_slot_count(cfg)))
    arbiter.keystore = store
    arbiter.next_rotation = time.monotonic() + rotation_interval(cfg)
    if not store.keys() or key_file(cfg):
        load_keys(arbiter, initial=not store.keys())
    return store


def load_keys(arbiter, initial: bool = False) -> None:
    """Keys from ticket_key_file if configured, else a fresh random key (first start)."""
    store = arbiter.keystore
    path = key_file(arbiter.cfg)
    if path:
        try:
            store.set_keys(load_ticket_key_file(path))
            arbiter.log.info("ticket keys loaded", file=path, keys=len(store.keys()))
        except (KeyFileError, OSError) as e:
            arbiter.log.error("ticket key file unusable, keeping the current keys",
                              file=path, error=str(e))
            if not store.keys():
                store.rotate()
    elif initial:
        store.rotate()


def reload_keystore(arbiter) -> None:
    """HUP: the keys stay (that is the point); a key file is re-read."""
    if key_file(arbiter.cfg):
        load_keys(arbiter)


def rotate_if_due(arbiter) -> None:
    """Called from the master's loop. Not while a new master (upgrade) owns the keys."""
    store = arbiter.keystore
    if store is None or key_file(arbiter.cfg) or arbiter.upgrade_child is not None:
        return
    now = time.monotonic()
    if now < arbiter.next_rotation:
        return
    interval = rotation_interval(arbiter.cfg)
    keep = keys_to_keep(ticket_lifetime(arbiter.cfg), interval)
    name = store.rotate(keep=keep)
    arbiter.next_rotation = now + interval
    arbiter.log.info("ticket key rotated", key_name=name.hex()[:8], keys=len(store.keys()),
                     generation=store.generation())
