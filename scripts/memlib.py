"""`scripts/memprobe --ab REV`: idle memory of this tree against another revision, in
interleaved rounds (this tree, REV, this tree, REV, ...), so that both builds see the
same machine.

The PSS of file-backed pages (libpython, libcrypto, the extension modules) is shared
with every other process on the machine that maps the same file pages, so on a busy
machine it moves by megabytes between two runs of one build. Each round therefore also
gives the anonymous and the shared-memory PSS, and the distinct physical pages of the
process tree (/proc/PID/pagemap: each page mapped by the master, the helpers or the
workers counted once): the tree's PSS sum on a machine where nothing else maps those
files, steady to ~0.2 MiB between rounds. Page frame numbers need root
(CAP_SYS_ADMIN); without them that column is left out.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import sysconfig
import time
import tomllib

import benchlib as b

RUNTIME_VENV = os.path.join(b.ROOT, ".venv-runtime")


def runtime_python() -> str:
    """The interpreter of a venv holding forkproxy's runtime dependencies alone
    (pyproject.toml's ``dependencies``, pinned by constraints.txt), made or renewed here.

    The development venv also holds the test dependencies, and the proxy imports some of
    what they bring: msgspec imports typing_extensions whenever it is installed, and only
    grpcio (tests) installs it here (~0.45 MiB of the idle tree). A deployed proxy
    (``pip install forkproxy``) has none of them, so memprobe runs forkproxy under this
    venv, with the package itself from the source tree (``python -m forkproxy`` in it)."""
    py = os.path.join(RUNTIME_VENV, "bin", "python")
    stamp = os.path.join(RUNTIME_VENV, ".installed")
    sources = [os.path.join(b.ROOT, name) for name in ("pyproject.toml", "constraints.txt")]
    if os.path.exists(stamp) and all(os.path.getmtime(src) <= os.path.getmtime(stamp)
                                     for src in sources):
        return py
    with open(sources[0], "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    print(f"memprobe: installing forkproxy's runtime dependencies in {RUNTIME_VENV}",
          file=sys.stderr, flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", RUNTIME_VENV], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "-c", sources[1], *deps], check=True)
    with open(stamp, "w"):
        pass
    return py


def build_like_this_tree(source: str, rev: str) -> None:
    """Compile REV's checkout as this tree is built: its bytecode, as ``pip install``
    writes it, and the modules its setup.py lists in COMPILED, as scripts/setup builds
    them. ``git archive`` carries neither, and a pure-Python manager left ~1 MiB less in
    the tree at idle than the compiled one (file-backed extension pages), which an A/B
    of two compiled builds must not count as a change."""
    compileall.compile_dir(os.path.join(source, "forkproxy"), quiet=1)
    if os.environ.get("FORKPROXY_PURE_PYTHON") or this_tree_is_pure():
        return
    setup_py = subprocess.run(["git", "-C", b.ROOT, "show", f"{rev}:setup.py"],
                              capture_output=True, text=True)
    if setup_py.returncode != 0 or "COMPILED" not in setup_py.stdout:
        return  # REV has no compiled modules
    with open(os.path.join(source, "setup.py"), "w") as f:
        f.write(setup_py.stdout)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    if any(name.endswith(suffix) for _d, _s, names in os.walk(source) for name in names):
        return  # built by an earlier round
    print(f"memprobe: compiling {rev}'s extension modules", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "-j", "2"],
                   cwd=source, check=True, capture_output=True)


def this_tree_is_pure() -> bool:
    """True when this tree runs without its compiled modules (none built)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    return not any(name.endswith(suffix) for _d, _s, names
                   in os.walk(os.path.join(b.ROOT, "forkproxy")) for name in names)


def sample(px) -> dict:
    """PSS by kind summed over the proxy's processes, and the tree's distinct pages."""
    pids = px.pids()
    out = {"pss": 0.0, "anon": 0.0, "file": 0.0, "shmem": 0.0, "procs": []}
    for pid in pids:
        m = b.smaps(pid)
        out["pss"] += m.get("Pss", 0) / 1024
        out["anon"] += m.get("Pss_Anon", 0) / 1024
        out["file"] += m.get("Pss_File", 0) / 1024
        out["shmem"] += m.get("Pss_Shmem", 0) / 1024
        out["procs"].append(f"{b._comm(pid)} {m.get('Pss', 0) / 1024:.1f}"
                            f"/{m.get('Private_Dirty', 0) / 1024:.1f}")
    out["distinct"] = b.distinct_pages_mib(pids)
    return out


def _summary(label: str, rows: list[dict]) -> str:
    parts = [f"{label}:"]
    for key in ("pss", "anon", "file", "shmem", "distinct"):
        vals = [r[key] for r in rows if r[key] is not None]
        if vals:
            parts.append(f"{key} {statistics.median(vals):.2f} "
                         f"({min(vals):.1f}-{max(vals):.1f})")
    return "  ".join(parts)


def main_ab(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scripts/memprobe --ab REV",
                                description="idle PSS of this tree against REV, interleaved")
    p.add_argument("--ab", required=True, metavar="REV", help="git revision to compare")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--settle", type=float, default=2.0, help="seconds before each sample")
    args = p.parse_args(argv)
    args.no_pin, args.keep = True, False
    args.want_tls = args.want_upstream_tls = args.want_grpc = False
    err = b.ensure_tools(["nginx", "openssl", "taskset"])
    if err:
        print(f"memprobe: cannot run: {err}", file=sys.stderr)
        return b.EXIT_SKIP
    b.ensure_venv()
    b.precompile_package()
    b.PROXY_PY = runtime_python()
    procs = b.Procs()
    env = None
    results: dict[str, list[dict]] = {"this tree": [], args.ab: []}
    try:
        env = b.Env(args, procs)
        env.start_origin()
        for rnd in range(args.rounds):
            for label in results:
                px = b.ForkProxy(env, rev="" if label == "this tree" else args.ab)
                if px.source:  # the other build, compiled as this tree is
                    build_like_this_tree(px.source, args.ab)
                try:
                    px.start()
                    time.sleep(args.settle)
                    row = sample(px)
                finally:
                    px.stop()
                results[label].append(row)
                distinct = "" if row["distinct"] is None else f" distinct {row['distinct']:.1f}"
                print(f"round {rnd} {label}: PSS {row['pss']:.1f} MiB (anon {row['anon']:.1f}"
                      f" file {row['file']:.1f} shmem {row['shmem']:.2f}){distinct}  "
                      + ", ".join(row["procs"]), flush=True)
        print("medians (min-max) in MiB over", args.rounds, "rounds")
        for label, rows in results.items():
            print(_summary(label, rows))
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        procs.stop_all()
        if env is not None:
            env.cleanup()
