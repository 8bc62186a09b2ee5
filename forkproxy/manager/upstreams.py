"""The upstream side in /status and /metrics: per-server state, pools, reuse, retries.

Sources, all read at scrape time except the request counters:

* the workers' gauges records (about once a second; forkproxy/context.py UpstreamGauge):
  each worker's view of each server (state, effective weight, active and idle
  connections, connects, reuses, failures, ejections, retries, queued, tunnels, TLS
  handshakes full and resumed);
* the shared health table (forkproxy/shm/health.py): the active checks' verdicts;
* request contexts (Metrics.observe): ``retries`` and ``tunnel`` per request.

A server's state over all workers: ``down`` when the active check says so; else
``ejected`` when at least one worker has it ejected (``ejected_workers`` says how many);
else ``slow_start`` while a worker still ramps its weight; else ``up``.
"""

from __future__ import annotations

from forkproxy.context import WEIGHT_SCALE
from forkproxy.manager.metrics import TextWriter
from forkproxy.shm.health import DOWN, STATE_NAMES, server_key

STATES = ("up", "down", "ejected", "slow_start")
_SUM = ("active", "idle", "connects", "reuses", "failures", "ejections", "retries",
        "waiting", "tunnels", "tls_full", "tls_resumed")


def _health_entries(health) -> dict[int, int]:
    return health.index() if health is not None else {}


def collect(cfg, gauges: dict, live_pids, health, discovery=None) -> dict:
    """{upstream: {"balance": ..., "servers": [server dict, ...], "dns": [entry dict, ...]}}
    for /status; the servers are the fixed ones, then those DNS lists now."""
    live = set(live_pids)
    per: dict[tuple[str, str], list] = {}
    for pid, g in gauges.items():
        if pid not in live:
            continue
        for u in g.upstreams:
            per.setdefault((u.upstream, u.server), []).append(u)
    index = _health_entries(health)
    found = discovery.servers() if discovery is not None else {}
    dns_status = discovery.status() if discovery is not None else {}
    out = {}
    for name, up in cfg.upstream.items():
        servers = []
        listed = [(s.address, s.weight) for s in up.servers if not s.resolve]
        for address, weight in listed + found.get(name, []):
            check = None
            i = index.get(server_key(name, address), -1)
            if up.health_check is not None and i >= 0:
                check = health.read(i)
            servers.append(_server(address, weight, per.get((name, address), []), check))
        out[name] = {"balance": up.balance, "servers": servers,
                     "dns": dns_status.get(name, [])}
    return out


def _server(address: str, weight: int, views: list, check: dict | None) -> dict:
    """One server over all workers (views: each live worker's gauge of it)."""
    d = {"address": address, "weight": weight}
    for f in _SUM:
        d[f] = sum(getattr(v, f) for v in views)
    used = d["connects"] + d["reuses"]
    d["reuse_ratio"] = round(d["reuses"] / used, 4) if used else None
    d["workers"] = len(views)
    d["ejected_workers"] = sum(1 for v in views if v.state == "ejected")
    d["slow_start_workers"] = sum(1 for v in views if v.state == "slow_start")
    d["effective_weight"] = (round(sum(v.eff_weight for v in views) / len(views)
                                   / WEIGHT_SCALE, 3) if views else None)
    d["health_check"] = check
    checked_down = check is not None and check["state"] == STATE_NAMES[DOWN]
    if checked_down or any(v.state == "down" for v in views):
        state = "down"
    elif d["ejected_workers"]:
        state = "ejected"
    elif d["slow_start_workers"]:
        state = "slow_start"
    else:
        state = "up"
    d["state"] = state
    return d


