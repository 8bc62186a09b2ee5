"""What the master hands a worker at fork: its :class:`WorkerSpec`."""

from __future__ import annotations


class WorkerSpec:
    """Everything the master hands a worker at fork (documented fork-shared state)."""

    def __init__(self, *, cfg, slot: int, index: int, generation: int, cpu: int | None,
                 sockets: list, ready_fd: int, lifeline_fd: int, ring=None, table=None,
                 keystore=None, logger=None, uid=None, gid=None, groups=None,
                 limit_zone=None, health=None, resolved=None):
        self.cfg = cfg
        self.slot = slot
        self.index = index  # worker-table entry / ring number
        self.generation = generation
        self.cpu = cpu
        self.sockets = sockets  # [(listener_index, socket)] for this slot
        self.ready_fd = ready_fd
        self.lifeline_fd = lifeline_fd
        self.ring = ring
        self.table = table
        self.keystore = keystore
        self.logger = logger
        self.uid = uid
        self.gid = gid
        self.groups = groups
        self.limit_zone = limit_zone  # per-client-IP limits (forkproxy.shm.limitzone)
        self.health = health  # active health verdicts (forkproxy.shm.health), read-only
        self.resolved = resolved  # servers found through DNS (forkproxy.shm.resolved), read-only
