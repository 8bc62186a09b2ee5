"""Sans-IO load balancing: which server (or which upstream of a split) gets a request.

Nothing here touches a socket or a clock: the algorithms work on :class:`Peer` objects
(``forkproxy.worker.upstream.Server`` is one) and on bytes, so the distributions are
tested by calling them in a loop (tests/test_balancer.py).

Weights. Every peer has its configured ``weight`` and an ``eff_weight`` = weight x
:data:`WEIGHT_SCALE`, lowered while the server slow-starts (see Upstream.refresh). The
scale keeps slow start smooth with integer arithmetic for weight 1 servers, and does
not change any sequence for static weights (all are scaled alike).

Algorithms (``balance`` in [upstream.NAME]):

``round_robin``
    nginx's smooth weighted round-robin: each pick adds every peer's weight to its
    ``current_weight``, takes the largest and subtracts the total from it. Weights 5:1:1
    give a a b a c a a, never a a a a a b c.
``least_conn``
    fewest active requests relative to weight (``active / eff_weight``, compared by
    cross-multiplication); ties are broken by smooth weighted round-robin among the
    tied peers, so an idle upstream still gets the configured proportions.
``random_two``
    power of two choices: two distinct peers drawn at random in proportion to weight,
    the one with fewer active requests relative to weight wins (the first on a tie).
``hash``
    weighted rendezvous (highest random weight) hashing on a key taken from the request
    (``header:NAME``, ``cookie:NAME`` or ``ip``): every peer scores
    ``eff_weight / -ln(u)`` with ``u`` a uniform hash of (key, peer); the highest score
    wins. A peer's expected share is exactly its share of the weight, and when a peer
    leaves (down, ejected, or already tried by a retry) only its own keys move, each to
    its next-best peer. A request without the key falls back to round-robin.

All of them skip peers that are not ``usable`` (down, ejected) and peers in ``exclude``
(the servers a retry already tried). ``pick`` returns None when nothing is left.
"""

from __future__ import annotations

import math
from _random import Random  # random.Random's C generator: not the random module's ~0.2 MiB
from bisect import bisect_right

from forkproxy.context import WEIGHT_SCALE
from forkproxy.hashing import hash64, mix64, unit

_log = math.log


class Peer:
    """What the algorithms need of a server. Subclassed by upstream.Server."""

    __slots__ = ("weight", "eff_weight", "current_weight", "usable", "active", "seed")

    def __init__(self, weight: int = 1, seed: int = 0):
        self.weight = weight
        self.eff_weight = weight * WEIGHT_SCALE
        self.current_weight = 0
        self.usable = True
        self.active = 0
        self.seed = seed  # per-peer hash salt (from its address): same in every worker


def _swrr(peers, exclude):
    """Smooth weighted round-robin over the usable peers not in exclude."""
    best = None
    total = 0
    for p in peers:
        if not p.usable or (exclude is not None and p in exclude):
            continue
        w = p.eff_weight
        p.current_weight += w
        total += w
        if best is None or p.current_weight > best.current_weight:
            best = p
    if best is not None:
        best.current_weight -= total
    return best


class RoundRobin:
    name = "round_robin"
    keyed = False

    def pick(self, peers, exclude=None, key=None):
        return _swrr(peers, exclude)


class LeastConn:
    name = "least_conn"
    keyed = False

    def pick(self, peers, exclude=None, key=None):
        best = None
        tied = False
        for p in peers:
            if not p.usable or (exclude is not None and p in exclude):
                continue
            if best is None:
                best = p
                continue
            a = p.active * best.eff_weight
            b = best.active * p.eff_weight
            if a < b:
                best = p
                tied = False
            elif a == b:
                tied = True
        if not tied:
            return best
        ba, bw = best.active, best.eff_weight
        ties = [p for p in peers
                if p.usable and (exclude is None or p not in exclude)
                and p.active * bw == ba * p.eff_weight]
        return _swrr(ties, None)


class RandomTwo:
    name = "random_two"
    keyed = False

    def __init__(self, rng: Random | None = None):
        self.random = (rng or Random()).random

    def pick(self, peers, exclude=None, key=None):
        cands = [p for p in peers if p.usable and (exclude is None or p not in exclude)]
        n = len(cands)
        if n <= 1:
            return cands[0] if cands else None
        cum = []
        total = 0
        for p in cands:
            total += p.eff_weight
            cum.append(total)
        rnd = self.random
        a = cands[bisect_right(cum, rnd() * total)]
        b = a
        for _ in range(8):  # a second, different peer (weighted)
            b = cands[bisect_right(cum, rnd() * total)]
            if b is not a:
                break
        else:
            return a
        if b.active * a.eff_weight < a.active * b.eff_weight:
            return b
        return a


class RendezvousHash:
    name = "hash"
    keyed = True

    def pick(self, peers, exclude=None, key=None):
        if key is None:
            return _swrr(peers, exclude)
        best = None
        best_score = -1.0
        for p in peers:
            if not p.usable or (exclude is not None and p in exclude):
                continue
            score = p.eff_weight / -_log(unit(mix64(key ^ p.seed)))
            if score > best_score:
                best, best_score = p, score
        return best


def make_balancer(name: str):
    if name == "least_conn":
        return LeastConn()
    if name == "random_two":
        return RandomTwo()
    if name == "hash":
        return RendezvousHash()
    return RoundRobin()


# -- request keys ----------------------------------------------------------------------------