def metrics_text(cfg, gauges: dict, live_pids, health, retries: dict, tunnels: dict,
                 discovery=None) -> str:
    """Prometheus families of the upstream side (appended to the main exposition)."""
    status = collect(cfg, gauges, live_pids, health, discovery)
    w = TextWriter()
    _dns_families(w, status)
    w.family("forkproxy_upstream_server_state", "gauge",
             "1 for the server's current state (up, down: active check, ejected: passive "
             "health in at least one worker, slow_start), 0 for the others.")
    for name, u in status.items():
        for s in u["servers"]:
            for st in STATES:
                w.sample("forkproxy_upstream_server_state",
                         (("upstream", name), ("server", s["address"]), ("state", st)),
                         1 if s["state"] == st else 0)
    w.family("forkproxy_upstream_server_connections", "gauge",
             "Upstream connections per server in all workers (active: lent to a request or "
             "tunnel, idle: pooled, waiting: requests queued under max_connections).")
    for name, u in status.items():
        for s in u["servers"]:
            for st in ("active", "idle", "waiting"):
                w.sample("forkproxy_upstream_server_connections",
                         (("upstream", name), ("server", s["address"]), ("state", st)), s[st])
    for fam, key, text in (
            ("forkproxy_upstream_server_connects_total", "connects",
             "Connections opened per server (live workers; resets with a worker)."),
            ("forkproxy_upstream_server_reuses_total", "reuses",
             "Requests sent on a pooled connection per server (live workers)."),
            ("forkproxy_upstream_server_failures_total", "failures",
             "Failed tries per server: connect errors, resets, timeouts, retried statuses."),
            ("forkproxy_upstream_server_ejections_total", "ejections",
             "Passive health ejections per server, summed over workers."),
            ("forkproxy_upstream_server_retries_total", "retries",
             "Requests retried on another server after failing on this one.")):
        w.family(fam, "counter", text)
        for name, u in status.items():
            for s in u["servers"]:
                w.sample(fam, (("upstream", name), ("server", s["address"])), s[key])
    w.family("forkproxy_upstream_server_effective_weight", "gauge",
             "Effective weight (configured weight, lower while slow-starting), mean of workers.")
    for name, u in status.items():
        for s in u["servers"]:
            if s["effective_weight"] is not None:
                w.sample("forkproxy_upstream_server_effective_weight",
                         (("upstream", name), ("server", s["address"])), s["effective_weight"])
    w.family("forkproxy_upstream_health_checks_total", "counter",
             "Active health checks per server, by result.")
    for name, u in status.items():
        for s in u["servers"]:
            hc = s["health_check"]
            if hc is None:
                continue
            labels = (("upstream", name), ("server", s["address"]))
            w.sample("forkproxy_upstream_health_checks_total", labels + (("result", "ok"),),
                     hc["checks"] - hc["failed"])
            w.sample("forkproxy_upstream_health_checks_total", labels + (("result", "failed"),),
                     hc["failed"])
    w.family("forkproxy_upstream_tls_handshakes_total", "counter",
             "TLS handshakes to the servers of an upstream, by session resumption "
             "(live workers; resets with a worker).")
    for name, u in status.items():
        if cfg.upstream[name].tls is None:
            continue
        for resumed, key in (("false", "tls_full"), ("true", "tls_resumed")):
            w.sample("forkproxy_upstream_tls_handshakes_total",
                     (("upstream", name), ("resumed", resumed)),
                     sum(s[key] for s in u["servers"]))
    w.family("forkproxy_upstream_retries_total", "counter",
             "Tries on another server after a failed one, by upstream.")
    for name, n in sorted(retries.items()):
        w.sample("forkproxy_upstream_retries_total", (("upstream", name),), n)
    w.family("forkproxy_tunnels_total", "counter",
             "Upgraded connections (WebSocket) tunnelled, counted when they close.")
    for name, n in sorted(tunnels.items()):
        w.sample("forkproxy_tunnels_total", (("upstream", name),), n)
    w.family("forkproxy_tunnels_open", "gauge", "Upgraded connections open now, by upstream.")
    for name, u in status.items():
        w.sample("forkproxy_tunnels_open", (("upstream", name),),
                 sum(s["tunnels"] for s in u["servers"]))
    return w.text()


def _dns_families(w: TextWriter, status: dict) -> None:
    """Resolutions by result and servers listed, per DNS entry (manager/discovery.py)."""
    w.family("forkproxy_dns_resolutions_total", "counter",
             "Resolutions of upstream servers' DNS names, by result (ok, nxdomain, "
             "no_records, malformed, timeout, nameservers_failed, error); a failure keeps the last set.")
    for name, u in status.items():
        for e in u["dns"]:
            for result, n in e["resolutions"].items():
                w.sample("forkproxy_dns_resolutions_total",
                         (("upstream", name), ("dns_name", e["name"]), ("result", result)), n)
    w.family("forkproxy_upstream_dns_servers", "gauge",
             "Servers an upstream's DNS entry lists now (the last good resolution).")
    for name, u in status.items():
        for e in u["dns"]:
            w.sample("forkproxy_upstream_dns_servers", (("upstream", name), ("dns_name", e["name"])),
                     len(e["servers"]))
