"""Route table compiled once per generation: host (exact > longest *.suffix > *) then
longest path prefix; requests nothing matches go to the listener's default upstream.

A route's target is an :class:`~forkproxy.worker.upstream.Upstream`, or a
:class:`~forkproxy.worker.balancer.Split` between upstreams (``split = [...]``); the
connection tells them apart by their ``split`` class attribute and asks a split to
``choose(req, remote)``. A new split share takes effect with the workers of the next
generation (HUP), which is how every config change is applied.
"""

from __future__ import annotations

from forkproxy.config import RouteConfig
from forkproxy.worker.balancer import KeySpec, Split


def route_target(r: RouteConfig, upstreams: dict):
    """The Upstream, or the Split, a route sends its requests to."""
    if not r.split:
        return upstreams[r.upstream]
    targets = [(upstreams[t.upstream], t.weight) for t in r.split]
    key = KeySpec(r.hash, Split.SALT) if r.hash else None
    return Split(targets, key, r.canary_header)


def route_label(r: RouteConfig) -> str:
    """How reports and traces name a route: "HOST PATH_PREFIX" as configured."""
    return f"{r.host} {r.path_prefix}"


class Router:
    """``route()`` returns the target and leaves the matched route's label in ``matched``
    ("" = none matched: the listener's default), to be read before the next yield."""

    __slots__ = ("_exact", "_suffixes", "_any", "_host_cache", "matched")

    def __init__(self, routes: list[RouteConfig], upstreams: dict):
        exact: dict[bytes, list] = {}
        suffixes: dict[bytes, list] = {}
        anyhost: list = []
        for r in routes:
            entry = (r.path_prefix.encode(), route_target(r, upstreams), route_label(r))
            host = r.host.lower().encode()
            if host == b"*":
                anyhost.append(entry)
            elif host.startswith(b"*."):
                suffixes.setdefault(host[1:], []).append(entry)
            else:
                exact.setdefault(host, []).append(entry)
        def by_len(entries):
            return sorted(entries, key=lambda e: -len(e[0]))
        self._exact = {h: by_len(v) for h, v in exact.items()}
        self._suffixes = sorted(((s, by_len(v)) for s, v in suffixes.items()),
                                key=lambda e: -len(e[0]))
        self._any = by_len(anyhost)
        self._host_cache: dict[bytes, tuple] = {}
        self.matched = ""

    def _groups(self, host: bytes) -> tuple:
        groups = self._host_cache.get(host)
        if groups is None:
            name = host.lower()
            if name.startswith(b"["):
                name = name[: name.find(b"]") + 1]
            else:
                name = name.rpartition(b":")[0] or name if b":" in name else name
            found = []
            if name in self._exact:
                found.append(self._exact[name])
            for suffix, entries in self._suffixes:
                if name.endswith(suffix):
                    found.append(entries)
            if self._any:
                found.append(self._any)
            groups = tuple(found)
            if len(self._host_cache) < 4096:
                self._host_cache[host] = groups
        return groups

    def route(self, host: bytes, path: bytes, default):
        for entries in self._groups(host):
            for prefix, upstream, label in entries:
                if path.startswith(prefix):
                    self.matched = label
                    return upstream
        self.matched = ""
        return default
