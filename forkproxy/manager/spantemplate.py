"""Span templates: the OTLP bytes of a request's spans, serialised once per request shape
by the opentelemetry-proto classes, with each request's ids and times patched in.

Every field of a span that varies per request and is not a label is fixed-width in the
OTLP schema: trace_id (16 bytes), span_id and parent_span_id (8), start and end times
(fixed64). So for one *shape* (everything SpanEncoder.shape keys on, whether the client
sent a parent, and which phases happened) the server span and its phase spans are
serialised once with sentinel ids and times; the sentinels' offsets split the bytes into
constant pieces and slots. In the compiled build spanfill.py writes them (the pieces as
one image whose slots it stores in C); otherwise one ``struct.Struct`` per shape writes a
request's spans in a single ``pack`` call (the constants are passed as ``Ns`` arguments;
generated code passes them in order). Both write the same pieces, and the tests compare
both with the protobuf classes' bytes. The variable-length attributes (url.path, client.address, body
sizes) and tracestate follow the template as serialised repeated fields of the server
span (protobuf concatenates repeated fields, and accepts fields in any order); the
server span's length is the official varint encoder's.

Each template is checked when it is made: filled with a second set of random ids and
times it must equal what the protobuf classes serialise for them, or the shape is left
to the slow builder (spans.SpanEncoder.add). The number of templates is bounded.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from itertools import islice

from google.protobuf.internal.encoder import _VarintBytes
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span

from forkproxy.context import RequestContext
from forkproxy.manager.spanfill import MAX_BODY, Template

#: templates kept at most (~7 KiB each); when full, the oldest quarter goes
MAX_TEMPLATES = 512
#: a shape gets its template when seen this often (making one costs ~10 times the
#: protobuf builder's encoding of a request: rare shapes stay with the builder)
MAKE_AFTER = 16
#: values (paths, clients, sizes, tracestates) whose serialised attribute is kept
MAX_VALUES = 8192
#: the server span's length is written as a 2-byte varint in a template: bodies of
#: 128..16383 bytes (any other length goes to the slow builder)
MIN_BODY = 1 << 7
#: the id lengths (trace, span, parent) a template's slots hold
ID_SIZES = ((16, 8, 0), (16, 8, 8))
#: slot name -> struct format; "n<i>" is time index i in Unix nanoseconds, "c<i>" the
#: span id of child i (little-endian: server span id ^ i), "start"/"end" the server's
SLOT_FORMATS = {"tid": "16s", "sid": "8s", "psid": "8s", "start": "Q", "end": "Q",
                **{f"n{i}": "Q" for i in range(8)}, **{f"c{i}": "Q" for i in range(1, 7)}}


def field_tag(message_cls, name: str) -> bytes:
    """The tag bytes of a repeated message field, as protobuf serialises it (an empty
    sub-message is the tag and a zero length)."""
    msg = message_cls()
    getattr(msg, name).add()
    return msg.SerializeToString()[:-1]


def _kv(key: str, value) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def child_span_id(span_id: bytes, i: int) -> bytes:
    """Phase span i's id, derived from the server span's (unique within the request;
    written as a little-endian integer so templates pack it as one)."""
    base = int.from_bytes(span_id, "little")
    return ((base ^ i) or (i << 56)).to_bytes(8, "little")


def random_values() -> dict[str, object]:
    """One random value per slot (sentinels: 64 random bits do not occur by chance)."""
    vals: dict[str, object] = {"tid": os.urandom(16), "sid": os.urandom(8),
                               "psid": os.urandom(8)}
    for name, fmt in SLOT_FORMATS.items():
        if fmt == "Q":
            vals[name] = int.from_bytes(os.urandom(8), "little") | (1 << 63)
    return vals


def slot_bytes(value) -> bytes:
    """A slot value as the template holds it (ids as they are, times little-endian)."""
    return value if isinstance(value, bytes) else struct.pack("<Q", value)


def split(data: bytes, vals: dict[str, object]) -> list[tuple[str, object]]:
    """``data`` as a list of ("const", bytes) and ("slot", name) pieces, found by the
    sentinel values ``vals``."""
    hits = []
    for name, value in vals.items():
        needle = slot_bytes(value)
        at = data.find(needle)
        while at >= 0:
            hits.append((at, len(needle), name))
            at = data.find(needle, at + len(needle))
    hits.sort()
    pieces: list[tuple[str, object]] = []
    pos = 0
    for at, width, name in hits:
        if at < pos:
            raise ValueError("overlapping sentinels")
        if at > pos:
            pieces.append(("const", data[pos:at]))
        pieces.append(("slot", name))
        pos = at + width
    if pos < len(data):
        pieces.append(("const", data[pos:]))
    return pieces


def pack_layout(pieces: list[tuple[str, object]]) -> tuple[struct.Struct, list[str]]:
    """The Struct writing ``pieces`` in one call, and its arguments: constant names
    ("C0", "C1"...) and slot names, in order."""
    fmt = ["<"]
    args = []
    consts = 0
    for kind, val in pieces:
        if kind == "const":
            fmt.append(f"{len(val)}s")
            args.append(f"C{consts}")
            consts += 1
        else:
            fmt.append("2s" if val == "vn" else SLOT_FORMATS[val])
            args.append(val)
    return struct.Struct("".join(fmt)), args


def compile_fill(pieces: list[tuple[str, object]]) -> Callable:
    """Generated code for one shape: each slot's value computed once, as the slow
    builder computes it (spans.SpanEncoder.add), then the one pack call.

    ``fill(ctx, t0, ..., t7, base, vn)``: t the request's times, base its span id as a
    little-endian integer, vn the server span's length (a varint)."""
    st, args = pack_layout(pieces)
    consts = [val for kind, val in pieces if kind == "const"]
    used = {val for kind, val in pieces if kind == "slot"}
    lines = ["def fill(ctx, t0, t1, t2, t3, t4, t5, t6, t7, base, vn):",
             "    off = ctx.ts - t7"]
    exprs = {"tid": "ctx.trace_id", "sid": "ctx.span_id", "psid": "ctx.parent_span_id",
             "end": "n7" if "n7" in used else "int((t7 + off) * 1e9)",
             # n0 is used only if a phase starting at accept happened: then t0 is set
             "start": "n0" if "n0" in used else "int(((t0 or t2 or t7) + off) * 1e9)"}
    for name in sorted(used - {"vn"}, key=lambda n: n in ("start", "end")):
        if name in exprs:
            expr = exprs[name]
        elif name[0] == "n":
            expr = f"int((t{name[1]} + off) * 1e9)"
        else:  # c<i>
            expr = f"base ^ {name[1]}"
        lines.append(f"    {name} = {expr}")
    lines.append(f"    return pack({', '.join(args)})")
    source = "\n".join(lines)
    code = _CODE.get(source)  # shapes differ in their constants more than in their code
    if code is None:
        if len(_CODE) >= MAX_TEMPLATES:
            _CODE.clear()
        code = _CODE[source] = compile(source, "<span template>", "exec")
    env = {"pack": st.pack, **{f"C{i}": c for i, c in enumerate(consts)}}
    exec(code, env)  # noqa: S102
    return env["fill"]


