"""The critical-path report (`forkproxy phases`, GET /debug/phases on the admin port).

From the manager's live phase histograms per (route, upstream) (metrics.py PhaseGroup:
bucket counts, sum and sum of squares), no trace backend needed. A request runs through
a chain of phases one after the other: reading its head (accept_to_headers, which holds
the TLS handshake on a connection's first request), upstream_connect, request_send,
upstream_first_byte, response_body. For each phase:

* mean μ and standard deviation σ per request of the group: a phase that did not happen
  counts 0 (a pooled connection has no connect), so Σμ is the mean request;
* p99 over the requests where it happened (histogram estimate, like PromQL's);
* weight = μ + 2σ. The three heaviest phases of the chain are marked: the critical path.

The model's P99 assumes independent phases, normal enough for the sum to be:
P99 ≈ Σμ + 2.33·√(Σσ²), shown next to the P99 measured on the whole request. The gap
between them says how far the phases are from that (heavy tails, correlated phases).
"""

from __future__ import annotations

import math

from forkproxy.manager.metrics import Histogram, Metrics

#: the phases one request goes through in order (tls_handshake lies inside the first)
CHAIN = ("accept_to_headers", "upstream_connect", "request_send", "upstream_first_byte",
         "response_body")
Z99 = 2.33
HEAVIEST = 3


def _moments(h: Histogram, n: int) -> tuple[float, float]:
    """(mean, standard deviation) of ``h`` over ``n`` requests (absent ones count 0)."""
    if not n:
        return 0.0, 0.0
    mean = h.sum / n
    var = max(0.0, h.sumsq / n - mean * mean)
    return mean, math.sqrt(var)


def _finite(v: float) -> float | None:
    return None if v != v or math.isinf(v) else v


def group_report(route: str, upstream: str, phases: dict[str, Histogram],
                 total: Histogram) -> dict:
    n = total.count
    rows = []
    for name, h in phases.items():
        count = h.count
        if not count:
            continue
        mean, sd = _moments(h, n) if n else _moments(h, count)
        rows.append({"phase": name, "count": count, "mean": mean, "stddev": sd,
                     "p99": _finite(h.quantile(0.99)), "weight": mean + 2 * sd,
                     "in_chain": name in CHAIN, "heaviest": False})
    chain = sorted((r for r in rows if r["in_chain"]), key=lambda r: -r["weight"])
    for r in chain[:HEAVIEST]:
        r["heaviest"] = True
    sum_mean = sum(r["mean"] for r in chain)
    sum_var = sum(r["stddev"] ** 2 for r in chain)
    return {
        "route": route,
        "upstream": upstream,
        "requests": n,
        "phases": rows,
        "critical_path": [r["phase"] for r in chain[:HEAVIEST]],
        "model_p99": sum_mean + Z99 * math.sqrt(sum_var) if chain else None,
        "measured_p99": _finite(total.quantile(0.99)),
        "measured_mean": total.sum / n if n else None,
    }


def report(metrics: Metrics) -> dict:
    """Every (route, upstream) with requests, busiest first."""
    groups = [group_report(route, upstream, g.phases, g.total)
              for (route, upstream), g in metrics.groups.items() if g.total.count]
    groups.sort(key=lambda g: (-g["requests"], g["route"], g["upstream"]))
    return {"model": "P99 ~ sum(mean) + 2.33 * sqrt(sum(stddev^2)) over the chain "
                     + " -> ".join(CHAIN),
            "groups": groups}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.3f}"


def render(rep: dict) -> str:
    """The report as a text table per (route, upstream)."""
    out = []
    for g in rep["groups"]:
        route = g["route"] or "(listener default)"
        out.append(f"route {route}  upstream {g['upstream'] or '-'}  "
                   f"requests {g['requests']}")
        out.append(f"  {'phase':<22}{'count':>9}{'mean ms':>11}{'sd ms':>11}{'p99 ms':>11}"
                   f"{'weight ms':>11}")
        for r in g["phases"]:
            mark = " *" if r["heaviest"] else ("  (in accept_to_headers)"
                                               if not r["in_chain"] else "")
            out.append(f"  {r['phase']:<22}{r['count']:>9}{_ms(r['mean']):>11}"
                       f"{_ms(r['stddev']):>11}{_ms(r['p99']):>11}{_ms(r['weight']):>11}{mark}")
        out.append(f"  critical path (* heaviest by mean + 2 sd): "
                   f"{', '.join(g['critical_path']) or '-'}")
        out.append(f"  P99 model {_ms(g['model_p99'])} ms   measured {_ms(g['measured_p99'])} ms"
                   f"   (mean {_ms(g['measured_mean'])} ms)")
        out.append("")
    if not out:
        return "no requests yet\n"
    out.append(rep["model"])
    return "\n".join(out) + "\n"
