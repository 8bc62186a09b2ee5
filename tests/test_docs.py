"""docs/OPERATIONS.md's configuration reference is generated from forkproxy/config.py:
regenerate it and fail when the committed file differs (or misses a key)."""

from __future__ import annotations

import os
import subprocess
import sys

import msgspec

from forkproxy import config as config_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN = os.path.join(ROOT, "scripts", "gen-config-reference")
DOC = os.path.join(ROOT, "docs", "OPERATIONS.md")


def test_config_reference_is_up_to_date():
    p = subprocess.run([sys.executable, GEN, "--check"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, (
        "docs/OPERATIONS.md is stale; run scripts/gen-config-reference\n" + p.stdout + p.stderr)


def test_reference_lists_every_key_with_a_meaning():
    p = subprocess.run([sys.executable, GEN, "--print"], capture_output=True, text=True,
                       timeout=60, check=True)
    text = p.stdout
    structs = [config_mod.ServerConfig, config_mod.LogConfig, config_mod.AdminConfig,
               config_mod.ListenerConfig, config_mod.TLSConfig, config_mod.CertificateConfig,
               config_mod.RouteConfig, config_mod.UpstreamConfig, config_mod.ServerAddress]
    for cls in structs:
        for f in msgspec.structs.fields(cls):
            rows = [line for line in text.splitlines() if line.startswith(f"| `{f.name}` |")]
            assert rows, f"{cls.__name__}.{f.name} missing from the reference"
            assert all(not row.rstrip().endswith("|  |") for row in rows), \
                f"{cls.__name__}.{f.name} has no description (add a '#:' comment)"
    for header in ("[server]", "[log]", "[admin]", "[[listener]]", "[listener.tls]",
                   "[[route]]", "[upstream.NAME]"):
        assert f"### `{header}`" in text
    # Config.path is not a config key (health_check.path, a real one, is "/healthz")
    assert '| `path` | string | `""`' not in text


def test_operations_doc_sections():
    with open(DOC) as f:
        doc = f.read()
    for heading in ("## Install", "## Command line and signals", "## Reload runbook",
                    "## Binary upgrade runbook", "## Tuning", "## Capacity",
                    "## Behind an L4 balancer", "## Several hosts", "## Troubleshooting"):
        assert heading in doc, heading
    assert "docs/BENCHMARKS.md" in doc