#: compiled fill functions by their source
_CODE: dict[str, object] = {}


#: ScopeSpans.spans' tag (one entry of the repeated field)
SPAN_ENTRY_TAG = field_tag(ScopeSpans, "spans")


class Templates:
    """The templates of the shapes seen, and the serialised variable attributes.

    ``spans_for(ctx, vals)`` (from spans.SpanEncoder) gives the server span and its
    phase spans of ctx's shape with the ids and times in ``vals``, as protobuf
    messages."""

    def __init__(self, spans_for: Callable):
        self.spans_for = spans_for
        #: shape key -> its Template, or False: the shape has none (slow builder)
        self.templates: dict[tuple, Template | bool] = {}
        #: shape key -> times seen without a template (up to MAKE_AFTER)
        self.seen: dict[tuple, int] = {}
        self.values: dict[tuple, bytes] = {}
        self.varints: dict[int, bytes] = {}
        #: serialised attributes by value: url.path, client.address, and the body sizes
        #: (the response's by size, the request's by -size)
        self.paths: dict[str, bytes] = {}
        self.clients: dict[str, bytes] = {}
        self.sizes: dict[int, bytes] = {}

    def make(self, ctx: RequestContext, key: tuple) -> Template | bool:
        """The template of ctx's shape once it was seen MAKE_AFTER times, checked
        against the protobuf classes (False: the slow builder encodes this request)."""
        seen = self.seen
        n = seen.get(key, 0) + 1
        if n < MAKE_AFTER:
            if len(seen) >= 4 * MAX_TEMPLATES:
                seen.clear()
            seen[key] = n
            return False
        seen.pop(key, None)
        templates = self.templates
        if len(templates) >= MAX_TEMPLATES:  # the oldest quarter goes
            for old in list(islice(templates, MAX_TEMPLATES // 4)):
                del templates[old]
        tpl = templates[key] = self._make(ctx) or False
        return tpl

    def path_miss(self, target: str) -> bytes:
        """url.path and url.query of a request target not in the cache (bounded)."""
        if len(self.paths) >= MAX_VALUES:
            self.paths.clear()
        path, mark, query = target.partition("?")
        attrs = [_kv("url.path", path)]
        if mark:
            attrs.append(_kv("url.query", query))
        data = self.paths[target] = Span(attributes=attrs).SerializeToString()
        return data

    def path(self, target: str) -> bytes:
        """The serialised url.path (and url.query) attributes of a request target."""
        return self.paths.get(target) or self.path_miss(target)

    def miss(self, cache: dict, key: str, value, ck=None) -> bytes:
        """Serialise one attribute of a value not in ``cache`` (bounded) and keep it."""
        if len(cache) >= MAX_VALUES:
            cache.clear()
        data = cache[value if ck is None else ck] = Span(attributes=[_kv(key, value)]
                                                         ).SerializeToString()
        return data

    def _serialise(self, ctx: RequestContext, vals: dict) -> tuple[bytes, bytes]:
        server, children = self.spans_for(ctx, vals)
        return ScopeSpans(spans=children).SerializeToString(), server.SerializeToString()

    def _make(self, ctx: RequestContext) -> Template | None:
        if (len(ctx.trace_id), len(ctx.span_id), len(ctx.parent_span_id)) not in ID_SIZES:
            return None  # the slots are fixed-width: other ids go to the slow builder
        vals = random_values()
        kids, body = self._serialise(ctx, vals)
        if not MIN_BODY <= len(body) < MAX_BODY:
            return None
        try:
            pieces = [*split(kids, vals), ("const", SPAN_ENTRY_TAG), ("slot", "vn"),
                      *split(body, vals)]
        except ValueError:
            return None
        # the check: the layout filled with other ids and times must be what protobuf
        # serialises for them
        check = random_values()
        kids2, body2 = self._serialise(ctx, check)
        st, args = pack_layout(pieces)
        consts = iter(val for kind, val in pieces if kind == "const")
        check["vn"] = _VarintBytes(len(body2))
        packed = st.pack(*(next(consts) if a[0] == "C" else check[a] for a in args))
        if len(body2) != len(body) or packed != kids2 + SPAN_ENTRY_TAG + check["vn"] + body2:
            return None
        return Template(pieces, len(body), compile_fill(pieces))

    def varint(self, n: int) -> bytes:
        v = self.varints.get(n)
        if v is None:
            v = self.varints[n] = _VarintBytes(n)
        return v

    def value(self, key: str, value) -> bytes:
        """A serialised span holding one attribute (key None: the tracestate)."""
        ck = (key, value)
        data = self.values.get(ck)
        if data is None:
            span = Span(trace_state=value) if key is None else Span(
                attributes=[_kv(key, value)])
            data = span.SerializeToString()
            if len(self.values) >= MAX_VALUES:
                self.values.clear()
            self.values[ck] = data
        return data
