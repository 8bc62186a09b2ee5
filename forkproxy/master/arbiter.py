"""The master: a supervisor and nothing per request.

Signal handlers only queue the signal and write to a wake-up pipe (signal.set_wakeup_fd);
all work happens in the main loop, as in gunicorn's arbiter. The master owns: the config,
the listening sockets (per worker slot, see listeners.py), the worker table, the rings and
the key store (shared memory created before any fork), the generations of workers, and
the manager process (access log, metrics, admin).

State shared across fork, explicitly: listening sockets (fds), the worker table and rings
(anonymous/unlinked shared mappings), the key store (memfd), the lifeline pipe's read end,
each worker's ready pipe. Nothing else is written after fork by both sides.
"""

from __future__ import annotations

import gc
import grp
import json
import os
import pwd
import select
import signal
import sys
import time

from forkproxy import config as config_mod
from forkproxy import log as log_mod
from forkproxy.manager import discovery
from forkproxy.manager import process as manager_process
from forkproxy.master import daemon, features, prefork
from forkproxy.master.listeners import BindError, BoundListener, enable_migrate_req
from forkproxy.master.recycle import Recycler
from forkproxy.master.tickets import TicketKeys
from forkproxy.proctitle import set_name
from forkproxy.shm.health import HealthTable
from forkproxy.shm.limitzone import LimitZone
from forkproxy.shm.resolved import ResolvedTable
from forkproxy.shm.ring import Ring
from forkproxy.shm.table import M_RECYCLES_HEARTBEAT, WorkerTable
from forkproxy.worker import process as worker_process

SIGNALS = [signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
           signal.SIGUSR2, signal.SIGWINCH, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD]
READY_TIMEOUT = 30.0
INHERIT_ENV = "FORKPROXY_INHERIT"
#: the manager's key in the per-slot start-up back-off (worker slots are 0, 1, ...)
MANAGER_SLOT = -1


class TLSSetupError(Exception):
    pass


class WorkerProc:
    __slots__ = ("pid", "slot", "index", "generation", "cpu", "started", "ready", "ready_fd",
                 "retiring", "kill_at", "kind")

    def __init__(self, pid, slot, index, generation, cpu, ready_fd, kind="worker"):
        self.pid = pid
        self.slot = slot
        self.index = index
        self.generation = generation
        self.cpu = cpu
        self.started = time.monotonic()
        self.ready = False
        self.ready_fd = ready_fd
        self.retiring = False
        self.kill_at = 0.0
        self.kind = kind


