"""Debian's nginx as a real origin in tests: its path, the temp-path lines every config
needs (nginx-light writes there even when nothing is buffered), and a process that is
stopped by pid."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from contextlib import contextmanager

from conftest import skip_missing_tool
from fp import port_open, wait_for

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

#: inside http { }: temp paths under the test's run directory
TEMP_PATHS = """
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
"""


@contextmanager
def running_nginx(run, conf: str, ports):
    """nginx with ``conf`` (written to run/nginx.conf) until every port listens;
    QUIT (then KILL) afterwards."""
    if not os.path.exists(NGINX):
        skip_missing_tool("nginx", "scripts/setup installs nginx-light")
    (run / "nginx.conf").write_text(conf)
    proc = subprocess.Popen([NGINX, "-p", str(run), "-c", str(run / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: all(port_open(p) for p in ports) or proc.poll() is not None,
                 what="nginx origin")
        assert proc.poll() is None, proc.stderr.read().decode()
        yield proc
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
