"""The manager process: drains the workers' rings; owns the access log, the metrics and the
admin endpoint. Forked by the master (forkproxy/master/arbiter.py ``_start_manager``).

One gevent hub, no threads except gevent's pool for name resolution (health checks,
OCSP responders, DNS discovery). Greenlets: one collector loop per ring (collector.py),
the access log flusher, the admin servers, the lifeline watcher.

Signals from the master (handled in the hub, the work done in greenlets):

  HUP   re-read the config file (access log path/format, admin listen/token, log level)
  USR1  reopen the access log and the error log (logrotate)
  QUIT  drain every ring, flush, exit 0 (the master sends it once the workers are gone)
  TERM  the same, fast (the master's fast stop)
  INT   ignored: Ctrl-C reaches the whole process group; the master decides

The master's death (the lifeline pipe reaches EOF, or PR_SET_PDEATHSIG) is a QUIT.
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import sys
import time
from dataclasses import dataclass

import gevent
import msgspec
from gevent import socket as gsocket
from gevent.event import Event
from gevent.socket import wait_read

from forkproxy import config as config_mod
from forkproxy import log as log_mod
from forkproxy.manager import phases, rawbatch, shards, upstreams
from forkproxy.manager.accesslog import AccessLog
from forkproxy.manager.admin import HEALTHY_WITHIN, Admin
from forkproxy.manager.collector import Collector
from forkproxy.manager.discovery import Discovery
from forkproxy.manager.errorlog import TLSFailureLog
from forkproxy.manager.healthcheck import HealthChecker
from forkproxy.manager.metrics import (
    Metrics,
    Sample,
    TextWriter,
    cpu_seconds,
    rss_bytes,
    tcp_states,
)
from forkproxy.manager.records import RecordSink
from forkproxy.manager.tlsstate import TLSState, render_master
from forkproxy.manager.tracing import Tracer
from forkproxy.osutil import drop_privileges, set_pdeathsig
from forkproxy.shm.health import HealthTable
from forkproxy.shm.keystore import KeyStore
from forkproxy.shm.resolved import ResolvedTable
from forkproxy.shm.ring import Ring
from forkproxy.shm.table import WorkerTable

#: the manager's modules for configs that use HTTP/2 (gRPC health checks): the master
#: imports them before forking such configs (forkproxy/master/features.py); a reload that
#: brings HTTP/2 in loads them here
HTTP2_MODULES = ("forkproxy.manager.grpccheck",)

FLUSH_INTERVAL = 0.5
FORGET_INTERVAL = 5.0
TCP_SAMPLE_TIMEOUT = 5.0
#: fault injection for tests: "manager-startup" makes every manager crash at start-up
FAULT = os.environ.get("FORKPROXY_FAULT", "")


@dataclass(kw_only=True, frozen=True)
class ManagerSpec:
    """Everything the master hands the manager at fork (documented fork-shared state),
    as WorkerSpec does for a worker: the manager never sees the master's objects."""

    cfg: config_mod.Config
    table: WorkerTable  # the worker table: pids, heartbeats, counters
    rings: dict[int, Ring]  # ring index -> the ring the worker of that index writes
    health: HealthTable | None = None  # active health verdicts, written by the manager
    resolved: ResolvedTable | None = None  # servers found through DNS, written by the manager
    keystore: KeyStore | None = None  # ticket keys + OCSP staples (None: no TLS)
    ready_fd: int | None = None  # one byte "R" once the manager serves
    lifeline_fd: int | None = None  # EOF when the master dies
    uid: int | None = None  # privileges to drop to (None: the master was not root)
    gid: int | None = None
    groups: list[int] | None = None


