"""Page loads over a slow link: the design's HTTP/1.1-versus-HTTP/2 table (issue 14).

A **page** is ten GETs of a 2 KiB icon (``/static/2k``, served by the bench's nginx
origin through the proxy). One **page load** is one h2load process that opens fresh
connection(s) to the proxy's TLS listener through the slow link and fetches the ten:

* ``h1-6conn``: HTTP/1.1 keep-alive on 6 connections, one request in flight on each
  (a browser): ``h2load --h1 -n 10 -c 6 -m 1`` (the ten spread 2,2,2,2,1,1);
* ``h1-pipelined``: HTTP/1.1 on 1 connection, all ten pipelined:
  ``h2load --h1 -n 10 -c 1 -m 10``;
* ``h2``: HTTP/2 over TLS (ALPN h2) on 1 connection, ten concurrent streams:
  ``h2load -n 10 -c 1 -m 10``.

**Page-load time** is from the first request's start to the last response's end, from
h2load's per-request log (``--log-file``: start time, status, duration): it leaves out
the TCP and TLS set-up of the page's connections, which every mode pays alike. A page
counts only if all ten answered 200. ``--loaders`` page loaders (threads, each running
one h2load after another) run for ``--duration`` seconds per run; **req/s** is ten
times the pages completed per second of the run's wall time (connection set-up
included: each page starts cold).

The link: netem through pyroute2 where the kernel has ``sch_netem`` (the client runs in
a network namespace behind a veth pair with ``delay`` and ``loss`` on both ends, a
zero-delay relay on the host side bridges to the proxy's loopback listener), otherwise
scripts/delayrelay.py (a userspace relay with the same delay, and its loss model: see
its docstring). Each figure says which produced it. The proxies reach the origin through
the same delay (``--origin-delay-ms``, by default ``--delay-ms``; a delay relay in front of
the origin), as when one netem qdisc on the loopback shapes every packet of the host:
a proxy then pays an upstream round trip per request, one after another for a pipeline
and concurrently for HTTP/2 streams. ``--origin-delay-ms 0`` leaves the origin on
loopback.

Rounds interleave every (link, mode, proxy) run; each cell is the median over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import (
    Env,
    ForkProxy,
    NginxProxy,
    Procs,
    cpu_list,
    ensure_tools,
    ensure_venv,
    free_port,
    http_get,
    log,
    machine_facts,
    tree,
    wait_ready,
)
from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_PY = os.path.join(HERE, "..", ".venv", "bin", "python")
RELAY = os.path.join(HERE, "delayrelay.py")
PAGE = 10  # requests per page
PATH = "/static/2k"
MODES = {
    "h1-6conn": ["--h1", "-n", str(PAGE), "-c", "6", "-m", "1"],
    "h1-pipelined": ["--h1", "-n", str(PAGE), "-c", "1", "-m", str(PAGE)],
    "h2": ["-n", str(PAGE), "-c", "1", "-m", str(PAGE)],
}
TITLES = {"h1-6conn": "HTTP/1.1, 6 keep-alive connections (browser)",
          "h1-pipelined": "HTTP/1.1 pipelined, 1 connection",
          "h2": "HTTP/2 (TLS, ALPN h2), 1 connection"}
TARGET_RATIO = 3.0  # HTTP/2 req/s >= 3x pipelined HTTP/1.1's


def parse_args(argv):
    p = argparse.ArgumentParser(prog="scripts/pageload", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    p.add_argument("--loaders", type=int, default=4, help="concurrent page loaders")
    p.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay (RTT = 2x)")
    p.add_argument("--origin-delay-ms", type=float, default=None,
                   help="one-way delay between the proxy and the origin (default: --delay-ms, "
                        "as one netem qdisc on the host's loopback shapes both legs; 0: none)")
    p.add_argument("--loss", default="0,0.01",
                   help="comma-separated loss probabilities, one link each (default 0,0.01)")
    p.add_argument("--rto-ms", type=float, default=200.0,
                   help="relay only: what a lost segment costs (default 200, Linux's min RTO)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--proxies", default="forkproxy,nginx")
    p.add_argument("--link", choices=("auto", "netem", "relay"), default="auto",
                   help="auto: netem where the kernel has it, else the relay")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round of 2 s, no loss")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.loss = 1, 2.0, "0"
    args.losses = [float(x) for x in args.loss.split(",")]
    if args.origin_delay_ms is None:
        args.origin_delay_ms = args.delay_ms
    args.modes = args.modes.split(",")
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r} (known: {', '.join(MODES)})")
    args.proxies = args.proxies.split(",")
    args.want_tls, args.want_upstream_tls, args.want_grpc = True, False, False  # what benchlib's proxies read
    return args


# -- the link ------------------------------------------------------------------------------


def netem_unavailable() -> str:
    """Why netem cannot shape a link here ("" when it can): tried on the loopback of a
    throwaway network namespace, never on this machine's own interfaces."""
    name = f"fp-netem-probe-{os.getpid()}"
    try:
        netns.create(name)
    except OSError as e:
        return f"no network namespaces ({e})"
    try:
        with IPRoute(netns=name) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            ipr.tc("add", "netem", index=lo, handle="1:", delay=1000)
        return ""
    except NetlinkError as e:
        return f"the kernel refused a netem qdisc (netlink error {e.code}: {e})"
    finally:
        with contextlib.suppress(OSError):
            netns.remove(name)


