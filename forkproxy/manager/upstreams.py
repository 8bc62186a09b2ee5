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


def collect(cfg, gauges: dict, live_pids, health) -> dict:
    """{upstream: {"balance": ..., "servers": [server dict, ...]}} for /status."""
    live = set(live_pids)
    per: dict[tuple[str, str], list] = {}
    for pid, g in gauges.items():
        if pid not in live:
            continue
        for u in g.upstreams:
            per.setdefault((u.upstream, u.server), []).append(u)
    index = _health_entries(health)
    out = {}
    for name, up in cfg.upstream.items():
        servers = []
        for s in up.servers:
            views = per.get((name, s.address), [])
            d = {"address": s.address, "weight": s.weight}
            for f in _SUM:
                d[f] = sum(getattr(v, f) for v in views)
            used = d["connects"] + d["reuses"]
            d["reuse_ratio"] = round(d["reuses"] / used, 4) if used else None
            d["workers"] = len(views)
            d["ejected_workers"] = sum(1 for v in views if v.state == "ejected")
            d["slow_start_workers"] = sum(1 for v in views if v.state == "slow_start")
            d["effective_weight"] = (round(sum(v.eff_weight for v in views) / len(views)
                                           / WEIGHT_SCALE, 3) if views else None)
            check = None
            i = index.get(server_key(name, s.address), -1)
            if up.health_check is not None and i >= 0:
                check = health.read(i)
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
            servers.append(d)
        out[name] = {"balance": up.balance, "servers": servers}
    return out


def metrics_text(cfg, gauges: dict, live_pids, health, retries: dict, tunnels: dict) -> str:
    """Prometheus families of the upstream side (appended to the main exposition)."""
    status = collect(cfg, gauges, live_pids, health)
    w = TextWriter()
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