class Manager:
    def __init__(self, spec: ManagerSpec, logger):
        self.spec = spec
        self.log = logger
        self.cfg = spec.cfg
        self.table = spec.table
        self.rings = dict(spec.rings)
        cfg = self.cfg
        #: the manager drains ring i when i % n_collectors == 0, its shards the others
        per = (config_mod.WORKERS_PER_COLLECTOR if rawbatch.COMPILED
               else config_mod.WORKERS_PER_COLLECTOR_PURE)
        self.n_collectors = max(1, min(config_mod.collector_count(cfg, per), len(self.rings)))
        self.shards: list[shards.Shard] = []  # forked by serve()
        self.metrics = Metrics()
        self.metrics.on_error = TLSFailureLog(logger).observe
        self.tls_state = TLSState(logger)
        self.tls_state.configure(cfg)
        self.tls_state.observe_keys(spec.keystore)
        self.tracer = Tracer(cfg.tracing, logger)
        try:
            self.accesslog = AccessLog(config_mod.log_path(cfg, cfg.log.access_log),
                                       cfg.log.format, logger, cfg.log.access_log_write_behind)
        except OSError as e:
            logger.error("cannot open the access log: access logging is off",
                         path=cfg.log.access_log, error=e.strerror)
            self.accesslog = AccessLog("off", cfg.log.format, logger)
        self.sink = RecordSink(self.metrics, self.accesslog, self.tracer)
        self.collector = Collector(shards.my_rings(self.rings, 0, self.n_collectors),
                                   self.sink.on_batch, table=self.table, logger=logger)
        self.admin = Admin(self, logger)
        self.admin_socks = None
        if cfg.admin.listen:
            try:
                self.admin_socks = Admin.bind(cfg.admin.listen)
            except Exception as e:
                logger.error("cannot listen on the admin address, will retry",
                             listen=cfg.admin.listen,
                             error=str(getattr(e, "strerror", None) or e))
        self.started = time.time()
        self.stop_mode = ""
        self.privileges_dropped = False
        self.stop_event = Event()
        self.staple_stop: Event | None = None  # stops the running OCSP fetcher
        self.checker: HealthChecker | None = None
        self.discovery: Discovery | None = None

    # -- what the admin endpoint shows ------------------------------------------------

    def gathered(self) -> tuple[Metrics, int, int]:
        """(metrics, access log lines, write errors) of the manager and its shards."""
        self.metrics.decode_errors = self.collector.decode_errors
        if not self.shards:
            return self.metrics, self.accesslog.lines, self.accesslog.errors
        total = Metrics()
        total.add(self.metrics.state())
        lines, errors = self.accesslog.lines, self.accesslog.errors
        for shard in self.shards:
            try:
                st = shard.state()
            except (OSError, EOFError, gevent.Timeout, msgspec.DecodeError) as e:
                self.log.warning("collector shard did not answer", shard=shard.index,
                                 error=str(e) or type(e).__name__)
                continue
            total.add(st.metrics)
            lines += st.log_lines
            errors += st.log_errors
        return total, lines, errors

    @property
    def ring_dropped(self) -> int:
        return sum(r.dropped for r in self.rings.values())

    def workers(self, gauges: dict | None = None) -> list[dict]:
        if gauges is None:
            gauges = self.gathered()[0].gauges
        now_mono = time.monotonic()
        now = time.time()
        out = []
        for index, e in self.table.live():
            pid = e["pid"]
            g = gauges.get(pid)
            hb = e["heartbeat"]
            out.append({
                "pid": pid,
                "slot": e["slot"],
                "index": index,
                "cpu": e["cpu"],
                "generation": e["generation"],
                "started": e["started"],
                "uptime": round(now - e["started"], 3) if e["started"] else None,
                "requests": e["requests"],
                "connections": e["connections"],
                "rss": rss_bytes(pid),
                "cpu_seconds": cpu_seconds(pid),
                "heartbeat_age": round(now_mono - hb, 3) if hb else None,
                "greenlets": g.greenlets if g is not None and g.greenlets >= 0 else None,
                "http2_connections": g.http2_connections if g is not None else 0,
                "http2_streams": g.http2_streams if g is not None else 0,
            })
        out.sort(key=lambda w: (w["generation"], w["slot"], w["pid"]))
        return out

    def worker_pids(self) -> list[int]:
        return [e["pid"] for _, e in self.table.live()]

    def status(self) -> dict:
        master_pid, generation = self.table.master()
        cfg = self.cfg
        gauges = self.gathered()[0].gauges
        return {
            "master_pid": master_pid,
            "manager_pid": os.getpid(),
            "generation": generation,
            "config": cfg.path,
            "listeners": [lcfg.listen for lcfg in cfg.listener],
            "admin": cfg.admin.listen,
            "access_log": self.accesslog.path,
            "access_log_write_behind": self.accesslog.behind.window,
            "manager_started": self.started,
            "ring_dropped": self.ring_dropped,
            "collectors": 1 + len(self.shards),
            "workers": self.workers(gauges),
            "upstreams": self.upstreams_status(gauges),
        }

    def upstreams_status(self, gauges: dict | None = None) -> dict:
        if gauges is None:
            gauges = self.gathered()[0].gauges
        return upstreams.collect(self.cfg, gauges, self.worker_pids(),
                                 self.spec.health, self.discovery)

    def healthy(self) -> bool:
        now = time.monotonic()
        return any(e["heartbeat"] and now - e["heartbeat"] < HEALTHY_WITHIN
                   for _, e in self.table.live())

    def tcp_sample(self) -> dict | None:
        """TCP sockets by state per listener port (a netlink dump on a gevent socket)."""
        listeners = []
        for lcfg in self.cfg.listener:
            try:
                listeners.append((lcfg.listen, config_mod.parse_listen(lcfg.listen).port))
            except ValueError:
                continue
        if not listeners:
            return None
        try:
            return tcp_states(listeners, gsocket.socket, timeout=TCP_SAMPLE_TIMEOUT)
        except Exception as e:
            self.log.warning("sock_diag sample failed", error=str(e))
            return None

    def metrics_text(self) -> str:
        master_pid, generation = self.table.master()
        self.metrics.forget_workers(self.worker_pids())
        m, log_lines, log_errors = self.gathered()
        workers = self.workers(m.gauges)
        sample = Sample(master_pid=master_pid, generation=generation, workers=workers,
                        ring_dropped=self.ring_dropped,
                        ring_lost=sum(r.lost for r in self.rings.values()),
                        tcp=self.tcp_sample(), access_log_lines=log_lines,
                        access_log_errors=log_errors)
        return m.render(sample) + upstreams.metrics_text(
            self.cfg, m.gauges, sample.worker_pids, self.spec.health, m.retries, m.tunnels,
            self.discovery) + self.state_metrics_text()

    def state_metrics_text(self) -> str:
        """The master's counters (worker table), TLS expiries and ticket keys
        (tlsstate.py), span export over the manager and its shards (tracing.py)."""
        w = TextWriter()
        render_master(w, self.table.master_counters(), self.cfg.server.max_worker_rss)
        self.tls_state.render_into(w, self.spec.keystore)
        counts = self.tracer.counts()
        for shard in self.shards:
            try:
                counts.add(shard.tracing())
            except (OSError, EOFError, gevent.Timeout, msgspec.DecodeError) as e:
                self.log.warning("collector shard did not answer", shard=shard.index,
                                 error=str(e) or type(e).__name__)
        counts.render_into(w)
        return w.text()

    def phases_report(self) -> dict:
        """The critical-path report over the manager's and its shards' records."""
        return phases.report(self.gathered()[0])

    # -- signals ----------------------------------------------------------------------

    def reload(self) -> None:
        try:
            # the master validated it (files included) before signalling us; certificates
            # and keys may not be readable after privileges dropped
            cfg = config_mod.load(self.cfg.path, check_files=False)
        except config_mod.ConfigError as e:
            if self.privileges_dropped and any(": (file): " in p for p in e.problems):
                # unreadable as the unprivileged user: a fresh manager forked by the master
                # starts with the master's (new) config
                self.log.info("cannot read the config file after dropping privileges: "
                              "restarting the manager to pick it up", errors=e.problems)
                self.request_stop("restart for the new config")
                return
            self.log.error("reload failed: invalid config, keeping the running one",
                           errors=e.problems)
            return
        try:
            log_mod.setup(config_mod.log_path(cfg, cfg.log.error_log), cfg.log.level,
                          cfg.log.format, "manager")
            self.log = log_mod.rebind("manager")
        except OSError as e:
            self.log.error("cannot open the new error log", error=e.strerror)
        for obj in (self.accesslog, self.admin, self.collector, self.tracer):
            obj.logger = self.log
        self.cfg = cfg
        self.tls_state.configure(cfg)
        self.tracer.configure(cfg.tracing)
        self.accesslog.reconfigure(config_mod.log_path(cfg, cfg.log.access_log), cfg.log.format,
                                   cfg.log.access_log_write_behind)
        self._tell_shards("log", self.accesslog.path, cfg.log.format,
                          int(cfg.log.access_log_write_behind))
        self._tell_shards("tracing", msgspec.to_builtins(cfg.tracing, enc_hook=float))
        self.admin.serve(cfg.admin.listen, cfg.admin.token)
        self.start_stapling()
        self.start_health_checks()
        self.start_discovery()
        self.log.info("manager reloaded", access_log=self.accesslog.path,
                      admin=cfg.admin.listen)

    def start_stapling(self) -> None:
        """OCSP stapling for the current config (restarted on reload)."""
        if self.staple_stop is not None:
            self.staple_stop.set()
        keystore = self.spec.keystore
        if keystore is None:
            return
        # imported here, not at the top: OCSP needs cryptography (~7 MiB), resident only
        # in a manager that staples (the master preloads it before fork with TLS listeners)
        from forkproxy.tls import stapling

        stop = self.staple_stop = Event()
        cfg, log = self.cfg, self.log
        gevent.spawn(self._guard, lambda: stapling.run(cfg, keystore, log, stop))

    def start_health_checks(self) -> None:
        """Active health checks for the current config (restarted on reload)."""
        if self.checker is not None:
            self.checker.stop()
        health = self.spec.health
        if health is None:
            return
        if config_mod.uses_http2(self.cfg):
            for name in HTTP2_MODULES:
                importlib.import_module(name)
        self.checker = HealthChecker(self.cfg, health, self.log, self.spec.resolved)
        servers, dns_entries = self.checker.start()
        if servers or dns_entries:
            self.log.info("health checks started", servers=servers, dns_entries=dns_entries)

    def start_discovery(self) -> None:
        """Servers from DNS for the current config (restarted on reload; the shared
        table keeps the last good sets, so nothing is lost in between)."""
        previous = self.discovery
        if previous is not None:
            previous.stop()
            self.discovery = None
        if self.spec.resolved is None:
            return
        self.discovery = Discovery(self.cfg, self.spec.resolved, self.log)
        if previous is not None:
            self.discovery.carry_over(previous)
        n = self.discovery.start()
        if n:
            self.log.info("DNS discovery started", entries=n)

    def start_shards(self, ready_w: int | None) -> None:
        """Fork the collector shards (before the hub runs anything); they close what is
        the manager's alone: the ready and lifeline pipes, the access log, admin sockets."""
        if self.n_collectors == 1:
            return
        spec, cfg = self.spec, self.cfg
        mine = [ready_w, spec.lifeline_fd, self.accesslog.fd if self.accesslog.own_fd else None,
                *(s.fileno() for s in self.admin_socks or ())]
        self.shards = shards.fork_shards(
            self.n_collectors, self.rings, table=self.table,
            log_path=config_mod.log_path(cfg, cfg.log.access_log), log_format=cfg.log.format,
            write_behind=cfg.log.access_log_write_behind,
            tracing=cfg.tracing, creds=(spec.uid, spec.gid, spec.groups),
            close_fds=[fd for fd in mine if fd is not None and fd >= 0])

    def _tell_shards(self, *msg) -> None:
        for shard in self.shards:
            try:
                shard.call(*msg)
            except (OSError, EOFError, gevent.Timeout) as e:
                self.log.error("collector shard did not answer", shard=shard.index, command=msg[0],
                               error=str(e) or type(e).__name__)

    def reopen(self) -> None:
        log_mod.reopen()
        self.accesslog.reopen()
        self._tell_shards("reopen")
        self.log.info("logs reopened", access_log=self.accesslog.path)

    # -- main -------------------------------------------------------------------------

    def request_stop(self, mode: str) -> None:
        if not self.stop_mode:
            self.stop_mode = mode
        self.stop_event.set()

    def _install_signals(self, early_signals) -> None:
        """The hub's handlers; then what arrived during start-up, in order."""
        gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(self._guard, self.reload))
        gevent.signal_handler(signal.SIGUSR1, lambda: gevent.spawn(self._guard, self.reopen))
        gevent.signal_handler(signal.SIGQUIT, self.request_stop, "quit")
        gevent.signal_handler(signal.SIGTERM, self.request_stop, "term")
        for sig in early_signals or ():
            if sig == signal.SIGQUIT:
                self.request_stop("quit")
            elif sig == signal.SIGTERM:
                self.request_stop("term")
            elif sig == signal.SIGHUP:
                gevent.spawn(self._guard, self.reload)
            elif sig == signal.SIGUSR1:
                gevent.spawn(self._guard, self.reopen)

    def _watch_lifeline(self) -> None:
        """The master's death (EOF on the lifeline pipe) is a stop."""
        try:
            wait_read(self.spec.lifeline_fd)
        except Exception:
            pass
        self.request_stop("master gone")

    def _flusher(self) -> None:
        last_forget = time.monotonic()
        while True:
            gevent.sleep(FLUSH_INTERVAL)
            self.accesslog.flush()
            now = time.monotonic()
            if now - last_forget > FORGET_INTERVAL:
                last_forget = now
                self.metrics.forget_workers(self.worker_pids())
                self.tls_state.observe_keys(self.spec.keystore)
            for shard in self.shards:
                if shard.exited():
                    self.log.error("collector shard exited: restarting the manager",
                                   shard=shard.index, pid=shard.pid, code=shard.exit_code)
                    self.request_stop("collector shard exited")

    def _start_services(self) -> None:
        """Admin sockets, ring collectors, span export, OCSP, health checks."""
        cfg = self.cfg
        if cfg.admin.listen:
            if self.admin_socks is not None:
                self.admin.serve(cfg.admin.listen, cfg.admin.token, self.admin_socks)
            else:
                self.admin.serve(cfg.admin.listen, cfg.admin.token)
        self.admin_socks = None
        self.collector.start()
        self.tracer.start()
        self.start_stapling()
        self.start_health_checks()
        self.start_discovery()

    def serve(self, ready_w: int | None, early_signals: list[int] | None = None,
              before_loop=None) -> None:
        """Serve until QUIT/TERM/master death. ``early_signals`` arrived during start-up;
        ``before_loop`` runs after the ready byte is written, before any greenlet runs
        (slow imports, then dropping privileges: nothing is served as root)."""
        self.start_shards(ready_w)
        self._install_signals(early_signals)
        if self.spec.lifeline_fd is not None:
            gevent.spawn(self._watch_lifeline)
        self._start_services()
        flush_g = gevent.spawn(self._flusher)
        if ready_w is not None:
            try:
                os.write(ready_w, b"R")
                os.close(ready_w)
            except OSError:
                pass
        if before_loop is not None:
            before_loop()
        self.log.info("manager started", rings=len(self.rings),
                      access_log=self.accesslog.path, admin=self.cfg.admin.listen or "off")
        self.stop_event.wait()
        # drain what the workers left, write it, go
        t0 = time.monotonic()
        self.admin.stop()
        self.collector.stop()
        flush_g.kill(block=False)
        gevent.joinall([gevent.spawn(shard.stop) for shard in self.shards])
        n = self.collector.drain_all()
        self.tracer.stop()
        self.accesslog.close()
        self.log.info("manager exiting", reason=self.stop_mode, drained=n,
                      seconds=round(time.monotonic() - t0, 3), dropped=self.ring_dropped)

    def _guard(self, fn) -> None:
        try:
            fn()
        except Exception as e:
            self.log.exception("manager signal handling failed", error=str(e))


