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


def _help_width() -> int:
    """The width argparse gives its help: shutil.get_terminal_size()'s columns (COLUMNS,
    else the terminal's, else 80) less 2, found without shutil. argparse imports shutil
    for every parser it builds, and shutil imports bz2, lzma and zlib with their C
    libraries: ~0.6 MiB that the master would keep, for one number, and pass to every
    child it forks."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        super().__init__(prog, indent_increment, max_help_position, width or _help_width())


class _Parser(argparse.ArgumentParser):
    """argparse's parser with _HelpFormatter (its subparsers are _Parsers too)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="forkproxy", description=__doc__)
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
    tune = sub.add_parser("tune", help="measure this host with 1..N workers per core "
                          "(built-in origin, wrk) and recommend workers_per_core")
    tune.add_argument("--max-per-core", type=int, default=3)
    tune.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    tune.add_argument("--rounds", type=int, default=2, help="measurements per count (median)")
    tune.add_argument("--connections", type=int, default=64)
    tune.add_argument("--path", default="/tiny", help="what to ask the built-in origin for")
    tune.add_argument("--quick", action="store_true",
                      help="1..2 per core, 1 s, one round, 16 connections (a first look)")
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
        return _check(args.config)
    if verb == "tune":
        return _tune(args)
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


def _check(path: str) -> int:
    """Config errors (exit 1); else the platform line and warnings, then "ok" (exit 0)."""
    from forkproxy import preflight  # gevent, cryptography: only for this verb

    try:
        cfg = config_mod.load(path)
    except config_mod.ConfigError as e:
        for line in e.problems:
            print(line)
        return 1
    lines = preflight.report(cfg)
    for line in lines:
        print(line)
    if preflight.failed(lines):
        return 1
    print("ok")
    return 0


def _tune(args) -> int:
    from forkproxy import tune

    if args.quick:
        settings = tune.Settings.quick()
    else:
        settings = tune.Settings(max_per_core=args.max_per_core, duration=args.duration,
                                 rounds=args.rounds, connections=args.connections,
                                 path=args.path)
    if settings.max_per_core < 1 or settings.duration <= 0 or settings.rounds < 1:
        print("forkproxy tune: --max-per-core, --duration and --rounds must be positive",
              file=sys.stderr)
        return 2
    return tune.main(settings)


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
