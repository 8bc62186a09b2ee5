"""Where a listen address points: the addresses of a network interface (netlink, via
pyroute2, imported only when an interface is named) and the socket addresses a
``listen`` value stands for. The master binds them (master/listeners.py); the manager
binds its admin sockets and `forkproxy status` connects with them."""

from __future__ import annotations

import socket


class BindError(Exception):
    """A listen address that cannot be resolved or bound (the message says why)."""


def interface_addresses(iface: str) -> list[tuple[int, str, int]]:
    """(family, address, scope_id) of every address on a network interface (pyroute2)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=iface)
        if not idx:
            raise BindError(f"no network interface named {iface!r}")
        out = []
        for msg in ipr.get_addr(index=idx[0]):
            addr = msg.get("IFA_ADDRESS")
            fam = msg["family"]
            if not addr:
                continue
            scope = idx[0] if fam == socket.AF_INET6 and addr.lower().startswith("fe80") else 0
            out.append((fam, addr, scope))
    if not out:
        raise BindError(f"network interface {iface!r} has no addresses")
    return out


def resolve(addr) -> list[tuple[int, tuple]]:
    """(family, sockaddr) pairs a listen address (config.ListenAddress) stands for."""
    if addr.iface:
        out = []
        for fam, a, scope in interface_addresses(addr.iface):
            out.append((fam, (a, addr.port, 0, scope) if fam == socket.AF_INET6 else (a, addr.port)))
        return out
    # an ASCII name as bytes: a str goes through the "idna" codec first, whose import
    # (encodings.idna, stringprep, unicodedata) every process would then carry; an ASCII
    # name is its own IDNA form
    host = addr.host.encode() if addr.host and addr.host.isascii() else addr.host
    try:
        infos = socket.getaddrinfo(host, addr.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV)
    except socket.gaierror as e:
        raise BindError(f"cannot resolve {addr.host!r}: {e.strerror}")
    seen, out = set(), []
    for fam, _, _, _, sa in infos:
        if sa not in seen:
            seen.add(sa)
            out.append((fam, sa))
    return out