class Arbiter:
    def __init__(self, cfg: config_mod.Config, log, *, ready_fd: int | None = None):
        self.cfg = cfg
        self.log = log
        self.ready_fd = ready_fd  # `forkproxy start` waits on this pipe
        self.generation = 1
        self.nworkers = config_mod.worker_count(cfg)
        self.cpus = config_mod.worker_cpus(cfg, max(self.nworkers, 64))
        self.bound: list[BoundListener] = []
        self.closing_listeners: list[BoundListener] = []
        self.workers: dict[int, WorkerProc] = {}
        self.sig_queue: list[int] = []
        # one table entry and one ring per worker index; rings are created before the
        # manager is forked, so there are enough for two generations plus TTIN headroom
        self.max_entries = max(16, 4 * self.nworkers)
        self.table = WorkerTable(self.max_entries + 1)
        # active health verdicts: written by the manager, read by the workers
        self.health = HealthTable()
        # servers found through DNS: resolved by the manager, followed by the workers
        self.resolved = ResolvedTable()
        self.free_indexes = list(range(self.max_entries - 1, -1, -1))
        self.slot_failures: dict[int, int] = {}
        self.slot_next_spawn: dict[int, float] = {}
        self.stopping: str | None = None  # "graceful" | "fast"
        self.stop_deadline = 0.0
        self.winched = False
        self.pending_generation: int | None = None
        self.pending_since = 0.0
        self.upgrade_child: int | None = None
        self.announced_ready = False
        self.pidfile = ""
        self.rings: dict[int, Ring] = {}
        self.ticket_keys: TicketKeys | None = None  # with TLS listeners and a working shim
        self.inherited_keystore_fd: int | None = None  # binary upgrade: the old master's
        self.limit_zone: LimitZone | None = None  # per-client-IP limits shared by the workers
        self.manager: WorkerProc | None = None
        # a crashed worker's ring index, resumed by its replacement: (generation, slot) -> index
        self.orphaned: dict[tuple[int, int], int] = {}
        self.uid: int | None = None  # privileges the children drop to (user/group, as root)
        self.gid: int | None = None
        self.groups: list[int] | None = None
        self.recycler = Recycler()  # [server] max_worker_rss
        self.wake_r = self.wake_w = -1  # signal wake-up pipe
        self.lifeline_r = self.lifeline_w = -1  # children see EOF when the master dies
        self.signal_handlers = {
            signal.SIGHUP: self.handle_hup, signal.SIGQUIT: self.handle_quit,
            signal.SIGTERM: self.handle_term, signal.SIGINT: self.handle_int,
            signal.SIGUSR1: self.handle_usr1, signal.SIGUSR2: self.handle_usr2,
            signal.SIGWINCH: self.handle_winch, signal.SIGTTIN: self.handle_ttin,
            signal.SIGTTOU: self.handle_ttou, signal.SIGCHLD: self.handle_chld,
        }

    @property
    def keystore(self):
        """The shared ticket key/staple store the children map (None without TLS)."""
        return self.ticket_keys.store if self.ticket_keys is not None else None

    # -- set-up ----------------------------------------------------------------------

    def _bind_all(self, cfg, reuse: dict[tuple, BoundListener]) -> list[BoundListener]:
        bound, fresh = [], []
        try:
            for lcfg in cfg.listener:
                key = config_mod.parse_listen(lcfg.listen)
                bl = reuse.pop(key, None)
                if bl is None:
                    bl = BoundListener(lcfg.listen, cfg.server.backlog)
                    fresh.append(bl)
                bl.ensure_slots(self.nworkers_for(cfg))
                bound.append(bl)
        except BindError:
            for bl in fresh:
                bl.close()
            raise
        return bound

    def nworkers_for(self, cfg) -> int:
        return config_mod.worker_count(cfg)

    def _inherited(self) -> dict[tuple, BoundListener]:
        text = os.environ.pop(INHERIT_ENV, "")
        if not text:
            return {}
        data = json.loads(text)
        out = {}
        for ltext, fds in data.get("listeners", {}).items():
            bl = BoundListener.from_fds(ltext, self.cfg.server.backlog, fds)
            out[bl.key] = bl
        if data.get("keystore_fd") is not None:
            self.inherited_keystore_fd = data["keystore_fd"]
        return out

    def _resolve_user(self) -> None:
        srv = self.cfg.server
        if not srv.user and not srv.group:
            return
        if os.getuid() != 0:
            self.log.warning("user/group set but not started as root: ignored",
                             user=srv.user, group=srv.group)
            return
        if srv.user:
            pw = pwd.getpwnam(srv.user)
            self.uid, self.gid = pw.pw_uid, pw.pw_gid
            name = pw.pw_name
        else:
            self.uid, self.gid, name = os.getuid(), os.getgid(), "root"
        if srv.group:
            self.gid = grp.getgrnam(srv.group).gr_gid
        self.groups = os.getgrouplist(name, self.gid)

    def setup(self) -> None:
        cfg = self.cfg
        inherited = self._inherited()
        self.pidfile = config_mod.pidfile_path(cfg)
        daemon.check_pidfile(self.pidfile)
        self._resolve_user()
        self.bound = self._bind_all(cfg, inherited)
        for bl in inherited.values():  # inherited but no longer configured
            bl.close()
        if not enable_migrate_req():
            self.log.info("net.ipv4.tcp_migrate_req is off: connections queued on a removed "
                          "worker slot may be reset")
        self._setup_shared()
        for index in range(self.max_entries):
            self.ring_for(index)
        self.table.set_master(os.getpid(), self.generation)
        daemon.write_pidfile(self.pidfile, os.getpid())
        # wake-up pipe for signals; handlers only queue
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        self.lifeline_r, self.lifeline_w = os.pipe2(os.O_CLOEXEC)
        # everything the children need is imported; freeze so they share these pages.
        # No gc.collect() first: the holes it frees in shared pages are where the
        # children's first allocations land, copying those pages (-0.2 MiB measured)
        _preload(cfg)
        prefork.take_free_blocks()
        gc.freeze()

    def _setup_shared(self) -> None:
        """Rings and key store: shared memory created before any fork."""
        self._setup_tls(self.cfg, self.inherited_keystore_fd)
        self._setup_http2(self.cfg)
        self._setup_limits(self.cfg)
        self.health.assign(self.cfg)
        self.resolved.assign(self.cfg)
        self._prime_resolved(self.cfg)

    def _prime_resolved(self, cfg) -> None:
        """First resolution of new DNS entries before the workers of cfg are forked
        (blocks at most [resolver] timeout, only when the config has new entries)."""
        if config_mod.uses_dns(cfg):
            discovery.prime(cfg, self.resolved, self.log)

    def _setup_limits(self, cfg, reloading: bool = False) -> None:
        """The per-client-IP limit zone (shared memory, before the workers are forked).
        Kept across reloads unless its shape changes; a generation keeps the zone it
        was forked with."""
        lim = cfg.limits
        rate, conns = bool(lim.rate), lim.per_ip_connections > 0
        z = self.limit_zone
        if z is not None and (z.slots, z.has_rate, z.has_conns) == (lim.zone_slots, rate, conns):
            return
        try:
            self.limit_zone = LimitZone.create(lim.zone_slots, self.max_entries, rate=rate,
                                               conns=conns)
        except (OSError, RuntimeError) as e:
            if not reloading:
                raise
            self.log.error("reload: cannot create the limits zone, keeping the old one",
                           error=str(e))

    def _setup_tls(self, cfg, inherited_fd) -> None:
        """Self-test the OpenSSL shim, then create (or adopt) the ticket key store."""
        tls = [lcfg.tls for lcfg in cfg.listener if lcfg.tls is not None]
        if not tls or self.ticket_keys is not None:
            return
        result = features.tls_shim().self_test()
        if not result.ok:
            if all(t.allow_degraded for t in tls):
                self.log.error("TLS DEGRADED: per-process session tickets, no OCSP stapling",
                               reason=result.message)
                return
            raise TLSSetupError(f"{result.message}; set [listener.tls] allow_degraded = true "
                                "to serve TLS without shared tickets and stapling")
        self.log.info("TLS shim self-test passed", library=result.library)
        self.ticket_keys = TicketKeys.create(cfg, self.log, inherited_fd)

    def _setup_http2(self, cfg) -> None:
        """Self-test libnghttp2 when a listener may serve HTTP/2. A listener that names
        h2 or h2c in its protocols refuses to start without it; a TLS listener's default
        then offers http/1.1 only (logged loudly)."""
        wanting = [lcfg for lcfg in cfg.listener
                   if {"h2", "h2c"} & set(config_mod.listener_protocols(lcfg))]
        if not wanting:
            return
        nghttp2 = features.http2_engine()
        try:
            version = nghttp2.self_test()
        except nghttp2.Nghttp2Unavailable as e:
            if any(lcfg.protocols is not None or (lcfg.tls is not None and lcfg.tls.alpn)
                   for lcfg in wanting):
                raise TLSSetupError(f"HTTP/2: {e}")
            self.log.error("HTTP/2 DISABLED: TLS listeners offer http/1.1 only", reason=str(e))
            return
        self.log.info("HTTP/2 engine self-test passed", library=f"libnghttp2 {version}")

    def ring_for(self, index: int) -> Ring:
        ring = self.rings.get(index)
        if ring is None:
            ring = self.rings[index] = Ring.create(self.cfg.server.ring_size)
        return ring

    def _on_signal(self, signum, frame) -> None:
        self.sig_queue.append(signum)

    # -- main loop -------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.setup()
        except (BindError, daemon.PidfileError, TLSSetupError, OSError) as e:
            msg = str(e)
            self.log.error("cannot start", error=msg)
            self._tell_starter(f"error: {msg}")
            return 1
        self.log.info("master started", pid=os.getpid(), workers=self.nworkers,
                      listeners=[f"{bl.text}" for bl in self.bound])
        self._start_manager()
        self.spawn_missing()
        try:
            while True:
                self._wait()
                self._handle_signals()
                self._reap()
                if self.stopping and self._stop_progress():
                    break
                self._maintain()
        finally:
            self._cleanup()
        return 0

    def _wait(self) -> None:
        fds = [self.wake_r] + [w.ready_fd for w in self.workers.values() if w.ready_fd >= 0]
        try:
            readable, _, _ = select.select(fds, [], [], 0.5)
        except InterruptedError:
            return
        for fd in readable:
            if fd == self.wake_r:
                try:
                    while os.read(self.wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                continue
            for w in self.workers.values():
                if w.ready_fd == fd:
                    try:
                        data = os.read(fd, 16)
                    except OSError:
                        data = b""
                    os.close(fd)
                    w.ready_fd = -1
                    if data.startswith(b"R"):
                        w.ready = True
                        self.slot_failures.pop(w.slot, None)
                    break

    def _handle_signals(self) -> None:
        """Run the queued signals' handlers in arrival order (gunicorn's arbiter style)."""
        while self.sig_queue:
            sig = self.sig_queue.pop(0)
            if sig != signal.SIGCHLD:
                self.log.info("signal", signal=signal.Signals(sig).name)
            self.signal_handlers[sig]()

    def handle_hup(self) -> None:
        """Reload: new config, new generation of workers, then the old one retires."""
        self.reload()

    def handle_quit(self) -> None:
        """Graceful stop: workers finish their requests (server.graceful_timeout)."""
        self.begin_stop("graceful")

    def handle_term(self) -> None:
        """Fast stop."""
        self.begin_stop("fast")

    def handle_int(self) -> None:
        """Fast stop (Ctrl-C in the foreground)."""
        self.begin_stop("fast")

    def handle_usr1(self) -> None:
        """Reopen the logs (logrotate): the master's, the manager's and the workers'."""
        log_mod.reopen()
        self._signal_children(signal.SIGUSR1, kinds=("manager", "worker"))

    def handle_usr2(self) -> None:
        """Binary upgrade: exec a new master that inherits the sockets and the keys."""
        self.upgrade()

    def handle_winch(self) -> None:
        """Retire every worker, keep the master (after USR2: the old master goes idle)."""
        self.winched = True
        for w in self.workers.values():
            if w.kind == "worker":
                self._retire(w)

    def handle_ttin(self) -> None:
        """One worker more."""
        self.nworkers += 1
        for bl in self.bound:
            bl.ensure_slots(self.nworkers)
        self.log.info("worker count", workers=self.nworkers)

    def handle_ttou(self) -> None:
        """One worker fewer (never below one)."""
        if self.nworkers > 1:
            self.nworkers -= 1
            for w in self.workers.values():
                if w.kind == "worker" and w.slot >= self.nworkers:
                    self._retire(w)
        self.log.info("worker count", workers=self.nworkers)

    def handle_chld(self) -> None:
        """Nothing here: the loop reaps right after the signals (_reap)."""

    def _signal_children(self, sig: int, kinds=("worker",)) -> None:
        for w in list(self.workers.values()):
            if w.kind in kinds:
                try:
                    os.kill(w.pid, sig)
                except ProcessLookupError:
                    pass

    def _retire(self, w: WorkerProc) -> None:
        if w.retiring:
            return
        w.retiring = True
        w.kill_at = time.monotonic() + self.cfg.server.graceful_timeout + 1.0
        try:
            os.kill(w.pid, signal.SIGQUIT)
        except ProcessLookupError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.upgrade_child:
                self.upgrade_child = None
                self.log.error("new master exited: upgrade rolled back",
                               status=_describe(status))
                oldbin = self.pidfile + ".oldbin"
                if os.path.exists(oldbin):
                    os.replace(oldbin, self.pidfile)
                if self.winched and not self.stopping:
                    self.winched = False
                continue
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            if w.ready_fd >= 0:
                os.close(w.ready_fd)
            if w.kind == "manager":
                self.manager = None
                if not self.stopping and not self._back_off(w, status):
                    self.log.warning("manager exited, restarting", pid=pid,
                                     status=_describe(status))
                continue
            self.table.clear(w.index)
            if self.limit_zone is not None:
                self.limit_zone.clear_column(w.index)
            expected = w.retiring or self.stopping
            if not expected and not self._back_off(w, status):
                self.log.warning("worker died, replacing it", pid=pid, slot=w.slot,
                                 status=_describe(status))
            # a crashed worker's ring is resumed by its replacement in the same slot
            if not expected:
                self._orphan_index(w)
            else:
                self._free_index(w)

    def _back_off(self, w: WorkerProc, status: int) -> bool:
        """A child that died before it was ready, or within a second of its start, failed
        at start-up: its slot (the manager's is MANAGER_SLOT) is not forked again before
        an exponential back-off (0.1 s doubling, at most 10 s; reset once a child of the
        slot is ready, and by a reload), so a crash at start-up is no fork storm.
        Returns False for a child that had been running: it is replaced at once."""
        if w.ready and time.monotonic() - w.started >= 1.0:
            return False
        n = self.slot_failures.get(w.slot, 0) + 1
        self.slot_failures[w.slot] = n
        delay = min(0.1 * (2 ** (n - 1)), 10.0)
        self.slot_next_spawn[w.slot] = time.monotonic() + delay
        where = {} if w.kind == "manager" else {"slot": w.slot}
        self.log.error(f"{w.kind} failed at start-up, backing off", pid=w.pid, **where,
                       status=_describe(status), failures=n, retry_in=round(delay, 2))
        return True

    def _orphan_index(self, w: WorkerProc) -> None:
        self.orphaned[(w.generation, w.slot)] = w.index

    def _free_index(self, w: WorkerProc) -> None:
        self.free_indexes.append(w.index)

    # -- workers ---------------------------------------------------------------------

    def spawn_missing(self) -> None:
        if self.stopping or self.winched:
            return
        gens = [self.generation] if self.pending_generation is None else [self.generation]
        now = time.monotonic()
        for gen in gens:
            have = {w.slot for w in self.workers.values()
                    if w.kind == "worker" and w.generation == gen and not w.retiring}
            for slot in range(self.nworkers):
                if slot in have:
                    continue
                if self.slot_next_spawn.get(slot, 0.0) > now:
                    continue
                self.spawn_worker(slot, gen)

    def spawn_worker(self, slot: int, generation: int) -> None:
        index = self.orphaned.pop((generation, slot), None)
        if index is None:
            if not self.free_indexes:
                self.log.error("worker table full")
                return
            index = self.free_indexes.pop()
        ring = self.ring_for(index)
        cpu = self.cpus[slot % len(self.cpus)]
        r, w = os.pipe2(os.O_CLOEXEC)
        sockets = [(li, s) for li, bl in enumerate(self.bound) for s in bl.sockets[slot]]
        pid = self._fork()
        if pid == 0:
            set_name(f"fp-worker-{slot}")
            self._child_after_fork(keep_fds={w})
            keep = {id(s) for _, s in sockets}
            for bl in self.bound + self.closing_listeners:
                for slot_socks in bl.sockets:
                    for s in slot_socks:
                        if id(s) not in keep:
                            s.close()
            spec = worker_process.WorkerSpec(
                cfg=self.cfg, slot=slot, index=index, generation=generation, cpu=cpu,
                sockets=sockets, ready_fd=w, lifeline_fd=self.lifeline_r, ring=ring,
                table=self.table, keystore=self.keystore,
                logger=log_mod.rebind("worker"), uid=self.uid, gid=self.gid,
                groups=self.groups, limit_zone=self.limit_zone, health=self.health,
                resolved=self.resolved)
            worker_process.run(spec)
            os._exit(0)
        os.close(w)
        self.table.assign(index, pid, slot, generation, cpu)
        self.workers[pid] = WorkerProc(pid, slot, index, generation, cpu, r)

    def _fork(self) -> int:
        """fork() with the master's signals blocked: the child keeps them blocked (pending,
        not lost, not fatal) until it has installed its own handlers and unblocks them."""
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        return pid

    def _child_after_fork(self, keep_fds=()) -> None:
        """Undo the master's signal set-up in a child."""
        signal.set_wakeup_fd(-1)
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        for fd in (self.wake_r, self.wake_w, self.lifeline_w):
            try:
                os.close(fd)
            except OSError:
                pass
        for w in self.workers.values():
            if w.ready_fd >= 0 and w.ready_fd not in keep_fds:
                try:
                    os.close(w.ready_fd)
                except OSError:
                    pass
        if self.ready_fd is not None:
            try:
                os.close(self.ready_fd)
            except OSError:
                pass

    def _start_manager(self) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = self._fork()
        if pid == 0:
            set_name("fp-manager")
            self._child_after_fork(keep_fds={w})
            for bl in self.bound:
                bl.close()
            spec = manager_process.ManagerSpec(
                cfg=self.cfg, table=self.table, rings=dict(self.rings), health=self.health,
                resolved=self.resolved,
                keystore=self.keystore, ready_fd=w, lifeline_fd=self.lifeline_r,
                uid=self.uid, gid=self.gid, groups=self.groups)
            manager_process.run(spec)
            os._exit(0)
        os.close(w)
        self.manager = WorkerProc(pid, MANAGER_SLOT, -1, self.generation, None, r,
                                  kind="manager")
        self.workers[pid] = self.manager

    def _maintain(self) -> None:
        now = time.monotonic()
        if self.ticket_keys is not None:
            self.ticket_keys.rotate_if_due(self.cfg, self.log,
                                           upgrading=self.upgrade_child is not None)
        if (self.manager is None and not self.stopping
                and self.slot_next_spawn.get(MANAGER_SLOT, 0.0) <= now):
            self._start_manager()
        self.spawn_missing()
        self.recycler.check(self, now)
        # a reload completes once every new-generation worker is ready
        if self.pending_generation is not None:
            gen = self.pending_generation
            new = [w for w in self.workers.values() if w.kind == "worker" and w.generation == gen]
            if len(new) >= self.nworkers and all(w.ready for w in new):
                for w in self.workers.values():
                    if w.kind == "worker" and w.generation < gen:
                        self._retire(w)
                self.pending_generation = None
                self.log.info("reload complete", generation=gen)
                daemon.sd_notify("READY=1")
            elif now - self.pending_since > READY_TIMEOUT:
                self.log.error("new generation not ready in time, old workers keep serving",
                               generation=gen)
                self.pending_since = now
        # first generation ready: tell `forkproxy start` and systemd
        if not self.announced_ready:
            ready = [w for w in self.workers.values() if w.kind == "worker" and w.ready]
            manager_ready = self.manager is None or self.manager.ready
            if len(ready) >= self.nworkers and manager_ready:
                self.announced_ready = True
                self._tell_starter("ok")
                daemon.sd_notify(f"READY=1\nMAINPID={os.getpid()}")
                self.log.info("workers ready", workers=len(ready))
        for w in list(self.workers.values()):
            if w.retiring and w.kill_at and now > w.kill_at:
                self.log.warning("worker did not stop in time, killing it", pid=w.pid)
                _kill(w.pid, signal.SIGKILL)
                w.kill_at = 0.0
            elif (w.kind == "worker" and w.ready and not w.retiring
                  and now - self.table.heartbeat(w.index) > self.cfg.server.heartbeat_timeout
                  and now - w.started > self.cfg.server.heartbeat_timeout):
                self.log.error("worker stopped heart-beating, replacing it", pid=w.pid,
                               slot=w.slot)
                self.table.count_master(M_RECYCLES_HEARTBEAT)
                w.retiring = True  # the replacement is not a crash back-off
                _kill(w.pid, signal.SIGKILL)
        # listener sockets of removed slots / listeners, once no worker can use them
        busy_slots = max([w.slot + 1 for w in self.workers.values() if w.kind == "worker"] + [0])
        target = max(self.nworkers, busy_slots)
        for bl in self.bound:
            if len(bl.sockets) > target:
                bl.trim_slots(target)
        if self.closing_listeners and not any(
            w.kind == "worker" and w.generation < self.generation for w in self.workers.values()
        ):
            for bl in self.closing_listeners:
                bl.close()
            self.closing_listeners = []

    # -- reload, upgrade, stop -------------------------------------------------------

    def reload(self) -> None:
        daemon.sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        if self.winched:
            self.winched = False
            self.log.info("HUP after WINCH: starting workers again")
        try:
            new_cfg = config_mod.load(self.cfg.path)
        except config_mod.ConfigError as e:
            self.log.error("reload failed: invalid config, keeping the running one",
                           errors=e.problems)
            self.table.count_reload(False)
            daemon.sd_notify("READY=1")
            return
        old_by_key = {bl.key: bl for bl in self.bound}
        reuse = dict(old_by_key)
        old_n = self.nworkers
        try:
            self.nworkers = config_mod.worker_count(new_cfg)
            bound = self._bind_all(new_cfg, reuse)
        except BindError as e:
            self.nworkers = old_n
            self.log.error("reload failed: cannot bind, keeping the running config",
                           error=str(e))
            self.table.count_reload(False)
            daemon.sd_notify("READY=1")
            return
        self.closing_listeners.extend(reuse.values())  # listeners no longer configured
        self.cfg = new_cfg
        features.load(new_cfg)  # before the new generation is forked
        self.cpus = config_mod.worker_cpus(new_cfg, max(self.nworkers, 64))
        self.bound = bound
        self.generation += 1
        self.table.set_master(os.getpid(), self.generation)
        self.pending_generation = self.generation
        self.pending_since = time.monotonic()
        self.slot_failures.clear()
        self.slot_next_spawn.clear()
        if self.ticket_keys is None:
            try:
                self._setup_tls(new_cfg, None)
            except TLSSetupError as e:
                self.log.error("TLS listeners added but the shim is unusable", error=str(e))
        else:
            self.ticket_keys.reload(new_cfg, self.log)
        self._setup_limits(new_cfg, reloading=True)
        try:
            self.health.assign(new_cfg)  # before the new workers and the manager read it
        except RuntimeError as e:
            self.log.error("reload: health table full, new servers have no active checks",
                           error=str(e))
        try:
            self.resolved.assign(new_cfg)  # a kept entry keeps its servers
        except RuntimeError as e:
            self.log.error("reload: resolved-servers table full, new DNS entries are not "
                           "resolved", error=str(e))
        self._prime_resolved(new_cfg)
        log_mod.setup(config_mod.log_path(new_cfg, new_cfg.log.error_log), new_cfg.log.level,
                      new_cfg.log.format)
        self.log = log_mod.rebind("master")
        self.log.info("reloading", generation=self.generation, workers=self.nworkers)
        self.table.count_reload(True)
        # the manager re-reads the config too (new access log, admin, OCSP set)
        if self.manager is not None:
            _kill(self.manager.pid, signal.SIGHUP)
        self.spawn_missing()

    def upgrade(self) -> None:
        if self.upgrade_child is not None:
            self.log.error("upgrade already in progress", pid=self.upgrade_child)
            return
        oldbin = self.pidfile + ".oldbin"
        if os.path.exists(oldbin):
            self.log.error("upgrade refused: an old master is still running", pidfile=oldbin)
            return
        listeners = {bl.text: bl.fds() for bl in self.bound}
        inherit = {"listeners": listeners}
        keep = [fd for fds in listeners.values() for slot in fds for fd in slot]
        if self.keystore is not None:
            inherit["keystore_fd"] = self.keystore.fd
            keep.append(self.keystore.fd)
        os.replace(self.pidfile, oldbin)
        pid = os.fork()
        if pid == 0:
            try:
                self._child_after_fork()
                for fd in keep:
                    os.set_inheritable(fd, True)
                env = dict(os.environ)
                env[INHERIT_ENV] = json.dumps(inherit)
                os.execve(sys.executable, [sys.executable, "-m", "forkproxy", "run", "-c",
                                           self.cfg.path], env)
            finally:
                os._exit(127)
        self.upgrade_child = pid
        self.log.info("binary upgrade: new master started", pid=pid, oldbin=oldbin)

    def begin_stop(self, mode: str) -> None:
        if self.stopping == "fast":
            return
        self.stopping = mode
        daemon.sd_notify("STOPPING=1")
        timeout = self.cfg.server.graceful_timeout if mode == "graceful" else 5.0
        self.stop_deadline = time.monotonic() + timeout + 1.0
        sig = signal.SIGQUIT if mode == "graceful" else signal.SIGTERM
        for w in self.workers.values():
            if w.kind == "worker":
                w.retiring = True
                _kill(w.pid, sig)
        if self.manager is not None and mode == "fast":
            _kill(self.manager.pid, signal.SIGTERM)
        for bl in self.bound + self.closing_listeners:
            bl.close()  # our copies: workers keep theirs until they stop accepting

    def _stop_progress(self) -> bool:
        workers = [w for w in self.workers.values() if w.kind == "worker"]
        if not workers and self.manager is not None and not self.manager.retiring:
            # workers are gone: let the manager flush the access log and exit
            self.manager.retiring = True
            _kill(self.manager.pid, signal.SIGQUIT)
        if not self.workers:
            return True
        if time.monotonic() > self.stop_deadline:
            for w in self.workers.values():
                _kill(w.pid, signal.SIGKILL)
            self.stop_deadline = time.monotonic() + 5.0
        return False

    def _cleanup(self) -> None:
        for w in list(self.workers.values()):
            _kill(w.pid, signal.SIGKILL)
        for pid in list(self.workers):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.workers.clear()
        for bl in self.bound + self.closing_listeners:
            bl.close()
        for ring in self.rings.values():
            ring.close()
        daemon.remove_pidfile(self.pidfile, os.getpid())
        daemon.remove_pidfile(self.pidfile + ".oldbin", os.getpid())
        self.log.info("master exiting")

    def _tell_starter(self, text: str) -> None:
        if self.ready_fd is None:
            return
        try:
            os.write(self.ready_fd, text.encode() + b"\n")
            os.close(self.ready_fd)
        except OSError:
            pass
        self.ready_fd = None


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def _preload(cfg) -> None:
    """Import what children use so its pages are shared (gc.freeze keeps them clean).

    What only some configs need is imported only for them (features.py: HTTP/2, TLS, DNS,
    tracing, gevent's thread pool; pyroute2 in listeners.py with interface listeners); otherwise it would be
    resident for nothing.

    The workers' and the manager's own modules are imported at the top of this module. The
    manager's are there although only the manager runs them: imported after fork they
    cost the manager ~4 MiB private (new objects fill the holes of shared pages, import
    machinery and caches are written), imported before fork ~1 MiB shared.
    """
    features.load(cfg)
    import pprint  # noqa: F401  (gevent's hub formats contexts with it)
    import traceback  # noqa: F401

    import gevent  # noqa: F401
    import gevent.event  # noqa: F401
    import gevent.server  # noqa: F401  (the manager's admin endpoint)
    import gevent.socket  # noqa: F401
    import httptools  # noqa: F401
    import msgspec  # noqa: F401
