"""The docs cannot drift from the code: docs/OPERATIONS.md's configuration reference is
generated from forkproxy/config.py (regenerated here, compared with the committed file);
its interface reference (metrics, access-log fields, admin routes) and README.md's module
table are checked against the code; no tracked file refers to a path outside the repo."""

from __future__ import annotations

import os
import re
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


# -- the repository explains itself -------------------------------------------------------

README = os.path.join(ROOT, "README.md")
PACKAGE = os.path.join(ROOT, "forkproxy")
_ROW = re.compile(r"^\| `(forkproxy/[^`]+\.py)` \|", re.M)


def package_modules() -> set[str]:
    """Every module under forkproxy/ (package __init__ files carry no code)."""
    out = set()
    for dirpath, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py") and name != "__init__.py":
                out.add(os.path.relpath(os.path.join(dirpath, name), ROOT))
    return out


def test_readme_module_table_matches_the_tree():
    with open(README) as f:
        listed = _ROW.findall(f.read())
    assert len(listed) == len(set(listed)), "a module is listed twice in README.md"
    missing = sorted(package_modules() - set(listed))
    absent = sorted(set(listed) - package_modules())
    assert not missing, f"modules missing from README.md's module table: {missing}"
    assert not absent, f"README.md lists modules that do not exist: {absent}"


def test_readme_links_the_docs():
    with open(README) as f:
        text = f.read()
    for doc in ("docs/OPERATIONS.md", "docs/ARCHITECTURE.md", "docs/HARDENING.md",
                "docs/BENCHMARKS.md"):
        assert f"]({doc})" in text, f"README.md does not link {doc}"
        assert os.path.exists(os.path.join(ROOT, doc)), doc


#: names of files that live outside the repository (split so this file does not match)
OUTSIDE = ("../" + "shared", "/work/" + "shared", "DESIGN" + ".md", "CONTRACT" + ".md")
_MD_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def tracked_files() -> list[str]:
    p = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [name for name in p.stdout.decode().split("\0") if name]


def test_no_tracked_file_refers_outside_the_repo():
    offenders = []
    for name in tracked_files():
        path = os.path.join(ROOT, name)
        if not os.path.isfile(path):
            continue  # deleted in the work tree
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data:
            continue  # binary
        text = data.decode(errors="replace")
        offenders += [f"{name}: {word}" for word in OUTSIDE if word in text]
        if name.endswith(".md"):
            base = os.path.dirname(path)
            for target in _MD_LINK.findall(text):
                if "://" in target or target.startswith("mailto:"):
                    continue
                dest = os.path.normpath(os.path.join(base, target))
                if not dest.startswith(ROOT + os.sep) or not os.path.exists(dest):
                    offenders.append(f"{name}: link {target}")
    assert not offenders, f"references to paths outside the repository: {offenders}"


def test_outside_check_can_fail(tmp_path):
    """The patterns above do match what they are meant to catch."""
    text = f"see {OUTSIDE[0]}/{OUTSIDE[3]} and {OUTSIDE[2]}"  # a path out of the repo, and a name
    assert sum(word in text for word in OUTSIDE) == 3
    assert _MD_LINK.findall("[x](../elsewhere.md#a) [y](docs/A.md)") == ["../elsewhere.md",
                                                                         "docs/A.md"]


# -- the interface reference in OPERATIONS.md matches the code ----------------------------

_FAMILY = re.compile(r'"(forkproxy_[a-z0-9_]+)"')


def _section(doc: str, heading: str) -> str:
    start = doc.index(heading)
    end = doc.find("\n### ", start + len(heading))
    end2 = doc.find("\n## ", start + len(heading))
    ends = [e for e in (end, end2) if e != -1]
    return doc[start:min(ends)] if ends else doc[start:]


def code_metric_families() -> set[str]:
    names = set()
    for mod in ("metrics.py", "upstreams.py", "tlsstate.py", "tracing.py"):
        with open(os.path.join(PACKAGE, "manager", mod)) as f:
            names |= set(_FAMILY.findall(f.read()))
    return names


def test_metrics_reference_matches_the_code():
    with open(DOC) as f:
        section = _section(f.read(), "### Metrics")
    documented = set(re.findall(r"^\| `(forkproxy_[a-z0-9_]+)` \|", section, re.M))
    code = code_metric_families()
    assert code, "no metric family found in the manager's code"
    assert not code - documented, f"metrics missing from OPERATIONS.md: {sorted(code - documented)}"
    assert not documented - code, f"OPERATIONS.md lists unknown metrics: {sorted(documented - code)}"


def test_access_log_reference_matches_the_code():
    from forkproxy.manager.accesslog import JsonLine

    with open(DOC) as f:
        section = _section(f.read(), "### Access log fields")
    documented = re.findall(r"^\| `([a-z_]+)` \|", section, re.M)
    assert documented == list(JsonLine.__struct_fields__), "fields or their order differ"


def test_admin_reference_lists_every_route():
    with open(DOC) as f:
        section = _section(f.read(), "### Admin endpoints")
    with open(os.path.join(PACKAGE, "manager", "admin.py")) as f:
        routes = set(re.findall(r'path == "(/[a-z/]*)"', f.read()))
    assert routes
    for route in routes:
        assert f"| `{route}" in section, f"admin route {route} missing from OPERATIONS.md"


def test_every_module_is_in_the_layers_contract():
    """A new top-level module or package must be placed on a floor (pyproject.toml)."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    [layers] = [c["layers"] for c in contracts if c["type"] == "layers"]
    placed = {m.strip() for layer in layers for m in layer.split("|")}
    top = {"forkproxy." + (n[:-3] if n.endswith(".py") else n) for n in os.listdir(PACKAGE)
           if (n.endswith(".py") and n != "__init__.py")
           or os.path.isfile(os.path.join(PACKAGE, n, "__init__.py"))}
    assert not top - placed, f"not on any floor of the layers contract: {sorted(top - placed)}"