class RelayLink:
    """scripts/delayrelay.py in front of one proxy port: the delay and loss in userspace."""

    kind = "relay"

    def __init__(self, env: Env, procs: Procs, target: int, loss: float, args):
        self.port = free_port()
        self.host = "127.0.0.1"
        cmd = [*env.taskset(env.load_cpus), VENV_PY, RELAY, "--listen", f"127.0.0.1:{self.port}",
               "--to", f"127.0.0.1:{target}", "--delay-ms", str(args.delay_ms),
               "--loss", str(loss), "--rto-ms", str(args.rto_ms), "--seed", str(args.seed)]
        self.proc = procs.start("relay", cmd, log_path=os.path.join(env.run, "relay.log"))
        self.describe = (f"userspace relay (scripts/delayrelay.py), {args.delay_ms:g} ms each way"
                         + (f", {loss:.0%} segment loss as a {args.rto_ms:g} ms delay of the "
                            "chunk and everything behind it" if loss else ", no loss"))

    def client_prefix(self) -> list[str]:
        return []

    def close(self) -> None:
        pass  # the relay is one of procs: stopped with the others


class NetemLink:
    """The client in a network namespace behind a veth pair shaped by netem (both ends),
    and a zero-delay relay on the host side of the pair to the proxy's loopback port."""

    kind = "netem"
    serial = 0

    def __init__(self, env: Env, procs: Procs, target: int, loss: float, args):
        NetemLink.serial += 1
        n = (os.getpid() + NetemLink.serial) % 250 + 1  # two runs at once: other subnets
        self.name = f"fp-pageload-{os.getpid()}-{NetemLink.serial}"
        self.host = f"10.216.{n}.1"
        netns.create(self.name)
        try:
            self._shape(n, loss, args)
        except BaseException:
            self.close()
            raise
        self.port = free_port()
        cmd = [*env.taskset(env.load_cpus), VENV_PY, RELAY, "--listen", f"{self.host}:{self.port}",
               "--to", f"127.0.0.1:{target}", "--delay-ms", "0"]
        self.proc = procs.start("bridge", cmd, log_path=os.path.join(env.run, "relay.log"))
        self.describe = (f"netem (pyroute2) on a veth pair, {args.delay_ms:g} ms each way"
                         + (f", {loss:.0%} loss each way" if loss else ", no loss"))

    def _shape(self, n: int, loss: float, args) -> None:
        """The veth pair, its addresses, and netem on both ends."""
        host_if, ns_if = f"fppl{os.getpid() % 10000}h{n}", f"fppl{os.getpid() % 10000}n{n}"
        shape = {"delay": int(args.delay_ms * 1000), "loss": loss * 100}
        with IPRoute() as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": ns_if,
                                                             "net_ns_fd": self.name})
            idx = ipr.link_lookup(ifname=host_if)[0]
            ipr.addr("add", index=idx, address=self.host, prefixlen=30)
            ipr.link("set", index=idx, state="up")
            ipr.tc("add", "netem", index=idx, handle="1:", **shape)
        with IPRoute(netns=self.name) as nsr:
            idx = nsr.link_lookup(ifname=ns_if)[0]
            nsr.addr("add", index=idx, address=f"10.216.{n}.2", prefixlen=30)
            nsr.link("set", index=idx, state="up")
            nsr.link("set", index=nsr.link_lookup(ifname="lo")[0], state="up")
            nsr.tc("add", "netem", index=idx, handle="1:", **shape)

    def client_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            netns.remove(self.name)  # removes the veth pair and its qdiscs


