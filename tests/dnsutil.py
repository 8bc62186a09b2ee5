"""A real DNS server for the discovery tests: dnsmasq (Debian's dnsmasq-base) on loopback.

Each :class:`Dnsmasq` runs in the foreground on a free port with its own config file
(no /etc/hosts, no /etc/resolv.conf, no upstream servers: names under ``.test`` that it
does not know are NXDOMAIN). A and AAAA records live in an ``addn-hosts`` file, which
dnsmasq re-reads on SIGHUP (:meth:`Dnsmasq.set_hosts`); SRV, TXT and ``host-record``
lines are in the config file, which SIGHUP does not re-read, so they are fixed for a
server's life. Stopped by pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import dns.nameserver
import dns.resolver
from fp import PY, ROOT, free_port, port_open, request, stop_process, wait_for


def free_udp_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq binds both)."""
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


class Dnsmasq:
    def __init__(self, tmp_path, hosts: dict[str, list[str]] | None = None,
                 conf_lines: list[str] = ()):
        self.dir = str(tmp_path)
        self.port = free_udp_tcp_port()
        self.hosts_path = os.path.join(self.dir, "dns-hosts")
        self.conf_path = os.path.join(self.dir, "dnsmasq.conf")
        self.pidfile = os.path.join(self.dir, "dnsmasq.pid")
        self._write_hosts(hosts or {})
        with open(self.conf_path, "w") as f:
            f.write("\n".join(["no-resolv", "no-hosts", "no-negcache", "local=/test/",
                               f"addn-hosts={self.hosts_path}", *conf_lines]) + "\n")
        self.proc = subprocess.Popen(
            ["dnsmasq", "--keep-in-foreground", f"--conf-file={self.conf_path}",
             f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
             "--user=root", f"--pid-file={self.pidfile}", "--log-facility=-"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.answers("ready-probe.test") is not None, timeout=10,
                 what="dnsmasq answering")

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_hosts(self, hosts: dict[str, list[str]]) -> None:
        tmp = self.hosts_path + ".tmp"
        with open(tmp, "w") as f:
            for name, ips in hosts.items():
                for ip in ips:
                    f.write(f"{ip} {name}\n")
        os.replace(tmp, self.hosts_path)

    def answers(self, name: str, rdtype: str = "A") -> list[str] | None:
        """The records dnsmasq gives now ([] for NXDOMAIN or none); None if it is not
        answering."""
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", self.port)]
        res.lifetime = 1.0
        try:
            return sorted(r.to_text() for r in res.resolve(name, rdtype,
                                                           raise_on_no_answer=False))
        except dns.resolver.NXDOMAIN:
            return []
        except Exception:
            return None

    def set_hosts(self, hosts: dict[str, list[str]]) -> float:
        """Rewrite the A/AAAA records, SIGHUP dnsmasq, wait until it answers with them;
        returns the monotonic time the HUP was sent."""
        self._write_hosts(hosts)
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGHUP)
        for name, ips in hosts.items():
            want = sorted(ip for ip in ips if ":" not in ip)
            wait_for(lambda n=name, w=want: self.answers(n) == w, timeout=10,
                     what=f"dnsmasq serving {name} -> {want}")
        return t0

    def stop(self) -> None:
        stop_process(self.proc)


class LoopbackOrigin:
    """The built-in origin on any loopback address (127.0.0.2, 127.0.0.3, ...)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.calls = 0  # our own /stats requests, which the origin counts too
        self.proc = subprocess.Popen(
            [PY, "-m", "forkproxy", "origin", "--listen", f"{host}:{port}"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open(port, host), what=f"origin on {host}:{port}")

    def proxied(self) -> int:
        """Requests this origin got, not counting our /stats requests."""
        self.calls += 1
        _, _, body = request(self.port, "GET", "/stats", host=self.host)
        return json.loads(body)["requests"] - self.calls

    def stop(self) -> None:
        stop_process(self.proc)
