"""Typed configuration: TOML -> msgspec Structs, then semantic checks.

Every error carries the file and the dotted key path (``upstream.app.servers[1].weight``)
so an operator can fix it without reading code. Unknown keys are errors. Durations
("250ms", "30s", "5m", "1h") become float seconds and sizes ("8k", "1m") become ints
while decoding, so the rest of the program never parses strings.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta, Struct, field

from forkproxy.osutil import is_loopback
from forkproxy.pem import check_ca, check_cert_key, check_ciphers, check_system_ca


class ConfigError(Exception):
    """One or more `FILE: path.to.key: message` problems."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class Duration(float):
    """Seconds, written in the config as "250ms", "30s", "5m", "1h" or "1d"."""


class Size(int):
    """Bytes, written in the config as "512", "8k", "1m" or "1g"."""


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?)b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_duration(text: str) -> Duration:
    m = _DURATION_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"expected a duration like '250ms', '30s', '5m', '1h', got {text!r}")
    return Duration(float(m.group(1)) * _DURATION_UNITS[m.group(2)])


def parse_size(text: str | int) -> Size:
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return Size(text)
    m = _SIZE_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"expected a size like '512', '8k', '1m', got {text!r}")
    return Size(int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def _dec_hook(tp, obj):
    if tp is Duration:
        return parse_duration(obj)
    if tp is Size:
        return parse_size(obj)
    raise NotImplementedError(f"unsupported type {tp}")


class _Section(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


Positive = Annotated[int, Meta(ge=1)]


class ServerConfig(_Section, kw_only=True):
    workers: Positive | Literal["auto"] = "auto"
    workers_per_core: Positive = 1
    cpu_affinity: Literal["auto", "off"] | list[Annotated[int, Meta(ge=0)]] = "auto"
    pidfile: str = "forkproxy.pid"
    user: str = ""
    group: str = ""
    graceful_timeout: Duration = Duration(30.0)
    #: a worker that has not reported a heartbeat for this long is replaced
    heartbeat_timeout: Duration = Duration(30.0)
    #: idle keep-alive client connections are closed after this long
    keepalive_timeout: Duration = Duration(75.0)
    #: the whole request head must arrive within this time (408 otherwise)
    client_header_timeout: Duration = Duration(60.0)
    #: time allowed between two reads of a request body (408 otherwise)
    client_body_timeout: Duration = Duration(60.0)
    #: time allowed between two successful writes to the client
    send_timeout: Duration = Duration(60.0)
    #: longest request line accepted (414 above)
    max_request_line: Size = Size(8192)
    #: longest single header line accepted (431 above)
    max_header_size: Size = Size(8192)
    #: most header fields in one request (431 above)
    max_header_count: Positive = 100
    #: all request header bytes together (431 above)
    max_headers_total: Size = Size(32768)
    #: largest request body accepted ("0" = unlimited; 413 above)
    max_body_size: Size = Size(1024**3)
    #: copy buffer per direction for bodies
    buffer_size: Size = Size(256 * 1024)
    #: most concurrent client connections per worker (new ones wait in the kernel backlog)
    max_connections: Positive = 10000
    #: listen(2) backlog of every listening socket
    backlog: Positive = 4096
    #: relay large Content-Length response bodies with splice(2) (zero copy, plain-text
    #: clients only); pays off when the proxy has cores to itself
    splice: bool = False
    #: bytes of each worker's shared-memory ring of request contexts
    ring_size: Size = Size(1 << 20)
    #: processes that drain the rings into the metrics and the access log: the manager
    #: and collectors - 1 shard processes (fp-collector-N), each with its share of the
    #: workers; "auto": one per 16 workers (one per 4 when the record path runs as plain
    #: Python). Read when the manager starts
    collectors: Positive | Literal["auto"] = "auto"
    #: RLIMIT_NOFILE set by each worker at start (nginx's worker_rlimit_nofile); 0 = inherit
    worker_rlimit_nofile: Annotated[int, Meta(ge=0)] = 0
    #: a worker whose resident memory passes this is replaced gracefully: a new worker is
    #: started first, then the old one drains and exits (uWSGI's reload-on-rss; "0" = never)
    max_worker_rss: Size = Size(0)


class LimitsConfig(_Section, kw_only=True):
    """Per-client-IP limits over all workers (nginx's limit_conn / limit_req, nodelay)."""

    #: connections open at once from one client IP (0 = no limit)
    per_ip_connections: Annotated[int, Meta(ge=0)] = 0
    #: requests per client IP, "100r/s" or "600r/m" ("" = no limit)
    rate: str = ""
    #: requests above the rate accepted at once before refusing (nginx's burst, nodelay)
    burst: Annotated[int, Meta(ge=0)] = 50
    #: status of a request refused by either limit (nginx's limit_req_status)
    status: Annotated[int, Meta(ge=400, le=599)] = 429
    #: per-IP slots in the shared tables (a power of two; lossy on hash collisions)
    zone_slots: Annotated[int, Meta(ge=1024)] = 65536


class LogConfig(_Section, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    error_log: str = "-"
    access_log: str = "-"
    format: Literal["json", "console"] = "json"
    #: an access log in a regular file keeps at most ~3 windows of this size in the page
    #: cache: each window is written back early and dropped from memory once on disk
    #: (bounded memory and dirty backlog for a fast log; "0" = the kernel's usual caching)
    access_log_write_behind: Size = Size(16 * 1024**2)


class AdminConfig(_Section, kw_only=True):
    listen: str = "127.0.0.1:9901"
    #: required when listen is not a loopback address (sent as "Authorization: Bearer TOKEN")
    token: str = ""


class TracingConfig(_Section, kw_only=True):
    """Spans built by the manager from the ring records, exported over OTLP/HTTP."""

    #: OTLP/HTTP protobuf traces URL ("" = no export; traceparent is still propagated)
    endpoint: str = ""
    #: the service.name resource attribute of every span
    service_name: str = "forkproxy"
    #: share of requests without a sampled traceparent that are exported (head sampling)
    sample_ratio: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.01
    #: requests slower than this are always exported, as are errors (5xx, resets)
    sample_slower_than: Duration = Duration(0.5)
    #: sampled requests waiting for export at most, per collector process; more are
    #: dropped and counted
    queue_size: Annotated[int, Meta(ge=1)] = 8192
    #: requests per export request (each a server span and its phase spans; ~940 bytes
    #: each, so 2048 is ~2 MB: fewer POSTs, each with its fixed cost)
    batch_size: Annotated[int, Meta(ge=1)] = 2048
    #: longest wait before a partial batch is sent
    export_interval: Duration = Duration(1.0)
    #: an export request that takes longer is abandoned (its spans counted as dropped)
    export_timeout: Duration = Duration(5.0)


class CertificateConfig(_Section, kw_only=True):
    cert: str
    key: str
    ocsp_responder: str = ""


class TLSConfig(_Section, kw_only=True):
    certificates: list[CertificateConfig]
    session_tickets: bool = True
    #: a new ticket key every interval; tickets live two intervals and the two previous
    #: keys still decrypt them (re-issued under the new key)
    ticket_key_rotation: Duration = Duration(3600.0)
    #: nginx-style file of 80-byte keys (first encrypts) shared by several hosts, 0600
    ticket_key_file: str = ""
    ocsp_stapling: bool = True
    #: PEM file with the issuer (CA) certificate(s) of these certificates, for OCSP when a
    #: cert file holds only the leaf (like nginx's ssl_trusted_certificate); searched
    #: before the chain in the cert file. Not sent to clients.
    ocsp_issuer: str = ""
    #: first retry after a failed OCSP fetch (doubling, jittered, up to 1h)
    ocsp_retry: Duration = Duration(30.0)
    #: the former name of the listener's `protocols` (still accepted; not both)
    alpn: list[Literal["h2", "http/1.1"]] | None = None
    #: if the OpenSSL shim's self-test fails: serve with per-process tickets and no
    #: stapling (logged loudly) instead of refusing to start
    allow_degraded: bool = False


Protocol = Literal["h2", "http/1.1", "h2c"]


class ListenerConfig(_Section, kw_only=True):
    listen: str
    upstream: str = ""
    tls: TLSConfig | None = None
    proxy_protocol: bool = False
    #: protocols served, in order of preference: TLS listeners offer them through ALPN
    #: (default ["h2", "http/1.1"]); a plain listener defaults to ["http/1.1"] and may add
    #: "h2c" (HTTP/2 with prior knowledge, RFC 9113 section 3.3, on the same port)
    protocols: list[Protocol] | None = None


class Http2Config(_Section, kw_only=True):
    """Limits of each HTTP/2 client connection (RFC 9113 SETTINGS and flood bounds)."""

    #: streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS); the
    #: excess is refused with REFUSED_STREAM
    max_concurrent_streams: Annotated[int, Meta(ge=1, le=2**31 - 1)] = 128
    #: each stream's receive window (SETTINGS_INITIAL_WINDOW_SIZE): request body bytes a
    #: client may send ahead of the upstream reading them
    initial_window_size: Size = Size(65535)
    #: largest frame payload received (SETTINGS_MAX_FRAME_SIZE, 16k-16m)
    max_frame_size: Size = Size(16384)
    #: a request's header list, as RFC 9113 counts it (name + value + 32 per field;
    #: SETTINGS_MAX_HEADER_LIST_SIZE); above it the request gets 431
    max_header_list_size: Size = Size(32768)
    #: HPACK dynamic table, both directions (SETTINGS_HEADER_TABLE_SIZE)
    header_table_size: Size = Size(4096)
    #: CONTINUATION frames allowed after a HEADERS frame; more end the connection
    #: (CVE-2024-27316). A header block is at most (this + 1) x max_frame_size bytes
    max_continuations: Annotated[int, Meta(ge=0, le=64)] = 8
    #: stream resets (by the client, or for its malformed requests) a connection may
    #: make at once before GOAWAY(ENHANCE_YOUR_CALM) (rapid reset, CVE-2023-44487)
    reset_burst: Positive = 200
    #: resets per second refilled into reset_burst
    reset_rate: Annotated[float, Meta(gt=0)] = 33.0
    #: SETTINGS, PING, PRIORITY, WINDOW_UPDATE and empty DATA frames a connection may
    #: send at once before GOAWAY(ENHANCE_YOUR_CALM)
    control_frame_burst: Positive = 1000
    #: control frames per second refilled into control_frame_burst
    control_frame_rate: Annotated[float, Meta(gt=0)] = 100.0
    #: response bytes queued per stream before reading from the upstream pauses (the
    #: client's window is closed or its connection slow)
    send_buffer: Size = Size(65536)
    #: when a worker drains (HUP, QUIT, USR2): the longest wait between the shutdown
    #: notice (GOAWAY with the largest stream id, and a PING) and the final GOAWAY; the
    #: client's PING acknowledgement ends it sooner (Envoy's drain_timeout)
    drain_timeout: Duration = Duration(2.0)


class SplitTarget(_Section, kw_only=True):
    #: upstream that gets this share of the route's requests
    upstream: str
    #: share of the route's requests, relative to the other targets' weights
    weight: Annotated[int, Meta(ge=0)] = 1


class RouteConfig(_Section, kw_only=True):
    host: str = "*"
    path_prefix: str = "/"
    #: upstream that serves matching requests (or give split instead)
    upstream: str = ""
    #: weighted traffic split between upstreams instead of one upstream (canary), e.g.
    #: [{ upstream = "v1", weight = 95 }, { upstream = "v2", weight = 5 }]; changed by HUP
    split: list[SplitTarget] = field(default_factory=list)
    #: with split: keep each client on one upstream by "header:NAME", "cookie:NAME" or
    #: "ip" ("" = exact weighted round robin, no stickiness)
    hash: str = ""
    #: with split: a request whose header of this name names one of the split's upstreams
    #: goes there ("" disables the override)
    canary_header: str = "X-Canary"


class ServerAddress(_Section, kw_only=True):
    #: "HOST:PORT" or "[V6]:PORT"; with resolve, HOST is a DNS name whose A and AAAA
    #: records are the servers (each on PORT)
    address: str = ""
    #: instead of address: an SRV name ("_http._tcp.app.internal") whose records give the
    #: servers' targets, ports and weights (the lowest priority only); needs resolve
    srv: str = ""
    #: share of requests relative to the other servers (each resolved address gets it;
    #: SRV records carry their own weights)
    weight: Positive = 1
    #: re-resolve the name this often, in the manager, without a reload; servers that
    #: appear are added and servers that disappear drained ("0s" = a fixed address)
    resolve: Duration = Duration(0.0)


class HealthCheckConfig(_Section, kw_only=True):
    #: "http": GET ``path``; "grpc": the gRPC health protocol's
    #: grpc.health.v1.Health/Check for ``service`` over HTTP/2 (the upstream's protocol
    #: must be "h2c" or "h2"), a SERVING answer in time is a success
    type: Literal["http", "grpc"] = "http"
    #: path requested with GET; a 2xx or 3xx answer in time is a success
    path: str = "/healthz"
    #: type = "grpc": the service asked about ("" = the server as a whole)
    service: str = ""
    #: time between two checks of one server
    interval: Duration = Duration(2.0)
    #: a check that takes longer (connect included) failed
    timeout: Duration = Duration(1.0)
    #: consecutive successes that bring a down server back up
    rise: Positive = 2
    #: consecutive failures that take a server down
    fall: Positive = 3
    #: Host header of the check ("" = the server's address)
    host: str = ""


class TcpKeepaliveConfig(_Section, kw_only=True):
    #: SO_KEEPALIVE on upstream connections
    enabled: bool = True
    #: idle time before the first probe (TCP_KEEPIDLE)
    idle: Duration = Duration(60.0)
    #: time between probes (TCP_KEEPINTVL)
    interval: Duration = Duration(10.0)
    #: unanswered probes before the connection is dropped (TCP_KEEPCNT)
    count: Positive = 6


class UpstreamHttp2Config(_Section, kw_only=True):
    """HTTP/2 to an upstream's servers (``protocol = "h2c"`` or ``"h2"``)."""

    #: multiplexed connections per worker and server at most: another is opened when
    #: every one carries the server's SETTINGS_MAX_CONCURRENT_STREAMS; past that a
    #: request waits up to queue_timeout for a stream, then gets 503
    max_connections: Positive = 4
    #: a connection with no frame from the server for this long is sent a PING
    ping_interval: Duration = Duration(10.0)
    #: a PING unanswered this long closes the connection (a passive failure)
    ping_timeout: Duration = Duration(5.0)


TLSVersion = Literal["TLSv1.2", "TLSv1.3"]


class UpstreamTLSConfig(_Section, kw_only=True):
    """TLS to an upstream's servers (nginx's proxy_ssl_*, HAProxy's ``ssl verify required``)."""

    #: verify the server's certificate chain and name; false encrypts without any check
    #: (nginx's default, never forkproxy's)
    verify: bool = True
    #: PEM file of the CAs that sign the servers' certificates ("" = the system store)
    ca: str = ""
    #: name sent as SNI and checked against the certificate ("" = the host of the
    #: server's address; an IP address is checked against the certificate's IP SANs and
    #: sends no SNI)
    server_name: str = ""
    #: client certificate (PEM, chain after the leaf) for servers that require mTLS
    cert: str = ""
    #: its private key (PEM, unencrypted)
    key: str = ""
    #: protocols offered through ALPN ([] = no ALPN extension)
    alpn: list[str] = field(default_factory=lambda: ["http/1.1"])
    #: oldest TLS version offered (with max_version: nginx's proxy_ssl_protocols,
    #: HAProxy's ssl-min-ver / ssl-max-ver)
    min_version: TLSVersion = "TLSv1.2"
    #: newest TLS version offered
    max_version: TLSVersion = "TLSv1.3"
    #: OpenSSL cipher list for TLS 1.2 ("" = Mozilla intermediate: ECDHE with AES-GCM or
    #: ChaCha20); TLS 1.3 suites are OpenSSL's defaults
    ciphers: str = ""
    #: resume sessions on new connections (a per-worker session kept per server: a
    #: resumed handshake costs the server a quarter of a full one)
    session_reuse: bool = True


class UpstreamConfig(_Section, kw_only=True):
    servers: Annotated[list[ServerAddress], Meta(min_length=1)]
    #: "round_robin" (smooth weighted), "least_conn", "random_two" (power of two choices)
    #: or "hash" (consistent: weighted rendezvous hashing on the hash key)
    balance: Literal["round_robin", "least_conn", "random_two", "hash"] = "round_robin"
    #: balance = "hash": the key, "header:NAME", "cookie:NAME" or "ip"; requests
    #: without it are balanced round robin
    hash: str = ""
    keepalive: Annotated[int, Meta(ge=0)] = 64
    keepalive_timeout: Duration = Duration(55.0)
    keepalive_requests: Positive = 10000
    #: connections per worker and server, active and idle (0 = unlimited); a request
    #: finding all in use waits up to queue_timeout for one, then gets 503
    max_connections: Annotated[int, Meta(ge=0)] = 0
    #: longest wait for a connection under max_connections
    queue_timeout: Duration = Duration(5.0)
    #: upstream connections are not reused once this old ("0s" = no limit)
    max_connection_age: Duration = Duration(0.0)
    #: TCP keep-alive probes on upstream connections
    tcp_keepalive: TcpKeepaliveConfig = field(default_factory=TcpKeepaliveConfig)
    connect_timeout: Duration = Duration(2.0)
    read_timeout: Duration = Duration(30.0)
    send_timeout: Duration = Duration(30.0)
    #: passive health: this many failures (connect errors, resets, timeouts, retried
    #: statuses) within fail_timeout take a server out for fail_timeout, in each worker
    #: on its own (0 = never; ignored for a single-server upstream)
    max_fails: Annotated[int, Meta(ge=0)] = 1
    #: the window of max_fails and how long an ejected server stays out
    fail_timeout: Duration = Duration(10.0)
    #: active health checks, run once for all workers by the helper process
    health_check: HealthCheckConfig | None = None
    #: a server coming back (health check up, ejection over) ramps its weight from
    #: near zero to its full weight over this long ("0s" = at once)
    slow_start: Duration = Duration(0.0)
    #: further tries on another server after a failed one (see retry_on)
    retries: Annotated[int, Meta(ge=0)] = 1
    #: what is retried: "connect_failure" (refused, unreachable, connect timeout: any
    #: method), and, for idempotent requests without a body, "timeout" (no response head
    #: within per_try_timeout / read_timeout), "reset" (closed before any response
    #: byte), "502", "503", "504" (the server's answer). Never once response bytes went
    #: to the client
    retry_on: list[Literal["connect_failure", "timeout", "reset", "502", "503", "504"]] = field(
        default_factory=lambda: ["connect_failure", "reset"])
    #: retries allowed per worker and upstream, as a share of its recent requests (the
    #: last 5-10 s) on top of retry_budget_min
    retry_budget: Annotated[float, Meta(ge=0.0)] = 0.2
    #: retries allowed in each 5 s window whatever the traffic
    retry_budget_min: Annotated[int, Meta(ge=0)] = 10
    #: bounds each try's connect and its wait for the response head ("0s" = the
    #: connect_timeout and read_timeout alone)
    per_try_timeout: Duration = Duration(0.0)
    #: an upgraded connection (WebSocket) with no bytes either way for this long is closed
    tunnel_timeout: Duration = Duration(3600.0)
    #: TLS to the servers, e.g. { ca = "ca.pem", server_name = "app.internal" }; a
    #: certificate that fails verification is a 502 (reason in the error log), never a
    #: fallback to plain text. Health checks use it too
    tls: UpstreamTLSConfig | None = None
    #: what the servers speak: "http/1.1", "h2c" (HTTP/2 over plain TCP, prior
    #: knowledge) or "h2" (HTTP/2 over TLS, agreed by ALPN: needs tls)
    protocol: Literal["http/1.1", "h2c", "h2"] = "http/1.1"
    #: HTTP/2 connections (protocol "h2c" / "h2"), e.g. { max_connections = 2 }
    http2: UpstreamHttp2Config = field(default_factory=UpstreamHttp2Config)


class ResolverConfig(_Section, kw_only=True):
    """DNS for the servers given with ``resolve``."""

    #: DNS servers asked, in order: "IP" (port 53) or "IP:PORT" / "[V6]:PORT"; empty = the
    #: nameservers of /etc/resolv.conf
    nameservers: list[str] = field(default_factory=list)
    #: one resolution (every query of it, every nameserver tried) gives up after this
    #: long; the last good set of servers is kept
    timeout: Duration = Duration(2.0)


class Config(_Section, kw_only=True):
    server: ServerConfig = field(default_factory=ServerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    listener: list[ListenerConfig] = field(default_factory=list)
    http2: Http2Config = field(default_factory=Http2Config)
    route: list[RouteConfig] = field(default_factory=list)
    upstream: dict[str, UpstreamConfig] = field(default_factory=dict)
    resolver: ResolverConfig = field(default_factory=ResolverConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    #: the file this was loaded from (set by load(), not a config key)
    path: str = ""


# -- addresses -------------------------------------------------------------------------


class ListenAddress(Struct, frozen=True):
    """One parsed `listen` value. iface is set for "IFACE:PORT"."""

    host: str
    port: int
    iface: str = ""
    wildcard: bool = False


def parse_listen(text: str) -> ListenAddress:
    """Parse "HOST:PORT", "[V6]:PORT", "*:PORT" or "IFACE:PORT" (no name resolution)."""
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(f"expected 'HOST:PORT', '[V6]:PORT', '*:PORT' or 'IFACE:PORT', got {text!r}")
    if text.startswith("["):
        end = text.find("]:")
        if end < 0:
            raise ValueError(f"expected '[V6]:PORT', got {text!r}")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address")
    else:
        host, _, port_text = text.rpartition(":")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 0-65535, got {port_text!r}")
    port = int(port_text)
    if host == "*":
        return ListenAddress("0.0.0.0", port, wildcard=True)
    try:
        ipaddress.ip_address(host)
        return ListenAddress(host, port)
    except ValueError:
        pass
    if not host:
        raise ValueError(f"missing host in {text!r}")
    if _is_interface(host):
        return ListenAddress("", port, iface=host)
    return ListenAddress(host, port)


def _is_interface(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


def parse_hostport(text: str) -> tuple[str, int]:
    """Upstream server address "HOST:PORT" or "[V6]:PORT"."""
    addr = parse_listen(text)
    if addr.iface or addr.wildcard:
        raise ValueError(f"expected 'HOST:PORT', got {text!r}")
    return addr.host, addr.port


# -- loading ---------------------------------------------------------------------------

_PATH_RE = re.compile(r" - at `\$(.*)`$")


def _format_validation(path: str, exc: msgspec.ValidationError, prefix: str = "") -> str:
    msg = str(exc)
    key = ""
    m = _PATH_RE.search(msg)
    if m:
        key = m.group(1).lstrip(".")
        msg = msg[: m.start()]
    if prefix:
        key = f"{prefix}.{key}" if key and not key.startswith("[") else prefix + key
    # msgspec says "Expected `int` >= 1"; keep its words, drop the backticks
    msg = msg.replace("`", "")
    if msg.startswith("Expected"):
        msg = "e" + msg[1:]
    if msg.startswith("Object contains unknown field"):
        field_name = msg.split()[-1].strip("'\"")
        key = f"{key}.{field_name}" if key else field_name
        msg = "unknown key"
    if msg.startswith("Object missing required field"):
        field_name = msg.split()[-1].strip("'\"")
        key = f"{key}.{field_name}" if key else field_name
        msg = "required key is missing"
    return f"{path}: {key or '(top)'}: {msg}"


def load(path: str, *, check_files: bool = True) -> Config:
    """Read, decode and validate a config file; raise ConfigError listing every problem."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: (file): {e.strerror}"])
    return loads(data, path, check_files=check_files)


def loads(data: bytes | str, path: str = "<string>", *, check_files: bool = True) -> Config:
    try:
        raw = tomllib.loads(data.decode() if isinstance(data, bytes) else data)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: (syntax): {e}"])
    # upstreams are converted one by one so errors name the upstream (msgspec says [...])
    ups = raw.get("upstream")
    if isinstance(ups, dict):
        converted = {}
        for name, value in ups.items():
            try:
                converted[name] = msgspec.convert(value, UpstreamConfig, dec_hook=_dec_hook)
            except msgspec.ValidationError as e:
                raise ConfigError([_format_validation(path, e, f"upstream.{name}")])
        raw["upstream"] = converted
    try:
        cfg = msgspec.convert(raw, Config, dec_hook=_dec_hook)
    except msgspec.ValidationError as e:
        raise ConfigError([_format_validation(path, e)])
    cfg = msgspec.structs.replace(cfg, path=os.path.abspath(path) if path != "<string>" else path)
    problems = validate(cfg, check_files=check_files)
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    return cfg


def validate(cfg: Config, *, check_files: bool = True) -> list[str]:
    """Cross-field checks msgspec cannot express; returns 'key: message' strings."""
    problems: list[str] = []
    base = config_dir(cfg)
    if not cfg.listener:
        problems.append("listener: at least one [[listener]] is required")
    seen: dict[ListenAddress, int] = {}
    for i, lst in enumerate(cfg.listener):
        key = f"listener[{i}]"
        try:
            addr = parse_listen(lst.listen)
            if addr in seen:
                problems.append(f"{key}.listen: same address as listener[{seen[addr]}]")
            seen[addr] = i
        except ValueError as e:
            problems.append(f"{key}.listen: {e}")
        if lst.upstream and lst.upstream not in cfg.upstream:
            problems.append(f"{key}.upstream: no upstream named {lst.upstream!r}")
        if not lst.upstream and not cfg.route:
            problems.append(f"{key}.upstream: required when no [[route]] is defined")
        if lst.tls is not None:
            problems.extend(_validate_tls(f"{key}.tls", lst.tls, base, check_files))
    problems.extend(_validate_http2(cfg))
    tls_files = {(lst.tls.ticket_key_file, lst.tls.ticket_key_rotation)
                 for lst in cfg.listener if lst.tls is not None}
    if len(tls_files) > 1:
        problems.append("listener.tls: every TLS listener shares one ticket key store: "
                        "ticket_key_file and ticket_key_rotation must be the same")
    for i, route in enumerate(cfg.route):
        key = f"route[{i}]"
        problems.extend(_validate_route_target(key, route, cfg))
        if not route.path_prefix.startswith("/"):
            problems.append(f"{key}.path_prefix: must start with '/'")
        host = route.host
        if host != "*" and (not host or "*" in host.lstrip("*.") or (host.startswith("*") and not host.startswith("*."))):
            problems.append(f"{key}.host: expected an exact host, '*.suffix' or '*', got {host!r}")
    for name, up in cfg.upstream.items():
        problems.extend(_validate_upstream(f"upstream.{name}", up, base, check_files))
    problems.extend(_validate_resolver(cfg, check_files))
    if cfg.admin.listen:
        try:
            addr = parse_listen(cfg.admin.listen)
            if not is_loopback(addr.host, addr.iface) and not cfg.admin.token:
                problems.append("admin.token: required when admin.listen is not a loopback address")
        except ValueError as e:
            problems.append(f"admin.listen: {e}")
    if isinstance(cfg.server.cpu_affinity, list):
        usable = os.sched_getaffinity(0)
        for j, cpu in enumerate(cfg.server.cpu_affinity):
            if cpu not in usable:
                problems.append(f"server.cpu_affinity[{j}]: CPU {cpu} is not usable (usable: {sorted(usable)})")
    if cfg.server.user:
        import pwd

        try:
            pwd.getpwnam(cfg.server.user)
        except KeyError:
            problems.append(f"server.user: no such user {cfg.server.user!r}")
    if cfg.server.group:
        import grp

        try:
            grp.getgrnam(cfg.server.group)
        except KeyError:
            problems.append(f"server.group: no such group {cfg.server.group!r}")
    if cfg.log.level not in ("debug", "info", "warning", "error"):
        problems.append("log.level: unknown level")
    lim = cfg.limits
    if lim.rate:
        try:
            parse_rate(lim.rate)
        except ValueError as e:
            problems.append(f"limits.rate: {e}")
    if lim.zone_slots & (lim.zone_slots - 1):
        problems.append(f"limits.zone_slots: must be a power of two, got {lim.zone_slots}")
    return problems + _validate_tracing(cfg.tracing)


def _validate_tracing(tracing: TracingConfig) -> list[str]:
    if not tracing.endpoint:
        return []
    try:
        parse_endpoint(tracing.endpoint)
    except ValueError as e:
        return [f"tracing.endpoint: {e}"]
    return []


class Endpoint(Struct, frozen=True):
    """A parsed http(s) URL of an exporter's receiver."""

    tls: bool
    host: str
    port: int
    path: str


def parse_endpoint(url: str) -> Endpoint:
    """"http://HOST:PORT/PATH" or "https://..." (no user info, no query)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"not a URL: {e}")
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    if not parts.hostname or parts.username or parts.query or parts.fragment:
        raise ValueError(f"expected http(s)://HOST[:PORT]/PATH, got {url!r}")
    tls = parts.scheme == "https"
    return Endpoint(tls, parts.hostname, port or (443 if tls else 80), parts.path or "/")


def _hash_key_problem(text: str) -> str:
    kind, _, name = text.partition(":")
    kind = kind.strip().lower()
    if (kind == "ip" and not name.strip()) or (kind in ("header", "cookie") and name.strip()):
        return ""
    return f"expected 'header:NAME', 'cookie:NAME' or 'ip', got {text!r}"


def _validate_route_target(key: str, route: RouteConfig, cfg: Config) -> list[str]:
    """A route names one upstream or a split between upstreams."""
    problems = []
    if route.split:
        if route.upstream:
            problems.append(f"{key}.upstream: give upstream or split, not both")
        seen = set()
        for j, t in enumerate(route.split):
            if t.upstream not in cfg.upstream:
                problems.append(f"{key}.split[{j}].upstream: no upstream named {t.upstream!r}")
            if t.upstream in seen:
                problems.append(f"{key}.split[{j}].upstream: {t.upstream!r} listed twice")
            seen.add(t.upstream)
        if not sum(t.weight for t in route.split):
            problems.append(f"{key}.split: at least one weight must be above 0")
    elif not route.upstream:
        problems.append(f"{key}.upstream: required (or give split)")
    elif route.upstream not in cfg.upstream:
        problems.append(f"{key}.upstream: no upstream named {route.upstream!r}")
    if route.hash:
        msg = _hash_key_problem(route.hash)
        if msg:
            problems.append(f"{key}.hash: {msg}")
    return problems


def _validate_upstream(key: str, up: UpstreamConfig, base: str, check_files: bool) -> list[str]:
    problems = _validate_servers(f"{key}.servers", up.servers)
    problems.extend(_validate_upstream_policy(key, up))
    if up.protocol == "h2" and up.tls is None:
        problems.append(f"{key}.protocol: \"h2\" is HTTP/2 over TLS: it needs tls "
                        "(\"h2c\" is HTTP/2 over plain TCP)")
    elif up.protocol == "h2c" and up.tls is not None:
        problems.append(f"{key}.protocol: \"h2c\" is HTTP/2 over plain TCP: with tls, "
                        "use \"h2\"")
    if up.tls is not None:
        problems.extend(_validate_upstream_tls(f"{key}.tls", up.tls, base, check_files))
        if not up.tls.server_name and any(s.resolve for s in up.servers) and not dns_tls_name(up):
            problems.append(f"{key}.tls.server_name: required when servers come from SRV "
                            "records or from several DNS names (the name to verify)")
    return problems


def dns_tls_name(up: UpstreamConfig) -> str:
    """The name TLS verifies on servers found through DNS when ``server_name`` is empty:
    the one DNS name their ``address`` entries resolve ("" with SRV entries or several
    names)."""
    hosts = set()
    for s in up.servers:
        if s.resolve:
            if s.srv:
                return ""
            hosts.add(parse_hostport(s.address)[0])
    return hosts.pop() if len(hosts) == 1 else ""


#: a DNS name: dot-separated labels of letters, digits, '-' and '_' (SRV's "_http._tcp")
_DNS_NAME_RE = re.compile(r"^(?=.{1,253}\.?$)([A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                          r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?$")
#: shortest resolve interval: more often only loads the DNS servers
MIN_RESOLVE = 1.0


def is_dns_name(text: str) -> bool:
    return bool(_DNS_NAME_RE.match(text)) and not _is_ip(text)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def resolved_spec(server: ServerAddress) -> str:
    """What the manager resolves for a ``resolve`` entry, as shown in /status and metrics:
    "srv:NAME" or the "NAME:PORT" address."""
    return f"srv:{server.srv}" if server.srv else server.address


def _validate_servers(key: str, servers: list[ServerAddress]) -> list[str]:
    """Fixed addresses, DNS names with resolve, SRV names (which need resolve)."""
    problems = []
    specs: set[str] = set()
    for j, srv in enumerate(servers):
        skey = f"{key}[{j}]"
        if srv.srv:
            if srv.address:
                problems.append(f"{skey}.srv: give address or srv, not both")
            elif not is_dns_name(srv.srv):
                problems.append(f"{skey}.srv: expected a DNS name like "
                                f"'_http._tcp.app.internal', got {srv.srv!r}")
            if not srv.resolve:
                problems.append(f"{skey}.resolve: required with srv (e.g. \"30s\")")
            if srv.weight != 1:
                problems.append(f"{skey}.weight: SRV records carry their own weights")
        elif not srv.address:
            problems.append(f"{skey}.address: required (or give srv)")
            continue
        else:
            try:
                host, _ = parse_hostport(srv.address)
            except ValueError as e:
                problems.append(f"{skey}.address: {e}")
                continue
            if srv.resolve and not is_dns_name(host):
                problems.append(f"{skey}.resolve: {host!r} is not a DNS name: nothing to resolve")
        if srv.resolve:
            if srv.resolve < MIN_RESOLVE:
                problems.append(f"{skey}.resolve: must be at least {MIN_RESOLVE:g}s")
            spec = resolved_spec(srv)
            if spec in specs:
                problems.append(f"{skey}: {spec!r} is listed twice")
            specs.add(spec)
    return problems


def parse_nameserver(text: str) -> tuple[str, int]:
    """A [resolver] nameserver: "IP" (port 53), "IP:PORT" or "[V6]:PORT"."""
    if _is_ip(text):
        return text, 53
    try:
        host, port = parse_hostport(text)
    except ValueError:
        host, port = "", 0
    if not _is_ip(host):
        raise ValueError(f"expected an IP address with an optional port ('IP', 'IP:PORT', "
                         f"'[V6]:PORT'), got {text!r}")
    return host, port


def uses_dns(cfg: Config) -> bool:
    return any(s.resolve for up in cfg.upstream.values() for s in up.servers)


def uses_http2(cfg: Config) -> bool:
    """True when a listener may serve HTTP/2 (h2 or h2c; a TLS listener offers h2 by
    default) or an upstream speaks it (gRPC health checks need that too)."""
    return (any({"h2", "h2c"} & set(listener_protocols(lcfg)) for lcfg in cfg.listener)
            or any(up.protocol != "http/1.1" for up in cfg.upstream.values()))


def _validate_resolver(cfg: Config, check_files: bool) -> list[str]:
    problems = []
    res = cfg.resolver
    for j, ns in enumerate(res.nameservers):
        try:
            parse_nameserver(ns)
        except ValueError as e:
            problems.append(f"resolver.nameservers[{j}]: {e}")
    if res.timeout <= 0:
        problems.append("resolver.timeout: must be above 0")
    if check_files and not res.nameservers and uses_dns(cfg) and not _system_nameservers():
        problems.append("resolver.nameservers: required: servers use resolve and "
                        "/etc/resolv.conf names no nameserver")
    return problems


def _system_nameservers(path: str = "/etc/resolv.conf") -> list[str]:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    return [ln.split()[1] for ln in lines if ln.startswith("nameserver") and len(ln.split()) > 1]


def _validate_upstream_policy(key: str, up: UpstreamConfig) -> list[str]:
    problems = []
    if up.balance == "hash":
        if not up.hash:
            problems.append(f"{key}.hash: required with balance = \"hash\"")
        else:
            msg = _hash_key_problem(up.hash)
            if msg:
                problems.append(f"{key}.hash: {msg}")
    elif up.hash:
        problems.append(f"{key}.hash: only used with balance = \"hash\"")
    hc = up.health_check
    if hc is not None and hc.type == "grpc" and up.protocol == "http/1.1":
        problems.append(f"{key}.health_check.type: \"grpc\" speaks HTTP/2: the upstream's "
                        "protocol must be \"h2c\" or \"h2\"")
    if hc is not None:
        if not hc.path.startswith("/"):
            problems.append(f"{key}.health_check.path: must start with '/'")
        if hc.interval <= 0 or hc.timeout <= 0:
            problems.append(f"{key}.health_check: interval and timeout must be above 0")
    if up.max_fails and up.fail_timeout <= 0:
        problems.append(f"{key}.fail_timeout: must be above 0 when max_fails is set")
    return problems


def _validate_tls(key: str, tls: TLSConfig, base: str, check_files: bool) -> list[str]:
    problems = []
    if not tls.certificates:
        problems.append(f"{key}.certificates: at least one certificate is required")
    for j, cert in enumerate(tls.certificates):
        ckey = f"{key}.certificates[{j}]"
        for attr in ("cert", "key"):
            p = resolve_path(getattr(cert, attr), base)
            if check_files and not os.access(p, os.R_OK):
                problems.append(f"{ckey}.{attr}: cannot read {p}")
        if check_files and not problems:
            err = check_cert_key(resolve_path(cert.cert, base), resolve_path(cert.key, base))
            if err:
                problems.append(f"{ckey}.key: {err}")
    if tls.ocsp_issuer and check_files:
        p = resolve_path(tls.ocsp_issuer, base)
        if not os.access(p, os.R_OK):
            problems.append(f"{key}.ocsp_issuer: cannot read {p}")
    if tls.ticket_key_file and check_files:
        p = resolve_path(tls.ticket_key_file, base)
        if not os.access(p, os.R_OK):
            problems.append(f"{key}.ticket_key_file: cannot read {p}")
        elif os.stat(p).st_mode & 0o077:
            problems.append(f"{key}.ticket_key_file: {p} must not be readable by group or others (chmod 600)")
    if tls.ticket_key_rotation < 1:
        problems.append(f"{key}.ticket_key_rotation: must be at least 1s")
    return problems


def listener_protocols(lst: ListenerConfig) -> tuple[str, ...]:
    """The protocols a listener serves, with the defaults filled in."""
    if lst.protocols is not None:
        return tuple(lst.protocols)
    if lst.tls is not None:
        return tuple(lst.tls.alpn) if lst.tls.alpn is not None else ("h2", "http/1.1")
    return ("http/1.1",)


def _validate_http2(cfg: Config) -> list[str]:
    """The listeners' protocols, and the ranges RFC 9113 section 6.5.2 gives the
    SETTINGS values."""
    problems = []
    for i, lst in enumerate(cfg.listener):
        problems.extend(_validate_protocols(f"listener[{i}]", lst))
    h2 = cfg.http2
    if not 1 <= h2.initial_window_size <= 2**31 - 1:
        problems.append("http2.initial_window_size: must be 1 to 2147483647 bytes")
    if not 16384 <= h2.max_frame_size <= 16777215:
        problems.append("http2.max_frame_size: must be 16k to 16777215 bytes")
    if h2.max_header_list_size < 1024:
        problems.append("http2.max_header_list_size: must be at least 1k")
    if h2.send_buffer < 16384:
        problems.append("http2.send_buffer: must be at least 16k")
    return problems


def _validate_protocols(key: str, lst: ListenerConfig) -> list[str]:
    if lst.protocols is None:
        return []
    problems = []
    protos = lst.protocols
    if lst.tls is not None and lst.tls.alpn is not None:
        problems.append(f"{key}.tls.alpn: the former name of {key}.protocols: give only one")
    if not protos:
        problems.append(f"{key}.protocols: at least one protocol is required")
    if len(set(protos)) != len(protos):
        problems.append(f"{key}.protocols: a protocol is listed twice")
    if lst.tls is not None and "h2c" in protos:
        problems.append(f"{key}.protocols: 'h2c' is HTTP/2 without TLS; a TLS listener "
                        "offers 'h2'")
    if lst.tls is None and "h2" in protos:
        problems.append(f"{key}.protocols: 'h2' needs [listener.tls]; a plain listener "
                        "accepts 'h2c' (prior knowledge)")
    return problems


_TLS_ORDER = {"TLSv1.2": 0, "TLSv1.3": 1}


def _validate_upstream_tls(key: str, tls: UpstreamTLSConfig, base: str,
                           check_files: bool) -> list[str]:
    """The upstream's TLS files load (CA, client certificate matching its key) and the
    settings agree with each other."""
    problems = []
    if bool(tls.cert) != bool(tls.key):
        problems.append(f"{key}: cert and key go together (a client certificate needs its key)")
    if tls.ca and not tls.verify:
        problems.append(f"{key}.ca: has no effect with verify = false (remove one)")
    if _TLS_ORDER[tls.min_version] > _TLS_ORDER[tls.max_version]:
        problems.append(f"{key}.min_version: {tls.min_version} is newer than max_version "
                        f"{tls.max_version}")
    for proto in tls.alpn:
        if proto not in ("http/1.1",):
            problems.append(f"{key}.alpn: unsupported protocol {proto!r} (only 'http/1.1')")
    if tls.ciphers:
        problems.extend(f"{key}.ciphers: {e}" for e in check_ciphers(tls.ciphers))
    if tls.server_name and not _SERVER_NAME_RE.match(tls.server_name):
        problems.append(f"{key}.server_name: not a host name: {tls.server_name!r}")
    if not check_files:
        return problems
    if tls.verify:
        err = check_ca(resolve_path(tls.ca, base)) if tls.ca else check_system_ca()
        if err:
            problems.append(f"{key}.ca: {err}")
    if tls.cert and tls.key:
        err = check_cert_key(resolve_path(tls.cert, base), resolve_path(tls.key, base))
        if err:
            problems.append(f"{key}.key: {err}")
    return problems


_SERVER_NAME_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$|^[0-9a-fA-F:.]+$")


def resolve_path(p: str, base: str) -> str:
    """Relative paths in the config are relative to the config file's directory."""
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))


#: workers per collector process with ``collectors = "auto"``: the compiled record path
#: (manager/rawbatch) takes ~1 µs per record with the JSON access log on, so 16 busy
#: workers (~400k records/s) use ~0.4 of a collector's core (docs/BENCHMARKS.md, "The
#: manager's record path", round 4)
WORKERS_PER_COLLECTOR = 16
#: the same as plain Python (no compiler): ~7.5 µs per record, 4 busy workers ~0.75 core
WORKERS_PER_COLLECTOR_PURE = 4


def collector_count(cfg: Config, workers_per_collector: int = WORKERS_PER_COLLECTOR) -> int:
    """Processes draining the rings: as configured, or for "auto" one per
    ``workers_per_collector`` workers (the manager passes the figure of its build)."""
    if cfg.server.collectors == "auto":
        return -(-worker_count(cfg) // workers_per_collector)
    return int(cfg.server.collectors)


def worker_count(cfg: Config) -> int:
    if cfg.server.workers == "auto":
        return max(1, len(os.sched_getaffinity(0))) * cfg.server.workers_per_core
    return int(cfg.server.workers)


def worker_cpus(cfg: Config, n: int) -> list[int | None]:
    """CPU each worker slot is pinned to (None = not pinned)."""
    aff = cfg.server.cpu_affinity
    if aff == "off":
        return [None] * n
    cpus = sorted(os.sched_getaffinity(0)) if aff == "auto" else list(aff)
    return [cpus[i % len(cpus)] for i in range(n)]


#: nginx's rate syntax: "100r/s", "600r/m"
RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*r/(s|m)\s*$")


def parse_rate(text: str) -> float:
    """``"100r/s"`` or ``"600r/m"`` -> requests per second (nginx's syntax)."""
    m = RATE_RE.match(text) if isinstance(text, str) else None
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"expected a rate like '100r/s' or '600r/m', got {text!r}")
    per = 1.0 if m.group(2) == "s" else 60.0
    return float(m.group(1)) / per


def config_dir(cfg: Config) -> str:
    """The directory relative paths in the config are resolved against."""
    return os.path.dirname(cfg.path) if cfg.path and cfg.path != "<string>" else "."


def pidfile_path(cfg: Config) -> str:
    """server.pidfile, relative paths resolved against the config's directory."""
    return resolve_path(cfg.server.pidfile, config_dir(cfg))


def log_path(cfg: Config, p: str) -> str:
    """A log destination with relative paths resolved against the config's directory."""
    if p in ("-", "off", ""):
        return p
    return resolve_path(p, config_dir(cfg))
