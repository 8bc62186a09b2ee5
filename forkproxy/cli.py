"""`forkproxy VERB`: run the master, or signal a running one through its pidfile."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from forkproxy import config as config_mod

SIGNAL_VERBS = {
    "reload": signal.SIGHUP,
    "quit": signal.SIGQUIT,
    "stop": signal.SIGTERM,
    "reopen": signal.SIGUSR1,
    "upgrade": signal.SIGUSR2,
}

DEFAULT_CONFIG = "/etc/forkproxy/forkproxy.toml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forkproxy", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)
    for verb, text in [
        ("run", "run in the foreground (Ctrl-C / TERM = fast stop)"),
        ("start", "daemonize; exit 0 once workers accept traffic"),
        ("check", "validate the config without binding"),
        ("reload", "SIGHUP: re-read the config, new workers, graceful retire"),
        ("quit", "SIGQUIT: graceful stop"),
        ("stop", "SIGTERM: fast stop"),
        ("reopen", "SIGUSR1: reopen log files"),
        ("upgrade", "SIGUSR2: start a new master with the same sockets"),
        ("status", "table of master and workers from the admin endpoint"),
        ("phases", "critical-path report: each phase's mean, sd, p99 per route and upstream"),
    ]:
        sp = sub.add_parser(verb, help=text)
        sp.add_argument("-c", "--config", default=os.environ.get("FORKPROXY_CONFIG", DEFAULT_CONFIG))
        sp.add_argument("--pidfile", default=None, help="override the config's pidfile")
        if verb == "phases":
            sp.add_argument("--json", action="store_true", help="the report as JSON")
    demo = sub.add_parser("demo", help="built-in origin + proxy on loopback; Ctrl-C stops")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--origin-port", type=int, default=9000)
    demo.add_argument("--admin-port", type=int, default=9901)
    origin = sub.add_parser("origin", help="run only the built-in demo origin")
    origin.add_argument("--listen", default="127.0.0.1:9000")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    verb = args.verb
    if verb == "demo":
        from forkproxy.demo import run_demo

        return run_demo(args.port, args.origin_port, args.admin_port)
    if verb == "origin":
        from forkproxy.demo import run_origin

        host, _, port = args.listen.rpartition(":")
        return run_origin(host, int(port))
    if verb == "check":
        try:
            config_mod.load(args.config)
        except config_mod.ConfigError as e:
            for line in e.problems:
                print(line)
            return 1
        print("ok")
        return 0
    if verb in ("run", "start"):
        return _run(args, daemon_mode=(verb == "start"))
    pidfile = args.pidfile or _pidfile_from_config(args.config)
    if pidfile is None:
        return 1
    from forkproxy.master.daemon import read_pid
    from forkproxy.osutil import pid_alive

    pid = read_pid(pidfile)
    if not pid or not pid_alive(pid):
        print(f"forkproxy is not running (pidfile {pidfile})", file=sys.stderr)
        return 1
    if verb == "status":
        from forkproxy.manager.status import print_status

        return print_status(args.config)
    if verb == "phases":
        from forkproxy.manager.phases import render
        from forkproxy.manager.status import print_from_admin

        return print_from_admin(args.config, "/debug/phases", render, args.json)
    os.kill(pid, SIGNAL_VERBS[verb])
    return 0


def _pidfile_from_config(path: str) -> str | None:
    try:
        cfg = config_mod.load(path, check_files=False)
    except config_mod.ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return None
    return config_mod.pidfile_path(cfg)


def _run(args, daemon_mode: bool) -> int:
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return 1
    if args.pidfile:
        import msgspec

        cfg = msgspec.structs.replace(
            cfg, server=msgspec.structs.replace(cfg.server, pidfile=os.path.abspath(args.pidfile)))
    # the master's module imports the manager, the workers, the ring and TLS: a broken
    # install fails here, on the terminal, before detaching (no feature is optional)
    from forkproxy.master.arbiter import Arbiter

    ready_fd = None
    if daemon_mode:
        from forkproxy.master.daemon import daemonize

        res = daemonize()
        if res is not None:
            return _wait_for_master(*res)
        ready_fd = int(os.environ.pop("FORKPROXY_READY_FD"))
    from forkproxy import log as log_mod

    log = log_mod.setup(config_mod.log_path(cfg, cfg.log.error_log), cfg.log.level,
                        cfg.log.format)
    return Arbiter(cfg, log, ready_fd=ready_fd).run()


def _wait_for_master(fd: int, child: int) -> int:
    """`start`: wait for the detached master's verdict line."""
    os.waitpid(child, 0)
    data = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    os.close(fd)
    text = data.decode(errors="replace").strip()
    if text == "ok":
        return 0
    print(text.removeprefix("error: ") or "forkproxy exited before its workers were ready "
          "(see the error log)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