def delay_origin(env: Env, procs: Procs, args) -> str:
    """Put the slow link between the proxies and the origin too: a delay relay in front of
    the origin's port, which the proxies are then configured with. Returns its description.

    The design's figures come from a link that delays every packet of the host, the
    proxy's upstream round trips included (netem on the loopback shapes both legs). That
    is where pipelining loses: a proxy answers pipelined requests one after another, so a
    page of ten costs ten upstream round trips in a pipeline, and one with ten concurrent
    streams. No loss on this leg.
    """
    if not args.origin_delay_ms:
        return "the origin on loopback, no delay between the proxies and the origin"
    port = free_port()
    cmd = [*env.taskset(env.load_cpus), VENV_PY, RELAY, "--listen", f"127.0.0.1:{port}",
           "--to", f"127.0.0.1:{env.origin_port}", "--delay-ms", str(args.origin_delay_ms)]
    relay = procs.start("origin-relay", cmd, log_path=os.path.join(env.run, "origin-relay.log"))
    wait_ready(lambda: http_get(port, PATH) == (200, 2048), relay, 10, "the origin's relay")
    env.origin_port = port
    return (f"the origin behind a userspace delay relay, {args.origin_delay_ms:g} ms each way "
            "between the proxies and the origin (no loss on that leg)")


