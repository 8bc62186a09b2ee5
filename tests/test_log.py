"""The error log's structlog import (forkproxy/log.py): asyncio stays out of every
process of a running tree, and structlog's async methods still work when called."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

ASYNC_LOGGING = textwrap.dedent("""
    import asyncio_first, json, logging, sys
    from forkproxy import log
    logger = log.setup("-", "info", "json", "probe")
    before = "asyncio" in sys.modules
    logger.info("sync line", n=1)
    import asyncio
    import structlog.stdlib

    async def main():
        await logger.ainfo("async line", n=2)
        # structlog.stdlib holds asyncio too, for its BoundLogger's async methods: its BoundLogger's async methods
        logging.basicConfig(stream=sys.stderr, format="%(message)s", level=logging.INFO)
        stdlib_logger = structlog.stdlib.BoundLogger(
            logging.getLogger("probe"), [structlog.processors.JSONRenderer()], {})
        await stdlib_logger.ainfo("x")
    asyncio.run(main())
    print(json.dumps({"asyncio_before": before,
                      "structlog_binds": sorted({type(structlog._native.asyncio).__name__,
                                   type(structlog.stdlib.asyncio).__name__})}))
""")


def mapped_asyncio(pid: int) -> bool:
    """Whether pid maps asyncio's C accelerator (imported with asyncio itself)."""
    with open(f"/proc/{pid}/maps") as f:
        return any("/_asyncio." in line for line in f)


def run_probe(tmp_path, asyncio_first: bool) -> tuple[list[dict], dict]:
    (tmp_path / "asyncio_first.py").write_text("import asyncio\n" if asyncio_first else "")
    r = subprocess.run([sys.executable, "-c", ASYNC_LOGGING], capture_output=True, text=True,
                       timeout=60, env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stderr.splitlines()], json.loads(r.stdout)


def test_no_process_of_a_running_tree_imports_asyncio(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=2)
    tree = [p.pid, p.manager_pid(), *p.workers_pids()]
    assert len(tree) == 4 and None not in tree
    assert {pid: mapped_asyncio(pid) for pid in tree} == {pid: False for pid in tree}
    assert any(e.get("event") == "master started" for e in p.log_events())


def test_structlog_async_methods_import_asyncio_when_called(tmp_path):
    lines, seen = run_probe(tmp_path, asyncio_first=False)
    assert seen == {"asyncio_before": False, "structlog_binds": ["AsyncioOnFirstUse"]}
    assert [(e["event"], e.get("n"), e.get("process")) for e in lines[:2]] == [
        ("sync line", 1, "probe"), ("async line", 2, "probe")]
    assert lines[2]["event"] == "x"


def test_structlog_binds_asyncio_itself_when_it_was_imported_first(tmp_path):
    lines, seen = run_probe(tmp_path, asyncio_first=True)
    assert seen == {"asyncio_before": True, "structlog_binds": ["module"]}
    assert [e["event"] for e in lines] == ["sync line", "async line", "x"]