def _preload(spec: ManagerSpec) -> None:
    """Import, while still privileged, what is otherwise imported lazily later.

    This happens after the ready byte, and before any greenlet (admin included) runs, so
    nothing is served before privileges drop. The master imported all of it before fork
    (arbiter._preload: shared pages, far cheaper than importing here), so this is a safety
    net; OCSP (cryptography, http.client) only when this manager can staple.
    """
    if spec.keystore is not None:
        import forkproxy.tls.stapling  # noqa: F401


def run(spec: ManagerSpec) -> None:
    """Manager main, in the child right after fork; never returns (exits the process)."""
    code = 0
    logger = None
    early: list[int] = []
    try:
        # until the hub's handlers are installed, stop and reload requests are queued, not
        # fatal: a QUIT right after start must still drain the rings and flush the log
        for sig in (signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, lambda signum, frame: early.append(signum))
        for sig in (signal.SIGINT, signal.SIGUSR2, signal.SIGWINCH, signal.SIGTTIN,
                    signal.SIGTTOU):
            signal.signal(sig, signal.SIG_IGN)
        # the master forked us with its signals blocked; handlers are in place now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signal.valid_signals())
        set_pdeathsig()
        if os.getppid() == 1:
            early.append(signal.SIGTERM)  # the master is already gone: drain and go
        gevent.reinit()
        gc.enable()
        logger = log_mod.rebind("manager")
        if FAULT == "manager-startup":
            raise RuntimeError("fault injected: FORKPROXY_FAULT=manager-startup")
        manager = Manager(spec, logger)

        def before_loop():
            _preload(spec)
            manager.privileges_dropped = drop_privileges(spec.uid, spec.gid, spec.groups)

        manager.serve(spec.ready_fd, early, before_loop)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    except BaseException as e:
        try:
            if logger is not None:
                logger.exception("manager crashed", error=str(e))
            else:
                print(f"forkproxy manager {os.getpid()} crashed: {e!r}", file=sys.stderr)
        finally:
            code = 3
    finally:
        try:
            sys.stdout.flush()
        except Exception:
            pass
        os._exit(code)
