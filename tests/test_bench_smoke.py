"""scripts/bench runs: the short smoke scenario only (speed is never asserted here; a timing
assertion on a shared machine is a flaky test). docs/BENCHMARKS.md has the real runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import missing_tools, skip_missing_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_SKIP = 77  # scripts/bench: prerequisites missing and not installable (not root)


def _can_run() -> str | None:
    missing = missing_tools("wrk", "nginx", "openssl", "taskset")
    if missing and os.geteuid() != 0:  # as root, scripts/bench installs them itself
        return ", ".join(missing)
    return None


@pytest.mark.timeout(180)
def test_bench_quick_prints_a_table_with_a_ratio(tmp_path):
    missing = _can_run()
    if missing:
        skip_missing_tool(missing, "apt-get install -y wrk nginx-light, or run as root")
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench"), "--quick", "--json",
         str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=170)
    if proc.returncode == EXIT_SKIP:
        skip_missing_tool("a scripts/bench prerequisite", proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    fp_rows = [r for r in rows if r.startswith("| forkproxy |")]
    assert fp_rows, proc.stdout
    cells = [c.strip() for c in fp_rows[0].strip("|").split("|")]
    assert float(cells[1].replace(",", "")) > 0  # req/s median
    assert any(r.startswith("| nginx |") for r in rows), proc.stdout
    assert any(r.startswith("| **forkproxy / nginx**") and "x" in r for r in rows), proc.stdout
    results = json.loads(out_json.read_text())
    tiny = results["scenarios"]["tiny"]["summary"]
    assert tiny["forkproxy"]["rate"] > 0 and tiny["forkproxy"]["cpu_us"] > 0
    assert tiny["nginx"]["rate"] > 0
    assert (tmp_path / "bench.md").exists()


@pytest.mark.timeout(240)
def test_bench_grpc_scenario_counts_calls_that_carried_a_reply(tmp_path):
    """The grpc scenario (issue 15): h2load's gRPC calls through forkproxy's h2c upstream and
    nginx's grpc_pass, each proxy first checked with a real grpcio call, and no call counted
    without its reply message (h2load alone counts any 2xx)."""
    missing = _can_run() or (", ".join(missing_tools("h2load")) if os.geteuid() != 0 else None)
    if missing:
        skip_missing_tool(missing, "apt-get install -y wrk nginx-light nghttp2-client")
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench"), "--quick", "--scenarios",
         "grpc", "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=230)
    if proc.returncode == EXIT_SKIP:
        skip_missing_tool("a scripts/bench prerequisite", proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    summary = json.loads(out_json.read_text())["scenarios"]["grpc"]["summary"]
    for proxy in ("forkproxy", "nginx"):
        assert summary[proxy]["rate"] > 0 and summary[proxy]["cpu_us"] > 0, summary
        assert "no gRPC reply" not in summary[proxy]["errors"], summary
    assert "gRPC unary (h2c): CPU/call <= 2x nginx" in proc.stdout


@pytest.mark.timeout(180)
def test_bench_tracing_prints_the_managers_cost(tmp_path):
    """--tracing: forkproxy with tracing off, at 1% and at 100% in the same run, spans
    really exported to the receiver, and the manager's CPU per request for each."""
    missing = _can_run()
    if missing:
        skip_missing_tool(missing, "apt-get install -y wrk nginx-light, or run as root")
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench"), "--quick", "--tracing",
         "--proxies", "forkproxy", "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=170)
    if proc.returncode == EXIT_SKIP:
        skip_missing_tool("a scripts/bench prerequisite", proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    for row in ("| tracing off |", "| sample_ratio = 0.01 |", "| sample_ratio = 1 |"):
        assert any(line.startswith(row) for line in proc.stdout.splitlines()), proc.stdout
    results = json.loads(out_json.read_text())
    tiny = results["scenarios"]["tiny"]["summary"]
    for name in ("forkproxy", "forkproxy+trace0.01", "forkproxy+trace1"):
        assert tiny[name]["rate"] > 0 and tiny[name]["manager_us"] > 0, (name, tiny[name])
    [note] = [n for n in results["notes"] if n.startswith("OTLP receiver:")]
    assert int(note.split()[2]) > 0, note


@pytest.mark.timeout(180)
def test_pageload_quick_loads_pages_through_the_delay_relay(tmp_path):
    """scripts/pageload --quick: pages load through the 50 ms RTT relay with HTTP/2 and
    pipelined HTTP/1.1, through forkproxy and nginx, with the origin behind the same link.
    The only times asserted are floors the relays guarantee: an HTTP/2 page takes at least
    the client's and the upstream's round trip (100 ms); a pipelined page at least ten
    upstream round trips, since both proxies answer pipelined requests one after another."""
    missing = missing_tools("nginx", "h2load", "openssl", "taskset")
    if missing and os.geteuid() != 0:
        skip_missing_tool(", ".join(missing), "apt-get install -y nginx-light nghttp2-client")
    out_json = tmp_path / "pageload.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "pageload"), "--quick", "--loaders", "2",
         "--modes", "h1-pipelined,h2", "--link", "relay", "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=170)
    if proc.returncode == EXIT_SKIP:
        skip_missing_tool("a scripts/pageload prerequisite", proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert "| HTTP/2 (TLS, ALPN h2), 1 connection | forkproxy |" in proc.stdout, proc.stdout
    assert "userspace relay" in proc.stdout
    results = json.loads(out_json.read_text())
    [link] = results["links"]
    assert results["origin_leg"].startswith("the origin behind a userspace delay relay, 25 ms")
    for cell, floor_ms in (("h2/forkproxy", 100), ("h2/nginx", 100),
                           ("h1-pipelined/forkproxy", 500), ("h1-pipelined/nginx", 500)):
        s = link["summary"][cell]
        assert s["pages"] > 0 and s["errors"] == 0, (cell, s)
        assert s["p50_ms"] >= floor_ms, (cell, s)
