"""Unix daemon plumbing: pidfile, detaching, systemd notification."""

from __future__ import annotations

import os
import socket

from forkproxy.osutil import pid_alive


class PidfileError(Exception):
    pass


def read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def check_pidfile(path: str) -> None:
    """Refuse to start twice; a stale pidfile (dead pid) is replaced."""
    pid = read_pid(path)
    if pid and pid != os.getpid() and pid_alive(pid):
        raise PidfileError(f"already running with pid {pid} (pidfile {path})")


def write_pidfile(path: str, pid: int) -> None:
    """Atomically: write a temporary file next to it, then rename."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{pid}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, f"{pid}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def remove_pidfile(path: str, pid: int) -> None:
    """Remove the pidfile only if it is still ours (an upgrade may have taken it)."""
    if path and read_pid(path) == pid:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def sd_notify(state: str) -> bool:
    """systemd's sd_notify(3) without libsystemd: a datagram to $NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError:
        return False


def daemonize() -> tuple[int, int] | None:
    """Detach (double fork + setsid). Returns (read_fd, child_pid) in the original process,
    which should wait on read_fd for the master's "ok"/"error: ..." line; returns None in
    the detached process, whose stdio points at /dev/null and which must write its
    verdict to the fd in `os.environ['FORKPROXY_READY_FD']`."""
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        return r, pid
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    os.umask(0o022)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)
    os.set_inheritable(w, False)
    os.environ["FORKPROXY_READY_FD"] = str(w)
    return None
