"""Issue 17: `forkproxy demo` cleans up however it ends (Ctrl-C to the terminal's process
group, SIGTERM or SIGHUP to the demo alone): its children stop, its scratch directory under
/tmp is removed; and the built-in origin answers with the proper reason phrases."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import time

import pytest
from fp import PY, ROOT, alive, children_of, connect, free_port, recv_response, request, wait_for

from forkproxy.demo import reason


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        out += kids
        todo += kids
    return out


class Demo:
    """A real `forkproxy demo` in its own session (so Ctrl-C can go to its group)."""

    def __init__(self):
        self.port, self.origin_port, self.admin_port = free_port(), free_port(), free_port()
        self.proc = subprocess.Popen(
            [PY, "-m", "forkproxy", "demo", "--port", str(self.port), "--origin-port",
             str(self.origin_port), "--admin-port", str(self.admin_port)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        self.out = b""
        self.run_dir = self._run_dir()
        wait_for(lambda: self._answers(), timeout=60, interval=0.2, what="the demo answering")

    def _run_dir(self) -> str:
        deadline = time.monotonic() + 60
        while (m := re.search(rb"config (\S+)/forkproxy\.toml", self.out)) is None:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.out
            if select.select([self.proc.stdout], [], [], 1.0)[0]:
                self.out += os.read(self.proc.stdout.fileno(), 4096)
        return m.group(1).decode()

    def _answers(self) -> bool:
        try:
            return request(self.port, "GET", "/tiny")[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        """TERM if still running; KILL by pid (children first) if that does not end it; the
        scratch directory removed if a failed test left it."""
        if self.proc.poll() is None:
            kids = _descendants(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                for pid in [*kids, self.proc.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.wait(30)
        self.proc.stdout.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture
def demo():
    d = Demo()
    yield d
    d.stop()


@pytest.mark.parametrize("how", ["ctrl-c", "term", "hup"])
def test_demo_cleans_up_on_every_exit(demo, how):
    assert os.path.isdir(demo.run_dir) and demo.run_dir.startswith("/tmp/forkproxy-demo-")
    kids = _descendants(demo.proc.pid)
    assert len(kids) >= 4, kids  # origin, proxy master, its manager and workers
    if how == "ctrl-c":  # the terminal sends SIGINT to the whole foreground group
        os.killpg(demo.proc.pid, signal.SIGINT)
    else:
        os.kill(demo.proc.pid, signal.SIGTERM if how == "term" else signal.SIGHUP)
    assert demo.proc.wait(60) == 0
    wait_for(lambda: not any(alive(k) for k in kids), timeout=30, what="the demo's children gone")
    assert not os.path.exists(demo.run_dir), os.listdir(demo.run_dir)


def test_origin_reason_phrases(demo):
    for path, line in [("/tiny", b"HTTP/1.1 200 OK"), ("/status/404", b"HTTP/1.1 404 Not Found"),
                       ("/status/503", b"HTTP/1.1 503 Service Unavailable"),
                       ("/status/204", b"HTTP/1.1 204 No Content"),
                       ("/nowhere", b"HTTP/1.1 404 Not Found")]:
        for port in (demo.origin_port, demo.port):  # the origin itself, and through the proxy
            with connect(port) as c:
                c.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
                head = recv_response(c)[3]
            assert head.split(b"\r\n")[0] == line, (port, path, head)
    assert reason(599) == b"Unknown" and reason(418) == b"I'm a Teapot"
