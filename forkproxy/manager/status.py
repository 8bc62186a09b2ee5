"""`forkproxy status`: GET /status from the admin endpoint named in the config, as a table."""

from __future__ import annotations

import http.client
import json
import sys
import time

from forkproxy import config as config_mod
from forkproxy.netif import interface_addresses


def admin_target(listen: str) -> tuple[str, int]:
    """Where to connect for an admin ``listen`` value (wildcards -> loopback)."""
    addr = config_mod.parse_listen(listen)
    if addr.iface:
        if addr.iface == "lo":
            return "127.0.0.1", addr.port
        fam_addrs = interface_addresses(addr.iface)
        return fam_addrs[0][1], addr.port
    host = addr.host
    if addr.wildcard or host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, addr.port


def fetch_status(cfg: config_mod.Config, timeout: float = 5.0) -> dict:
    return fetch_json(cfg, "/status", timeout)


def fetch_json(cfg: config_mod.Config, path: str, timeout: float = 5.0) -> dict:
    """GET ``path`` from the admin endpoint of ``cfg`` (with its token) as JSON."""
    host, port = admin_target(cfg.admin.listen)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"Accept": "application/json"}
    if cfg.admin.token:
        headers["Authorization"] = f"Bearer {cfg.admin.token}"
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"admin endpoint answered {resp.status}: "
                           f"{body.decode(errors='replace').strip()}")
    return json.loads(body)


def _uptime(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def render(status: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [
        f"master pid {status.get('master_pid')}  generation {status.get('generation')}"
        f"  workers {len(status.get('workers', []))}",
        f"config {status.get('config')}",
    ]
    if status.get("ring_dropped"):
        lines.append(f"ring records dropped {status['ring_dropped']}")
    header = ("PID", "CPU", "GEN", "REQUESTS", "CONNS", "RSS MiB", "UPTIME")
    rows = []
    for w in status.get("workers", []):
        rss = w.get("rss")
        up = w.get("uptime")
        if up is None and w.get("started"):
            up = now - w["started"]
        rows.append((
            str(w.get("pid")),
            "-" if w.get("cpu") is None else str(w["cpu"]),
            str(w.get("generation")),
            str(w.get("requests", 0)),
            str(w.get("connections", 0)),
            "-" if rss is None else f"{rss / 1048576:.1f}",
            _uptime(up),
        ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines.append("  ".join(h.ljust(widths[i]) if i == 0 else h.rjust(widths[i])
                           for i, h in enumerate(header)))
    for r in rows:
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                               for i, c in enumerate(r)))
    return "\n".join(lines) + "\n"


def print_status(config_path: str) -> int:
    return print_from_admin(config_path, "/status", render)


def print_from_admin(config_path: str, path: str, render_fn, as_json: bool = False) -> int:
    """Fetch ``path`` (JSON) from the admin endpoint of the config, print it rendered."""
    try:
        cfg = config_mod.load(config_path, check_files=False)
    except config_mod.ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return 1
    if not cfg.admin.listen:
        print(f"{config_path}: admin.listen is empty: no admin endpoint to ask", file=sys.stderr)
        return 1
    try:
        data = fetch_json(cfg, path)
    except (OSError, RuntimeError, ValueError, http.client.HTTPException) as e:
        print(f"cannot get {path} from the admin endpoint {cfg.admin.listen}: {e}",
              file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(data, indent=1) + "\n" if as_json else render_fn(data))
    return 0
