"""A real Prometheus (Debian's `prometheus` package) for tests: its own loopback port and
temporary data directory, short scrape and evaluation intervals, stopped by pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.parse
import urllib.request

from fp import free_port, wait_for


class Prometheus:
    def __init__(self, directory: str, targets: list[str], rule_files: list[str],
                 interval: str = "1s"):
        self.dir = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = os.path.join(directory, "prometheus.yml")
        with open(conf, "w") as f:
            json.dump({  # YAML is a superset of JSON
                "global": {"scrape_interval": interval, "evaluation_interval": interval,
                           "scrape_timeout": interval},
                "rule_files": rule_files,
                "scrape_configs": [{"job_name": "forkproxy",
                                    "static_configs": [{"targets": targets}]}],
            }, f)
        self.log = open(os.path.join(directory, "prometheus.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={conf}",
             f"--storage.tsdb.path={os.path.join(directory, 'data')}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        try:
            wait_for(self._ready, timeout=30, interval=0.2, what="prometheus ready")
        except AssertionError:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.logs()}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def logs(self) -> str:
        with open(os.path.join(self.dir, "prometheus.log"), errors="replace") as f:
            return f.read()

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)

    def query(self, expr: str) -> list[dict]:
        """Instant query: the result vector (fails the test on a query error)."""
        out = self.api("query", query=expr)
        assert out["status"] == "success", (expr, out)
        return out["data"]["result"]

    def targets_up(self) -> bool:
        data = self.api("targets")["data"]["activeTargets"]
        return bool(data) and all(t["health"] == "up" for t in data)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