def wait_link(link, timeout: float = 10.0) -> None:
    """Until a page loads through the link (the relay is listening, the proxy answers)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            one_page(link, "h2", tempfile.gettempdir())
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# -- one page ------------------------------------------------------------------------------


def one_page(link, mode: str, scratch: str) -> tuple[float, float]:
    """Load one page: (page-load ms, wall ms of the whole h2load run). RuntimeError when a
    request failed."""
    fd, logf = tempfile.mkstemp(prefix="page-", dir=scratch)
    os.close(fd)
    url = f"https://{link.host}:{link.port}{PATH}"
    cmd = [*link.client_prefix(), "h2load", *MODES[mode], "-t", "1", "--log-file", logf, url]
    try:
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        wall = (time.monotonic() - t0) * 1000
        with open(logf) as f:
            rows = [line.split("\t") for line in f if line.strip()]
    finally:
        os.unlink(logf)
    proto = "h2" if mode == "h2" else "http/1.1"
    if (len(rows) != PAGE or any(row[1] != "200" for row in rows)
            or f"Application protocol: {proto}" not in r.stdout):
        raise RuntimeError(f"page failed ({len(rows)} logged): {r.stdout[-400:]} {r.stderr[-200:]}")
    start = min(int(row[0]) for row in rows)
    end = max(int(row[0]) + int(row[2]) for row in rows)
    return (end - start) / 1000, wall


def run_pages(link, mode: str, duration: float, loaders: int, scratch: str) -> dict:
    """``loaders`` threads loading pages for ``duration`` seconds."""
    times: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def loader():
        while time.monotonic() < stop_at:
            try:
                ms, _ = one_page(link, mode, scratch)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                with lock:
                    errors.append(str(e)[:200])
                continue
            with lock:
                times.append(ms)

    t0 = time.monotonic()
    threads = [threading.Thread(target=loader) for _ in range(loaders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    times.sort()
    return {"pages": len(times), "errors": len(errors), "first_error": errors[:1],
            "wall_s": wall, "req_s": PAGE * len(times) / wall,
            "p50_ms": percentile(times, 0.50), "p95_ms": percentile(times, 0.95)}


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[i]


# -- the run -------------------------------------------------------------------------------


def start_proxies(env: Env, names: list[str]) -> list:
    out = []
    for name in names:
        px = {"forkproxy": ForkProxy, "nginx": NginxProxy}[name](env)
        px.start()
        if px.tls_port is None:
            raise RuntimeError(f"{name} has no TLS listener: {px.note}")
        out.append(px)
        log(f"{name} up: TLS port {px.tls_port}, pids {px.pids()}")
    return out


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict]) -> dict:
    return {"req_s": median(r["req_s"] for r in runs), "p50_ms": median(r["p50_ms"] for r in runs),
            "p95_ms": median(r["p95_ms"] for r in runs), "pages": sum(r["pages"] for r in runs),
            "errors": sum(r["errors"] for r in runs), "rounds": len(runs)}


def render(results: dict) -> str:
    lines = []
    for link in results["links"]:
        lines += ["", f"**{link['describe']}**", "",
                  "| mode | proxy | page load p50 | p95 | req/s | pages (errors) |",
                  "|---|---|---|---|---|---|"]
        for mode in results["modes"]:
            for px in results["proxies"]:
                s = link["summary"].get(f"{mode}/{px}")
                if not s or s["p50_ms"] is None:
                    lines.append(f"| {TITLES[mode]} | {px} | – | – | – | 0 |")
                    continue
                lines.append(f"| {TITLES[mode]} | {px} | {s['p50_ms']:.0f} ms | "
                             f"{s['p95_ms']:.0f} ms | {s['req_s']:,.0f} | "
                             f"{s['pages']:,} ({s['errors']}) |")
        for px in results["proxies"]:
            h2 = link["summary"].get(f"h2/{px}")
            pipe = link["summary"].get(f"h1-pipelined/{px}")
            if h2 and pipe and h2["req_s"] and pipe["req_s"]:
                ratio = h2["req_s"] / pipe["req_s"]
                verdict = "met" if ratio >= TARGET_RATIO else "missed"
                lines.append(f"\n{px}: HTTP/2 req/s = **{ratio:.2f}x** pipelined HTTP/1.1 "
                             f"(target >= {TARGET_RATIO:g}x: {verdict})")
    return "\n".join(lines)


def run(args, env: Env, procs: Procs, command: str) -> dict:
    machine = machine_facts()
    why = "" if args.link == "relay" else netem_unavailable()
    if args.link == "netem" and why:
        raise RuntimeError(f"--link netem: {why}")
    link_cls = NetemLink if not why and args.link != "relay" else RelayLink
    log(f"link: {link_cls.kind}" + (f" (netem unavailable: {why})" if why else ""))
    env.start_origin()
    origin_leg = delay_origin(env, procs, args)
    log(f"origin leg: {origin_leg}")
    proxies = start_proxies(env, args.proxies)
    links = []
    for loss in args.losses:
        per = {px.name: link_cls(env, procs, px.tls_port, loss, args) for px in proxies}
        for lk in per.values():
            wait_link(lk)
        links.append({"loss": loss, "per": per, "runs": {}})
    results = {"command": command, "machine": machine, "netem_unavailable": why,
               "link_kind": link_cls.kind, "origin_leg": origin_leg, "modes": args.modes,
               "proxies": [px.name for px in proxies], "loaders": args.loaders,
               "rounds": args.rounds, "duration_s": args.duration, "links": [],
               "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
               "load_cpus": cpu_list(env.load_cpus), "proxy_cpus": cpu_list(env.proxy_cpus)}
    try:
        for rnd in range(args.rounds):
            for lk in links:
                for mode in args.modes:
                    for px in proxies:
                        r = run_pages(lk["per"][px.name], mode, args.duration, args.loaders,
                                      env.run)
                        r["loadavg"] = os.getloadavg()[0]
                        lk["runs"].setdefault(f"{mode}/{px.name}", []).append(r)
                        log(f"round {rnd + 1} loss {lk['loss']:g} {mode} {px.name}: "
                            f"p50 {r['p50_ms'] or 0:.0f} ms p95 {r['p95_ms'] or 0:.0f} ms "
                            f"{r['req_s']:.0f} req/s, {r['pages']} pages, {r['errors']} errors"
                            f", load {r['loadavg']:.2f}"
                            + (f" ({r['first_error'][0]})" if r["errors"] else ""))
    finally:
        for lk in links:
            for one in lk["per"].values():
                one.close()
    for lk in links:
        first = next(iter(lk["per"].values()))
        results["links"].append({"loss": lk["loss"], "describe": first.describe,
                                 "runs": lk["runs"],
                                 "summary": {k: summarize(v) for k, v in lk["runs"].items()}})
    results["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    for px in proxies:
        results.setdefault("pids", {})[px.name] = tree(px.proc.pid)
    return results


def main(argv: list[str], command: str) -> int:
    args = parse_args(argv)
    err = ensure_tools(["nginx", "h2load", "openssl", "taskset"])
    if err:
        print(f"pageload: cannot run: {err}", file=sys.stderr)
        return 77
    ensure_venv()
    procs = Procs()
    env = None
    try:
        env = Env(args, procs)
        results = run(args, env, procs, command)
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        return 130
    finally:
        procs.stop_all()
        if env is not None:
            env.cleanup()
    md = (f"`{command}`: {results['loaders']} page loaders, {results['rounds']} interleaved "
          f"rounds of {results['duration_s']:g} s per cell (medians), load CPUs "
          f"{results['load_cpus']}, proxy CPUs {results['proxy_cpus']}; load average "
          f"{results['loadavg_before']} before, {results['loadavg_after']} after; "
          f"{results['origin_leg']}.\n"
          + render(results))
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    errors = sum(s["errors"] for lk in results["links"] for s in lk["summary"].values())
    return 1 if errors else 0