class KeySpec:
    """Where a request's hash key comes from: "header:NAME", "cookie:NAME" or "ip".

    :meth:`key` returns the key as a 64-bit hash (salted per use, so a split and the
    balancing inside the chosen upstream never correlate), or None when the request does
    not carry it.
    """

    __slots__ = ("kind", "name", "salt", "text")

    def __init__(self, text: str, salt: bytes = b""):
        self.text = text
        self.salt = salt
        kind, _, name = text.partition(":")
        kind = kind.strip().lower()
        name = name.strip()
        if kind == "ip" and not name:
            self.kind, self.name = "ip", b""
        elif kind in ("header", "cookie") and name:
            self.kind = kind
            self.name = name.encode("latin-1").lower() if kind == "header" else name.encode("latin-1")
        else:
            raise ValueError(f"expected 'header:NAME', 'cookie:NAME' or 'ip', got {text!r}")

    def raw(self, req, remote: str) -> bytes | None:
        """The key's bytes in this request, or None."""
        kind = self.kind
        if kind == "ip":
            return remote.encode() if remote else None
        if kind == "header":
            return header_value(req, self.name)
        return cookie_value(req, self.name)

    def key(self, req, remote: str) -> int | None:
        raw = self.raw(req, remote)
        if not raw:
            return None
        return hash64(raw, self.salt)


#: headers the request parser keeps out of Request.headers, by lower-case name
_SPECIAL = {b"host": "host", b"x-request-id": "request_id", b"x-forwarded-for": "forwarded_for"}


def header_value(req, lname: bytes) -> bytes | None:
    """The first value of a request header (``lname`` lower-case)."""
    special = _SPECIAL.get(lname)
    if special is not None:
        return getattr(req, special) or None
    n = len(lname)
    for name, value in req.headers:
        if len(name) == n and name.lower() == lname:
            return value
    return None


def cookie_value(req, name: bytes) -> bytes | None:
    """The value of cookie ``name`` (case-sensitive, RFC 6265) from the Cookie headers."""
    for hname, value in req.headers:
        if len(hname) != 6 or hname.lower() != b"cookie":
            continue
        for pair in value.split(b";"):
            k, sep, v = pair.partition(b"=")
            if sep and k.strip() == name:
                return v.strip().strip(b'"')
    return None


# -- traffic split ---------------------------------------------------------------------------


class Split:
    """A route's weighted split between upstreams (canary releases).

    ``choose(req, remote)`` returns the upstream for one request:

    1. the override header (``X-Canary: v2``) naming one of the split's upstreams wins;
    2. with a hash key, the key's hash picks a point in [0, total weight) and the targets
       own consecutive ranges in config order: the same client always lands on the same
       upstream, and raising the last target's weight (5 -> 10) only moves clients into
       it, never out of it;
    3. otherwise smooth weighted round-robin: exact proportions in every worker.
    """

    __slots__ = ("targets", "weights", "cum", "total", "key", "override", "by_name", "rr")

    SALT = b"fp-split"
    split = True  # a route target that is not an Upstream

    def __init__(self, targets: list[tuple[object, int]], key: KeySpec | None = None,
                 override: str = ""):
        self.targets = [t for t, _ in targets]
        self.weights = [w for _, w in targets]
        self.cum = []
        total = 0
        for w in self.weights:
            total += w
            self.cum.append(total)
        self.total = total
        self.key = key
        self.override = override.lower().encode("latin-1") if override else b""
        self.by_name = {getattr(t, "name", str(t)).encode(): t for t in self.targets}
        self.rr = [0] * len(self.targets)

    def choose(self, req, remote: str):
        if self.override:
            want = header_value(req, self.override)
            if want:
                t = self.by_name.get(want.strip())
                if t is not None:
                    return t
        key = self.key
        if key is not None:
            h = key.key(req, remote)
            if h is not None:
                return self.targets[bisect_right(self.cum, unit(mix64(h)) * self.total)]
        return self.targets[self.next_rr()]

    def next_rr(self) -> int:
        rr = self.rr
        weights = self.weights
        best = -1
        for i, w in enumerate(weights):
            rr[i] += w
            if best < 0 or rr[i] > rr[best]:
                best = i
        rr[best] -= self.total
        return best


# -- retry budget ----------------------------------------------------------------------------


class RetryBudget:
    """Retries allowed = ``minimum`` + ``ratio`` x requests, over the last one to two windows.

    Counted in two buckets (this window and the previous one) so the budget follows
    recent traffic without a timer. A retry storm against a failing upstream is capped at
    ``ratio`` extra load (Linkerd's and Finagle's retry budgets work the same way).
    """

    __slots__ = ("ratio", "minimum", "window", "start", "requests", "retries",
                 "prev_requests", "prev_retries", "denied")

    def __init__(self, ratio: float, minimum: int, window: float = 5.0):
        self.ratio = ratio
        self.minimum = minimum
        self.window = window
        self.start = 0.0
        self.requests = self.retries = self.prev_requests = self.prev_retries = 0
        self.denied = 0

    def _roll(self, now: float) -> None:
        if now - self.start >= self.window:
            if now - self.start >= 2 * self.window:
                self.prev_requests = self.prev_retries = 0
            else:
                self.prev_requests, self.prev_retries = self.requests, self.retries
            self.requests = self.retries = 0
            self.start = now

    def request(self, now: float) -> None:
        if now - self.start >= self.window:
            self._roll(now)
        self.requests += 1

    def can(self, now: float) -> bool:
        """True if one more retry would fit the budget (nothing counted)."""
        self._roll(now)
        return (self.retries + self.prev_retries + 1
                <= self.minimum + self.ratio * (self.requests + self.prev_requests))

    def allow(self, now: float) -> bool:
        """True if one more retry fits the budget (and counts it)."""
        if not self.can(now):
            self.denied += 1
            return False
        self.retries += 1
        return True
