"""The DNS queries of discovery (forkproxy/manager/discovery.py), with dnspython.

Synchronous: run in the manager's thread pool, never on its hub. Each lookup returns
``(result, servers, detail)``: a result from discovery.RESULTS, [(ip, port, weight)]
when it is "ok", and why when it is not (or which SRV targets were skipped).

Imported only when a config has ``resolve`` entries (dnspython is ~13 MiB resident).
"""

from __future__ import annotations

import dns.exception
import dns.nameserver
import dns.resolver
from dns.exception import DNSException

from forkproxy.config import ResolverConfig, parse_nameserver

__all__ = ["DNSException", "lookup_address", "lookup_srv", "make_resolver"]

Lookup = tuple[str, list[tuple[str, int, int]], str]


def make_resolver(rcfg: ResolverConfig) -> dns.resolver.Resolver:
    """dnspython's resolver for [resolver]: its nameservers, or /etc/resolv.conf's.
    Raises dns.resolver.NoResolverConfiguration when there are none."""
    res = dns.resolver.Resolver(configure=not rcfg.nameservers)
    if rcfg.nameservers:
        res.nameservers = [dns.nameserver.Do53Nameserver(*parse_nameserver(ns))
                           for ns in rcfg.nameservers]
    res.timeout = rcfg.timeout
    res.lifetime = rcfg.timeout
    res.cache = None
    return res


def _failure(exc: Exception) -> Lookup:
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return "nxdomain", [], "the name does not exist (NXDOMAIN)"
    if isinstance(exc, dns.exception.Timeout):
        return "timeout", [], str(exc)
    if isinstance(exc, dns.resolver.NoNameservers):
        return "nameservers_failed", [], str(exc)
    if isinstance(exc, dns.exception.FormError):
        return "malformed", [], str(exc)
    return "error", [], f"{type(exc).__name__}: {exc}"


def _addresses(res, host: str) -> list[str]:
    """A then AAAA records of host; raises dnspython's exceptions."""
    out = []
    for rdtype in ("A", "AAAA"):
        answer = res.resolve(host, rdtype, raise_on_no_answer=False)
        out.extend(r.address for r in answer)
    return out


def lookup_address(res, host: str, port: int, weight: int) -> Lookup:
    """The servers of ``{ address = "HOST:PORT", resolve = ... }``."""
    try:
        ips = _addresses(res, host)
    except dns.exception.DNSException as e:
        return _failure(e)
    if not ips:
        return "no_records", [], f"no A or AAAA records for {host}"
    return "ok", [(ip, port, weight) for ip in ips], ""


def lookup_srv(res, name: str) -> Lookup:
    """The servers of ``{ srv = NAME, resolve = ... }``: the lowest priority's targets."""
    try:
        records = list(res.resolve(name, "SRV", raise_on_no_answer=False))
    except dns.exception.DNSException as e:
        return _failure(e)
    if not records:
        return "no_records", [], f"no SRV records for {name}"
    best = min(r.priority for r in records)
    records = [r for r in records if r.priority == best]
    bad = [r.to_text() for r in records if r.port == 0 or r.target.to_text() == "."]
    if bad:
        return "malformed", [], f"SRV records with target '.' or port 0: {bad}"
    servers: list[tuple[str, int, int]] = []
    skipped = []
    for r in records:
        target = r.target.to_text()
        try:
            ips = _addresses(res, target)
        except dns.exception.DNSException as e:
            skipped.append(f"{target}: {_failure(e)[0]}")
            continue
        if not ips:
            skipped.append(f"{target}: no_records")
        servers.extend((ip, r.port, max(1, r.weight)) for ip in ips)
    detail = f"targets skipped: {', '.join(skipped)}" if skipped else ""
    if not servers:
        return "no_records", [], detail or f"no addresses for the targets of {name}"
    return "ok", servers, detail
