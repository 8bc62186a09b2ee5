"""The master's side of TLS session tickets: one key store for the instance (memfd
shared memory, read lock-free by every worker), rotated on a timer or loaded from
`ticket_key_file`, inherited by a new master on binary upgrade so that no client falls
back to a full handshake because of a reload or an upgrade.

:class:`TicketKeys` is owned by the arbiter (``Arbiter.ticket_keys``); the policy it
follows (interval, lifetime, key file) is in forkproxy/tls/tickets.py."""

from __future__ import annotations

import time

from forkproxy.shm.keystore import KeyFileError, KeyStore, keys_to_keep, load_ticket_key_file
from forkproxy.tls.tickets import key_file, rotation_interval, staple_slot_count, ticket_lifetime

MAX_KEYS = 8
MIN_STAPLE_SLOTS = 16


class TicketKeys:
    """The key store and its rotation schedule. The master's logger is passed to each
    call (a reload replaces it)."""

    def __init__(self, store: KeyStore, cfg):
        self.store = store
        self.next_rotation = time.monotonic() + rotation_interval(cfg)

    @classmethod
    def create(cls, cfg, log, inherited_fd: int | None) -> TicketKeys:
        """A new store (or the previous master's, on binary upgrade) with usable keys."""
        if inherited_fd is not None:
            store = KeyStore.from_fd(inherited_fd)
            log.info("ticket keys inherited from the previous master", keys=len(store.keys()))
        else:
            store = KeyStore.create(max_keys=MAX_KEYS,
                                    slots=max(MIN_STAPLE_SLOTS, staple_slot_count(cfg)))
        keys = cls(store, cfg)
        if not store.keys() or key_file(cfg):
            keys.load(cfg, log, initial=not store.keys())
        return keys

    def load(self, cfg, log, initial: bool = False) -> None:
        """Keys from ticket_key_file if configured, else a fresh random key (first start)."""
        store = self.store
        path = key_file(cfg)
        if path:
            try:
                store.set_keys(load_ticket_key_file(path))
                log.info("ticket keys loaded", file=path, keys=len(store.keys()))
            except (KeyFileError, OSError) as e:
                log.error("ticket key file unusable, keeping the current keys",
                               file=path, error=str(e))
                if not store.keys():
                    store.rotate()
        elif initial:
            store.rotate()

    def reload(self, cfg, log) -> None:
        """HUP: the keys stay (that is the point); a key file is re-read."""
        if key_file(cfg):
            self.load(cfg, log)

    def rotate_if_due(self, cfg, log, upgrading: bool) -> None:
        """Called from the master's loop. Not while a new master (upgrade) owns the keys."""
        if upgrading or key_file(cfg):
            return
        now = time.monotonic()
        if now < self.next_rotation:
            return
        interval = rotation_interval(cfg)
        name = self.store.rotate(keep=keys_to_keep(ticket_lifetime(cfg), interval))
        self.next_rotation = now + interval
        log.info("ticket key rotated", key_name=name.hex()[:8],
                      keys=len(self.store.keys()), generation=self.store.generation())
